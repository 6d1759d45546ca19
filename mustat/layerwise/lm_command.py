"""``mustat oneshot`` on a causal language model (``smollm2``, a causal-LM folder or a ``.gguf``
file): calibration and held-out token windows from the text, held-out perplexity before and after.

Called by :mod:`mustat.layerwise.command` once the arguments are checked; the options keep their
meaning with tokens in place of sentences: ``--samples`` calibration windows and ``--evaluate``
held-out windows of ``--max-length`` tokens each, disjoint (:func:`mustat.text.token_windows`,
the held-out set fixed by ``--seed``), from the whole text of ``--text``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def run_causal(args: argparse.Namespace, target: str, out: Path, export: tuple[Path, str] | None = None) -> int:
    """Load, split, prune, evaluate and save; ``target``, ``out`` and ``export`` (``--export``'s
    folder and format: :func:`mustat.export.export_target`) as the command resolved them."""
    from mustat.causal_lm import encode, load_causal_lm, perplexity
    from mustat.layerwise import oneshot
    from mustat.text import read_text, token_windows

    if args.max_length < 2:
        raise ValueError(f"--max-length must be at least 2 tokens for a language model, got {args.max_length}")
    text = read_text(args.text)                       # before the model: a bad --text fails at once
    model, tok = load_causal_lm(args.model)
    ids = encode(tok, text)
    windows = token_windows(ids, args.max_length, args.samples, args.evaluate, seed=args.seed)
    held = windows.evaluation
    update = {"auto": None, "yes": True, "no": False}[args.update]
    dense = perplexity(model, held) if len(held) else None
    if dense is not None:
        print(f"dense: {dense} ({len(held)} held-out windows of {args.max_length})")
    cal = [{"input_ids": b} for b in windows.calibration.split(args.batch_size)]
    report = oneshot(model, cal, method=args.method, sparsity=args.sparsity, pattern=args.pattern, scope=args.scope,
                     update=update, damping=args.damping, sigma=args.sigma, sequential=args.sequential,
                     progress=not args.quiet, allocation=args.allocation, refit=args.refit, swaps=args.swaps,
                     shots=args.shots, loss="causal-lm" if args.sigma == "loss" else None,
                     loss_damping=args.loss_damping)
    print(report)
    summary = dict(model=str(args.model), kind="causal-lm", method=args.method, target=target, scope=args.scope,
                   update=update, sigma=args.sigma, allocation=args.allocation, refit=args.refit, swaps=args.swaps, shots=args.shots, loss_damping=args.loss_damping,
                   samples=args.samples, tokens_per_window=args.max_length,
                   evaluate=args.evaluate, seed=args.seed, text=args.text, sparsity=report.pruning.sparsity,
                   seconds=report.seconds, passes=report.passes, mean_layer_error=float(report.layers["error"].mean()),
                   skipped=report.skipped, date=time.strftime("%Y-%m-%d"))
    if dense is not None:
        pruned = perplexity(model, held)
        summary.update(dense_perplexity=dense.value, perplexity=pruned.value, evaluation_tokens=pruned.tokens)
        print(f"pruned: {pruned} (dense {dense.value:.4f})")
    from mustat.layerwise.outputs import write_outputs

    return write_outputs(model, tok, report, summary, out, export)
