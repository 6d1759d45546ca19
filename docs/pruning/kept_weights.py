"""Which weights each criterion keeps at the benchmark's last round, for the LeNet-300-100 (mlp)
cells of a finished pruning benchmark: kept weights per tensor, the share of the first layer's
kept weights that sit on input pixels constant over the training set (they cannot change any
output), and the first hidden layer's *live* units (at least one kept input weight and one kept
output weight). Reads the cells' final checkpoints; prints a table (mean over seeds) and writes
it as CSV.

    .venv/bin/python docs/pruning/kept_weights.py runs/pruning-full docs/pruning/full/kept_weights.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from mustat._io import atomic_write
from mustat.data import load

CRITERIA = ("magnitude", "gradient-weight", "mu-pseudo", "mu-batch-means", "mu-curvature")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", type=Path, help="the --out folder of a finished mustat benchmark")
    parser.add_argument("csv", type=Path, help="where to write the table")
    args = parser.parse_args()
    rows = []
    for run in sorted((args.benchmark / "runs").iterdir()):
        settings = json.loads((run / "params.json").read_text())["settings"]
        if settings["model"] != "mlp":
            continue
        seed = settings["seeds"][0]
        X = load(settings["dataset"], seed=seed).X_train.flatten(1)
        constant = X.std(0) == 0
        for crit in CRITERIA:
            state = torch.load(run / "checkpoints" / f"seed{seed}-{crit}.pt", weights_only=False)["model"]
            masks = [state[f"{i}.parametrizations.weight.0.mask"].bool() for i in (1, 3, 5)]
            live = masks[0].any(1) & masks[1].any(0)
            rows.append(dict(dataset=settings["dataset"], scope=settings["scope"],
                             weight_decay=settings["train"]["weight_decay"], criterion=crit, seed=seed,
                             kept_layer1=int(masks[0].sum()), kept_layer2=int(masks[1].sum()),
                             kept_layer3=int(masks[2].sum()),
                             layer1_on_constant_pixels=float(masks[0][:, constant].sum() / masks[0].sum()),
                             live_units_layer1=int(live.sum())))
    table = (pd.DataFrame(rows).groupby(["dataset", "scope", "weight_decay", "criterion"], sort=False)
             .agg(n_seeds=("seed", "nunique"), kept_layer1=("kept_layer1", "mean"), kept_layer2=("kept_layer2", "mean"),
                  kept_layer3=("kept_layer3", "mean"), layer1_on_constant_pixels=("layer1_on_constant_pixels", "mean"),
                  live_units_layer1=("live_units_layer1", "mean")).round(3).reset_index())
    atomic_write(args.csv, lambda p: table.to_csv(p, index=False))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
