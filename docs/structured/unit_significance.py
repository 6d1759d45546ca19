"""How significant are the units of a trained network? The numbers behind "ranking by p-value
empties the wide layers" (docs/REPRODUCTION.md section 6).

For the benchmark's dense LeNet-5 (MNIST-5k, seed 0, the same training as
``docs/structured/benchmark.py``; its cached state is reused when present), prints per layer
the units' degrees of freedom, median chi-square statistic, median p-value and the share
significant at 0.05, for the K-FAC block and the diagonal curvature statistics, and writes the
table to ``docs/structured/unit_significance.md``.

    python docs/structured/unit_significance.py      # under a minute on 2 cores
"""

from __future__ import annotations

import platform
from datetime import date
from pathlib import Path

import numpy as np
import torch

from mustat._io import atomic_write
from mustat.config import TrainConfig
from mustat.data import load
from mustat.structured import unit_statistics
from mustat.structured.schedule import _context, _dense, _estimator

HERE = Path(__file__).parent
RUNS = Path(__file__).resolve().parents[2] / "runs" / "structured" / "lenet5"


def main() -> None:
    train = TrainConfig(epochs=15, retrain_epochs=3, track_epochs=3)
    data = load("mnist5k", seed=0)
    RUNS.mkdir(parents=True, exist_ok=True)
    model, _ = _dense("lenet5", data, train, 0, [], RUNS / "dense-seed0.pt", None)
    opt = train.make_optimizer(model.parameters())
    lines = ["# Unit significance in the benchmark's dense LeNet-5", "",
             f"Produced by `python docs/structured/unit_significance.py` on {date.today()} ({platform.machine()}, "
             f"torch {torch.__version__}): MNIST-5k, seed 0, Adam with weight decay 1e-3, 15 epochs. Per layer, "
             "over its output units: degrees of freedom, median chi-square, median p-value, share with p < 0.05.", "",
             "| estimator | layer | units | dof | median chi2 | median p | share p < 0.05 |",
             "|---|---|---|---|---|---|---|"]
    for name in ("kfac", "curvature"):
        est = _estimator(name, model, train, len(data.y_train)).fit(_context(model, data, opt, train))
        stats = unit_statistics(model, estimator=est)
        p = stats.pvalues()
        for layer in stats.chi2:
            lines.append(f"| {name} | {layer} | {len(p[layer])} | {np.median(stats.dof[layer]):.0f} | "
                         f"{np.median(stats.chi2[layer]):.3g} | {np.median(p[layer]):.3g} | "
                         f"{np.mean(p[layer] < 0.05):.2f} |")
    text = "\n".join(lines) + "\n"
    atomic_write(HERE / "unit_significance.md", lambda t: Path(t).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
