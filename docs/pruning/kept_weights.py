"""Which weights each criterion keeps at the benchmark's last round, for the LeNet-300-100 (mlp)
and LeNet-5 cells of a finished pruning benchmark: kept weights per tensor (``kept <module>``),
and for the mlp the share of the first layer's kept weights that sit on input pixels constant
over the training set (they cannot change any output) and the first hidden layer's *live* units
(at least one kept input weight and one kept output weight). Reads the cells' final checkpoints;
prints a table (mean over seeds, min and max of the kept counts) and writes it as CSV.

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
        if settings["model"] not in ("mlp", "lenet5"):
            continue
        seed = settings["seeds"][0]
        X = load(settings["dataset"], seed=seed).X_train.flatten(1)
        for crit in CRITERIA:
            state = torch.load(run / "checkpoints" / f"seed{seed}-{crit}.pt", weights_only=False)["model"]
            masks = {k.split(".")[0]: v.bool() for k, v in state.items() if k.endswith(".mask")}
            row = dict(dataset=settings["dataset"], model=settings["model"], scope=settings["scope"],
                       weight_decay=settings["train"]["weight_decay"], criterion=crit, seed=seed,
                       **{f"kept {m}": int(v.sum()) for m, v in masks.items()})
            if settings["model"] == "mlp":
                first, second = masks["1"], masks["3"]
                row.update(layer1_on_constant_pixels=float(first[:, X.std(0) == 0].sum() / first.sum()),
                           live_units_layer1=int((first.any(1) & second.any(0)).sum()))
            rows.append(row)
    df = pd.DataFrame(rows)
    keys = ["dataset", "model", "scope", "weight_decay", "criterion"]
    kept = [c for c in df if c.startswith("kept ")]
    table = df.groupby(keys, sort=False).agg(
        n_seeds=("seed", "nunique"),
        **{f"{c} mean": (c, "mean") for c in kept}, **{f"{c} min": (c, "min") for c in kept},
        **{f"{c} max": (c, "max") for c in kept},
        layer1_on_constant_pixels=("layer1_on_constant_pixels", "mean"),
        live_units_layer1=("live_units_layer1", "mean")).round(3).dropna(axis=1, how="all").reset_index()
    atomic_write(args.csv, lambda p: table.to_csv(p, index=False))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
