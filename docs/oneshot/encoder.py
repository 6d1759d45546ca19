"""One-shot pruning of the pretrained sentence encoder all-MiniLM-L6-v2 (BERT, 6 layers, 36 Linear
layers, 10.6M of its 22.7M weights), with no retraining.

Calibration and evaluation text is the Python documentation (``pydoc_data.topics``), split by
sentence: a fixed held-out set of 512 sentences (the first 512 of a seed-0 permutation) and, per
calibration seed, 128 sentences drawn from the rest. Fidelity to the dense model on the held-out
sentences: mean cosine of the sentence embeddings (mean pooling, normalised), and top-1
nearest-neighbour agreement (the share of sentences whose nearest other sentence is the same as
under the dense embeddings). Also the mean per-layer relative reconstruction error on the
calibration inputs, and the seconds of each pruning. Rows are appended to ``results.csv`` as they
finish (atomically); a rerun skips the rows already there.

    python docs/oneshot/encoder.py            # every method, 3 calibration seeds (25 min on 2 cores)
    python docs/oneshot/encoder.py --report   # only rewrite summary.md from results.csv
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mustat._io import atomic_write
from mustat.layerwise import oneshot
from mustat.layerwise.hf import load_encoder, minilm_dir, sentence_embeddings, token_batches
from mustat.text import python_docs_sentences, split

HERE = Path(__file__).parent
CACHE = Path(__file__).resolve().parents[2] / "runs" / "models"
UNSTRUCTURED = (0.5, 0.6, 0.7)
NM = ("2:4", "4:8")
#: label -> oneshot options; magnitude needs no calibration (one "seed")
METHODS = {
    "magnitude": dict(method="magnitude", scope="row"),
    "wanda": dict(method="wanda", scope="row"),
    "sparsegpt": dict(method="sparsegpt", scope="layer"),       # the paper's: each block of columns at the target
    "sparsegpt (row)": dict(method="sparsegpt", scope="row"),
    "mu (row)": dict(method="mu", scope="row"),
    "mu (layer)": dict(method="mu", scope="layer"),
    "mu (global)": dict(method="mu", scope="global"),
    "mu + update (layer)": dict(method="mu", scope="layer", update=True),
    "mu + update (global)": dict(method="mu", scope="global", update=True),
    "mu[sigma layer] + update (global)": dict(method="mu", scope="global", update=True, sigma="layer"),
    "mu-sandwich + update (row)": dict(method="mu-sandwich", scope="row", update=True),
}
#: N:M fixes every group, so the scope is moot; mu + update would be sparsegpt exactly (sigma is constant in a row)
NM_METHODS = {"magnitude": dict(method="magnitude"), "wanda": dict(method="wanda"),
              "sparsegpt": dict(method="sparsegpt"), "mu": dict(method="mu"),
              "mu-sandwich + update": dict(method="mu-sandwich", update=True)}


def nn_agreement(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    def nearest(e):
        s = e @ e.T
        s.fill_diagonal_(-2.0)
        return s.argmax(1)
    return float((nearest(dense) == nearest(pruned)).double().mean())


def configs(seeds):
    for target in [*UNSTRUCTURED, *NM]:
        table = METHODS if isinstance(target, float) else NM_METHODS
        for label, opts in table.items():
            for seed in (seeds[:1] if opts["method"] == "magnitude" else seeds):
                kw = dict(opts, **({"sparsity": target} if isinstance(target, float) else {"pattern": target}))
                yield label, str(target), seed, kw


def run(seeds, out: Path) -> None:
    torch.manual_seed(0)
    model, tok = load_encoder(minilm_dir(CACHE))
    sentences = python_docs_sentences()
    pool, held_out = split(sentences, len(sentences) - 512, 512, seed=0)
    eval_batches = token_batches(tok, held_out, 64)
    dense = sentence_embeddings(model, eval_batches)
    done = set()
    rows = []
    if out.exists():
        old = pd.read_csv(out)
        rows = old.to_dict("records")
        done = {(r["method"], str(r["target"]), int(r["seed"])) for r in rows}
    for label, target, seed, kw in configs(seeds):
        if (label, target, seed) in done:
            continue
        cal, _ = split(pool, 128, 0, seed=seed)
        batches = token_batches(tok, cal, 32)
        pruned = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = oneshot(pruned, batches, **kw)
        emb = sentence_embeddings(pruned, eval_batches)
        rows.append(dict(method=label, target=target, seed=seed, cosine=float((emb * dense).sum(1).mean()),
                         nn_agreement=nn_agreement(dense, emb), error=float(report.layers["error"].mean()),
                         sparsity=report.pruning.sparsity, seconds=report.seconds, passes=report.passes,
                         layers=len(report.layers), threads=torch.get_num_threads()))
        print(f"{label:30s} {target:5s} seed {seed}: cosine {rows[-1]['cosine']:.4f}  nn {rows[-1]['nn_agreement']:.3f} "
              f"({report.seconds:.1f} s)", flush=True)
        frame = pd.DataFrame(rows)
        atomic_write(out, lambda p, f=frame: f.to_csv(p, index=False))


def summary(results: Path, dest: Path) -> None:
    r = pd.read_csv(results)
    r["target"] = r["target"].astype(str)
    order = [str(t) for t in UNSTRUCTURED] + list(NM)
    g = r.groupby(["target", "method"])
    table = g.agg(cosine=("cosine", "mean"), cosine_sd=("cosine", "std"), nn=("nn_agreement", "mean"),
                  nn_sd=("nn_agreement", "std"), error=("error", "mean"), seconds=("seconds", "median"),
                  seeds=("seed", "nunique")).reset_index()
    lines = [f"# One-shot pruning of all-MiniLM-L6-v2 ({date.today()}, {platform.machine()}, "
             f"{int(r['threads'].iloc[0])} threads)", "",
             "Command: `python docs/oneshot/encoder.py`. Mean over calibration seeds (sd in brackets; magnitude "
             "needs no calibration). Cosine and nearest-neighbour agreement with the dense model's embeddings on "
             "512 held-out sentences; error: mean relative reconstruction error of the 36 layers on the "
             "calibration inputs.", ""]
    for t in order:
        sub = table[table.target == t].sort_values("cosine", ascending=False)
        if sub.empty:
            continue
        lines += [f"## {t if ':' in t else f'{float(t):.0%} unstructured'}", "",
                  "| method | cosine | NN agreement | layer error | seconds | seeds |", "|---|---|---|---|---|---|"]
        for _, x in sub.iterrows():
            sd = "" if np.isnan(x.cosine_sd) else f" ({x.cosine_sd:.4f})"
            nsd = "" if np.isnan(x.nn_sd) else f" ({x.nn_sd:.3f})"
            lines.append(f"| {x.method} | {x.cosine:.4f}{sd} | {x.nn:.3f}{nsd} | {x.error:.4f} | {x.seconds:.1f} | "
                         f"{int(x.seeds)} |")
        lines.append("")
    atomic_write(dest, lambda p: Path(p).write_text("\n".join(lines)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds (default 0,1,2)")
    ap.add_argument("--out", type=Path, default=HERE / "results.csv")
    ap.add_argument("--report", action="store_true", help="only rewrite summary.md from the results")
    args = ap.parse_args()
    if not args.report:
        t = time.perf_counter()
        run([int(s) for s in args.seeds.split(",")], args.out)
        print(f"done in {time.perf_counter() - t:.0f} s")
    summary(args.out, HERE / "summary.md")


if __name__ == "__main__":
    main()
