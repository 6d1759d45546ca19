"""Group FDR pruning on a planted teacher with known dead units.

The teacher is a layer of 12 units on 6 independent N(0, 1) inputs, ``y = W x + b + N(0, I)``:
6 units are dead (zero row and bias), 6 live with a single input weight each of size 0.1, 0.15,
0.2, 0.3, 0.5 and 1.0 (power from low to certain at n = 320). Unlike hidden units of a deeper
network, these units are identified (no permutation or rescaling maps one onto another), so
"dead" is a property the student can be scored on. Per dataset the student ``nn.Linear(6, 12)``
is trained from its own seed by SGD (lr 0.05, batch 32 drawn with replacement, weight decay
1e-4, 120 epochs, the trajectory estimators tracking the last 100), the weights are set to the
window mean (Polyak-Ruppert averaging: the last iterate's SGD noise would inflate every
statistic), each estimator gives the group Wald tests of the 12 units
(``mustat.structured.group_tests``) of the weights and biases, and Benjamini-Hochberg at
0.05 keeps the significant ones (``fdr_keep``). Reported per estimator over 200 datasets: the
FDR (mean false discovery proportion), the pooled share of kept units that are dead with its
Wilson 95% interval, and the power (share of live units kept) by effect size.

    python docs/structured/fdr.py     # 5 minutes on 2 cores
"""

from __future__ import annotations

import platform
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from mustat._io import atomic_write
from mustat.structured import fdr_keep, group_tests, unit_statistics
from mustat.training import train_epochs
from mustat.uncertainty import FitContext, TrainingSetup, make_estimator

HERE = Path(__file__).parent
N, D, DATASETS = 320, 6, 200
EFFECTS = (0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
DEAD = 6
LR, BATCH, DECAY, EPOCHS, TRACK = 0.05, 32, 1e-4, 120, 100
TRAJECTORY = ("pseudo", "calibrated", "batch-means")
FITTED = ("kfac", "curvature", "wald")


def teacher(seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = np.zeros((len(EFFECTS) + DEAD, D))
    for o, e in enumerate(EFFECTS):
        W[o, o % D] = e
    X = rng.standard_normal((N, D))
    Y = X @ W.T + rng.standard_normal((N, W.shape[0]))
    return torch.from_numpy(X).float(), torch.from_numpy(Y).float(), np.abs(W).sum(1) == 0


def half_sse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The unit-variance Gaussian NLL per sample, up to a constant."""
    return 0.5 * (out - t).square().sum(1).mean()


def one(seed: int) -> list[dict]:
    X, Y, dead = teacher(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        model = nn.Linear(D, len(dead))
    model = nn.Sequential(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=DECAY)
    steps = N // BATCH * TRACK
    setup = TrainingSetup(optimizer="sgd", n=N, batch_size=BATCH, window_steps=steps, weight_decay=DECAY)
    params = ["0.weight", "0.bias"]
    trackers = {name: make_estimator(name, model, setup=setup, params=params) for name in TRAJECTORY}
    train_epochs(model, opt, (X, Y), epochs=EPOCHS, batch_size=BATCH, generator=torch.Generator().manual_seed(seed),
                 loss=half_sse, estimators=list(trackers.values()), track_epochs=TRACK)
    # the last SGD iterate carries SGD's own noise on top of the sampling error: a first run, which
    # tested it, gave the exact K-FAC block an FDR of 0.089. The window mean (Polyak-Ruppert
    # averaging), which the trajectory estimators centre on as well, was chosen after seeing that
    # run, and is what this study tests.
    with torch.no_grad():
        for name, value in trackers["batch-means"].estimate().items():
            model.get_parameter(name).copy_(value)
    context = FitContext(X=X, y=Y, loss=half_sse, optimizer=opt, batch_size=BATCH, weight_decay=DECAY)
    rows = []
    for name in TRAJECTORY + FITTED:
        est = trackers.get(name) or make_estimator(name, model, setup=setup,
                                                  params=["0.weight"] if name == "kfac" else params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(context)
        tests = fdr_keep(group_tests(model, X[:1], unit_statistics(model, estimator=est), ignored_layers=[]))
        keep = tests["keep"].to_numpy()
        row = dict(seed=seed, estimator=name, kept=int(keep.sum()), false=int((keep & dead).sum()))
        for o, e in enumerate(EFFECTS):
            row[f"live_{e:g}"] = bool(keep[o])
        rows.append(row)
    return rows


def report(results: pd.DataFrame) -> str:
    lines = ["# Group FDR on a planted teacher", "",
             f"Produced by `python docs/structured/fdr.py` on {date.today()} ({platform.machine()}, torch "
             f"{torch.__version__}): {results['seed'].nunique()} datasets, BH at 0.05 over the 12 units of each "
             f"(6 dead). FDR: mean false discovery proportion (0 when nothing is kept). Pooled: dead units among "
             "all units kept, with its Wilson 95% interval. Power: share of datasets where the live unit of "
             "that effect size is kept.", "",
             "| estimator | structure | FDR | pooled dead/kept [Wilson 95%] | " +
             " | ".join(f"power {e:g}" for e in EFFECTS) + " |",
             "|---|---|---|---|" + "---|" * len(EFFECTS)]
    for name, rows in results.groupby("estimator", sort=False):
        fdp = (rows["false"] / rows["kept"].clip(lower=1)).mean()
        false, kept = int(rows["false"].sum()), int(rows["kept"].sum())
        lo, hi = proportion_confint(false, kept, alpha=0.05, method="wilson")
        power = " | ".join(f"{rows[f'live_{e:g}'].mean():.2f}" for e in EFFECTS)
        structure = "block (exact here)" if name == "kfac" else "diagonal"
        lines.append(f"| {name} | {structure} | {fdp:.3f} | {false / kept:.3f} [{lo:.3f}, {hi:.3f}] | {power} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)  # a 6 -> 12 layer: threads only contend
    table = HERE / "fdr_results.csv"
    done = pd.read_csv(table) if table.exists() else pd.DataFrame()
    seen = set(done["seed"]) if len(done) else set()
    rows = done.to_dict("records")
    for seed in range(DATASETS):
        if seed in seen:
            continue
        rows.extend(one(seed))
        if seed % 20 == 19 or seed == DATASETS - 1:
            atomic_write(table, lambda t: pd.DataFrame(rows).to_csv(t, index=False))
            print(f"{seed + 1}/{DATASETS} datasets", flush=True)
    results = pd.DataFrame(rows)
    text = report(results)
    atomic_write(HERE / "fdr.md", lambda t: Path(t).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
