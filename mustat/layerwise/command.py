"""``mustat oneshot``: prune a Hugging Face encoder from a local folder one-shot, report its
fidelity to the dense model on held-out sentences, and save it; or a causal LM (``smollm2``, a
causal-LM folder, a ``.gguf`` file: :mod:`mustat.layerwise.lm_command`), reporting held-out perplexity.

Its parser is in :mod:`mustat.cli`, which imports this module only when the command runs (the
package imports torch, too slow for ``mustat --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Inside the block, transformers' and huggingface_hub's progress bars (``from_pretrained``'s
    "Loading weights" bar, download bars) are off unless ``enabled``; after it, both libraries'
    switches are as they were, so a caller of :func:`run` in the same process sees no change.

    These are process-wide switches of those libraries, which is why only a command sets them,
    and only for as long as it runs. Without transformers there is nothing to switch (the
    command then stops with the install hint of :func:`mustat.layerwise.hf.load_encoder`)."""
    if enabled:
        yield
        return
    try:
        from huggingface_hub import utils as hub
        from transformers.utils import logging as tf_logging
    except ImportError:
        yield
        return
    was_on = tf_logging.is_progress_bar_enabled()
    # huggingface_hub keeps a switch per group of bars, and turning bars off or on clears them all,
    # so its whole table is saved and put back, not only the global switch (where it is found)
    states = getattr(importlib.import_module("huggingface_hub.utils.tqdm"), "progress_bar_states", None)
    saved = dict(states) if isinstance(states, dict) else None
    hub_was_off = hub.are_progress_bars_disabled()
    tf_logging.disable_progress_bar()  # turns off huggingface_hub's bars too
    try:
        yield
    finally:
        if was_on:
            tf_logging.enable_progress_bar()
        if saved is not None:
            states.clear()
            states.update(saved)
        elif not hub_was_off:
            hub.enable_progress_bars()


def _sentences(text: str) -> list[str]:
    from mustat.text import python_docs_sentences

    if text == "pydoc":
        return python_docs_sentences()
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--text {text!r} is neither 'pydoc' nor a file")
    lines = list(dict.fromkeys(s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()))
    if not lines:
        raise ValueError(f"--text {text!r} has no non-empty lines")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run ``mustat oneshot`` with the parsed ``args``; returns the exit status. ``--quiet`` turns
    off every progress bar, transformers' included, for the run only."""
    with hf_progress_bars(not args.quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from mustat.layerwise import oneshot
    from mustat.layerwise.hf import load_encoder, minilm_dir, sentence_embeddings, token_batches
    from mustat.patterns import parse_pattern
    from mustat.text import split

    pattern = parse_pattern(args.pattern, "--pattern")
    if not pattern.structured and args.sparsity is None:
        raise ValueError("give --sparsity (a fraction in [0, 1)) or an N:M --pattern")
    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if pattern.structured and args.sparsity is not None:
        raise ValueError(f"--pattern {pattern} fixes the sparsity at {pattern.sparsity:g}; leave out --sparsity")
    if pattern.structured and args.scope not in (None, "row"):
        raise ValueError(f"--scope {args.scope} does not apply to --pattern {pattern}: every group is fixed")
    if not args.damping > 0:
        raise ValueError(f"--damping must be positive, got {args.damping}")
    for name in ("samples", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.evaluate < 0:
        raise ValueError(f"--evaluate must be 0 or more, got {args.evaluate}")
    if args.swaps < 0:
        raise ValueError(f"--swaps must be 0 (none) or a positive number of 1-swaps per row, got {args.swaps}")
    if args.shots < 1:
        raise ValueError(f"--shots must be 1 (one shot) or more steps, got {args.shots}")
    if args.shots > 1 and pattern.structured:
        raise ValueError(f"--shots {args.shots} prunes in steps of sparsity; --pattern {pattern} fixes every group at "
                         "once: use --shots 1")
    if not 0 <= args.loss_damping <= 1e6 or (args.loss_damping > 0 and args.sigma != "loss"):
        raise ValueError(f"--loss-damping must be in [0, 1e6] and damps the loss's output factor (--sigma loss); got "
                         f"{args.loss_damping} with --sigma {args.sigma}")
    target = str(pattern) if pattern.structured else f"{args.sparsity:g}"
    out = Path(args.out or f"runs/oneshot-{args.method}-{target.replace(':', 'of')}")
    from mustat.causal_lm import is_causal_lm_source
    from mustat.export import export_target

    export = export_target(getattr(args, "export", None), getattr(args, "export_format", None), pattern)
    if is_causal_lm_source(args.model):
        from mustat.layerwise.lm_command import run_causal

        return run_causal(args, target, out, export=export)
    if args.sigma == "loss":
        raise ValueError("--sigma loss needs the model's own loss: here only causal LMs have one (an encoder's "
                         "embeddings have no training loss); use --sigma row or layer")
    path = minilm_dir(Path("runs") / "models") if args.model == "minilm" else Path(args.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a folder saved with save_pretrained, or 'minilm'")
    sentences = _sentences(args.text)
    if args.samples + args.evaluate > len(sentences):
        raise ValueError(f"--samples {args.samples} + --evaluate {args.evaluate} is more than the {len(sentences)} "
                         f"sentences of --text {args.text}")
    cal, held = split(sentences, args.samples, args.evaluate, seed=args.seed)
    model, tok = load_encoder(path)
    update = {"auto": None, "yes": True, "no": False}[args.update]
    eval_batches = token_batches(tok, held, 64, args.max_length) if held else []
    dense = sentence_embeddings(model, eval_batches) if held else None
    report = oneshot(model, token_batches(tok, cal, args.batch_size, args.max_length), method=args.method,
                     sparsity=args.sparsity, pattern=args.pattern, scope=args.scope, update=update,
                     damping=args.damping, sigma=args.sigma, sequential=args.sequential, progress=not args.quiet,
                     allocation=args.allocation, refit=args.refit, swaps=args.swaps, shots=args.shots,
                     loss_damping=args.loss_damping)
    print(report)
    summary = dict(model=str(path), method=args.method, target=target, scope=args.scope, update=update, sigma=args.sigma,
                   allocation=args.allocation, refit=args.refit, swaps=args.swaps, shots=args.shots,
                   samples=args.samples, seed=args.seed, sparsity=report.pruning.sparsity, seconds=report.seconds,
                   passes=report.passes, mean_layer_error=float(report.layers["error"].mean()),
                   skipped=report.skipped, date=time.strftime("%Y-%m-%d"))
    if held:
        emb = sentence_embeddings(model, eval_batches)
        summary["cosine"] = float((emb * dense).sum(1).mean())
        print(f"fidelity on {len(held)} held-out sentences: mean cosine to the dense embeddings "
              f"{summary['cosine']:.4f}")
    from mustat.layerwise.outputs import write_outputs

    return write_outputs(model, tok, report, summary, out, export)
