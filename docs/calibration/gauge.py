"""Gauge-fixed trajectory estimators on the study's 6-8-1 regression teacher: does mapping each
snapshot to its balanced orbit point (``gauge="balanced"``, :mod:`mustat.gauge`) bring the
trajectory SEs and their centres to the exact penalised sandwich at the optimum?

For each weight decay (1e-3, 1e-2) and seed (0-4): dataset ``seed`` of the ``teacher-regression``
design (2,000 samples), a student from its own initialisation trained as the study trains it
(Adam lr 0.01, S = 32 drawn with replacement, 300 epochs with the last 250 tracked, 15,750
steps, and 800 epochs with the last 750 tracked, 47,250 steps),
with ``pseudo`` and ``batch-means`` each raw and balanced, centred on the window mean. Reference:
the student polished by Newton to its penalised optimum (balanced, as every penalised optimum
is), and the exact penalised sandwich SE there (``mustat.hessian_se``). Per estimator, pooled over
the 56 weights of the 5 fits of a setting: the median SE ratio to the sandwich, its interquartile range, and the
median distance of the interval centre from the optimum in sandwich SEs. Writes
``docs/calibration/gauge.md``.

    python docs/calibration/gauge.py        # about 20 minutes on 2 idle cores (40 with other jobs)
"""

from __future__ import annotations

import itertools
import platform
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

from mustat._io import atomic_write
from mustat._params import select
from mustat.training import make_optimizer, steps_per_epoch, train_epochs
from mustat.uncertainty import FitContext, TrainingSetup, WindowWarning, make_estimator
from validation.designs import get_design
from validation.references import polish, wald_references

HERE = Path(__file__).parent
DECAYS = (1e-3, 1e-2)
SEEDS = range(5)
ESTIMATORS = {"pseudo": ("pseudo", {}), "pseudo, balanced": ("pseudo", {"gauge": "balanced"}),
              "batch-means": ("batch-means", {}), "batch-means, balanced": ("batch-means", {"gauge": "balanced"})}
#: (epochs, tracked epochs): the study's hidden-layer setting, and the longer run the issue's probe used
LENGTHS = ((300, 250), (800, 750))
S, LR = 32, 0.01


def _fit(design, weight_decay: float, seed: int, epochs: int, window: int
         ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None:
    X, y, _ = design.sample(seed)
    X32, y32 = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    model, loss = design.model(10_000 * seed), design.loss()
    opt = make_optimizer("adam", model.parameters(), lr=LR, weight_decay=weight_decay)
    setup = TrainingSetup(optimizer="adam", n=len(y), batch_size=S, window_steps=window * steps_per_epoch(len(y), S),
                          weight_decay=weight_decay)
    ests = {}
    for label, (name, options) in ESTIMATORS.items():
        options = {**options, **({"center": "mean"} if name == "pseudo" else {})}
        ests[label] = make_estimator(name, model, setup=setup, **options)
    train_epochs(model, opt, (X32, y32), epochs=epochs, batch_size=S, generator=torch.Generator().manual_seed(seed),
                 loss=loss, estimators=list(ests.values()), track_epochs=window)
    ctx = FitContext(X=X32, y=y32, loss=loss, optimizer=opt, batch_size=S, weight_decay=weight_decay)
    names = select(model, None)
    fitted, fit = polish(model, loss, torch.tensor(X), torch.tensor(y), weight_decay=weight_decay, gtol=1e-10,
                         max_iter=2000)
    if float(fit.min_eig[0]) <= 0:
        return None                          # on a ReLU kink: no Wald reference exists there
    sandwich = wald_references(fitted, loss, torch.tensor(X), torch.tensor(y), weight_decay=weight_decay)["sandwich"]
    theta = dict(fitted.named_parameters())
    flat = lambda d: np.concatenate([d[n].detach().double().flatten().numpy() for n in names])  # noqa: E731
    out = {}
    for label, est in ests.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WindowWarning)
            est.fit(ctx)
        out[label] = (flat(est.estimate()), flat(est.se()), flat(theta), flat(sandwich))
    return out


def main() -> None:
    design = get_design("teacher-regression")
    lines = ["# Gauge-fixed trajectory estimators on the 6-8-1 regression teacher", "",
             f"Produced by `python docs/calibration/gauge.py` on {date.today()} ({platform.machine()}, torch "
             f"{torch.__version__}). Adam lr {LR}, S = {S} with replacement, epochs and tracked (last) epochs as "
             f"given; seeds {SEEDS.start}-{SEEDS.stop - 1}, dataset = seed. Reference: the exact penalised sandwich "
             "SE at the Newton-polished optimum nearest each student. Ratio: estimator SE / sandwich SE, median "
             "[quartiles] over every tracked weight of every fit. Centre: median |interval centre - optimum| / "
             "sandwich SE.", "",
             "| epochs / tracked | weight decay | estimator | fits | median SE ratio | quartiles | median centre "
             "distance (SEs) |", "|---|---|---|---|---|---|---|"]
    for (epochs, window), wd in itertools.product(LENGTHS, DECAYS):
        pooled: dict[str, list] = {k: [] for k in ESTIMATORS}
        fits = 0
        for seed in SEEDS:
            res = _fit(design, wd, seed, epochs, window)
            print(f"{epochs} epochs, weight decay {wd:g}, seed {seed}: {'done' if res else 'no Wald reference (kink)'}", flush=True)
            if res is None:
                continue
            fits += 1
            for label, (centre, se, theta, ref) in res.items():
                pooled[label].append((se / ref, np.abs(centre - theta) / ref))
        for label, parts in pooled.items():
            ratio = np.concatenate([p[0] for p in parts])
            dist = np.concatenate([p[1] for p in parts])
            q1, med, q3 = np.quantile(ratio, [0.25, 0.5, 0.75])
            lines.append(f"| {epochs} / {window} | {wd:g} | {label} | {fits} | {med:.3f} | [{q1:.3f}, {q3:.3f}] | {np.median(dist):.2f} |")
            print(lines[-1], flush=True)
    atomic_write(HERE / "gauge.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
