"""Network-level FDR of Wald pruning on a planted sparse teacher (the hidden-layer issue, part 5).

The teacher (validation.designs "teacher-sparse": 10 inputs, 8 ReLU units, one Gaussian
output, n = 2,000) never reads its last 4 inputs, so 32 of each student's 88 weights are planted
nulls (0 at the teacher's optimum in any gauge and unit order). For each weight decay, ``--datasets`` datasets train one student
each from its own initialisation (Adam lr 0.01, batch 32 drawn with replacement, 300 epochs, the
last 250 tracked; the students stacked into one model). Each estimator's estimates and SEs go
into mustat.wald and mustat.prune_fdr at FDR 0.05 (Benjamini-Hochberg over all 88 weights of
the network); validation.fdr counts false and true discoveries. The exact sandwich at each
student's penalised optimum (damped Newton from the trained weights) is the reference row.
Writes fdr.md and fdr.csv here.

    .venv/bin/python docs/calibration/fdr.py           # 200 datasets, weight decay 1e-3 and 1e-2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mustat._io import atomic_write
from mustat.training import make_optimizer, steps_per_epoch, train_epochs
from mustat.uncertainty import FitContext, TrainingSetup, WindowWarning, make_estimator
from validation.designs import get_design
from validation.fdr import outcome, replicate, summary, unstack
from validation.invariant import StackedMLP, delta_references, split
from validation.newton import newton_fits
from validation.study import data_index

HERE = Path(__file__).parent
SEED = 3            # datasets of its own (the quick study draws seed 1, the full 0, invariant.py 2)
ESTIMATORS = ("pseudo", "calibrated", "batch-means", "curvature")


def run_decay(design, weight_decay: float, args) -> tuple[list[dict], dict]:
    R, S = args.datasets, 32
    data = [design.sample(data_index(SEED, r)) for r in range(R)]
    X64 = torch.tensor(np.stack([a[0] for a in data]))
    y64 = torch.tensor(np.stack([a[1] for a in data]))
    n = X64.shape[1]
    nets = [design.model(SEED * 10_000 + r) for r in range(R)]
    stack = StackedMLP(nets)
    d, h, k = stack.d, stack.h, stack.k
    X, y = X64.transpose(0, 1).float(), y64.T.float()
    opt = make_optimizer("adam", stack.parameters(), lr=0.01, weight_decay=weight_decay)
    setup = TrainingSetup(optimizer="adam", n=n, batch_size=S, window_steps=args.window * steps_per_epoch(n, S),
                          sampler="replacement", weight_decay=weight_decay)
    ests = {lab: make_estimator(lab, stack, setup=setup) for lab in ESTIMATORS}
    t0 = time.perf_counter()
    train_epochs(stack, opt, (X, y), epochs=args.epochs, batch_size=S, sampler="replacement",
                 generator=torch.Generator().manual_seed(SEED * 10_000), loss=design.stacked_loss(),
                 estimators=list(ests.values()), track_epochs=args.window)
    train_s = time.perf_counter() - t0
    ctx = FitContext(X=X, y=y, loss=design.stacked_loss(), optimizer=opt, batch_size=S, weight_decay=weight_decay)
    fitted = {}
    for lab, est in ests.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WindowWarning)      # a refused window gives se = inf: counted
            est.fit(ctx)
        fitted[lab] = (est.estimate(), est.se(), est.diagnostics().get("dof"), est.centre)
    # the exact reference: each student's penalised optimum and its sandwich SEs
    fits = newton_fits(nets[0], design.loss(), X64, y64, start=stack.flat().detach().double(),
                       weight_decay=weight_decay, gtol=1e-8, max_iter=200)
    theta = torch.cat([fits.params[kk].flatten(1) for kk, _ in nets[0].named_parameters()], 1)
    sand = delta_references(theta, X64, y64, design.loss(), torch.zeros(1, d), d=d, h=h, k=k,
                            weight_decay=weight_decay)["sandwich"]["raw"]
    W1, _, W2, _ = split(theta, d, h, k)
    S1, _, S2, _ = split(sand, d, h, k)
    null = {"0.weight": torch.zeros(h, d, dtype=torch.bool), "2.weight": torch.zeros(k, h, dtype=torch.bool)}
    null["0.weight"][:, d - args.null_inputs:] = True
    outcomes = {lab: [] for lab in [*ESTIMATORS, "wald-sandwich"]}
    for r in range(R):
        net = unstack(stack, r)
        for lab, (est, se, dof, _) in fitted.items():
            outcomes[lab].append(outcome(net, replicate(stack, est, r), replicate(stack, se, r), null, dof=dof))
        outcomes["wald-sandwich"].append(outcome(
            net, {"0.weight": W1[r].float(), "2.weight": W2[r].float()},
            {"0.weight": S1[r].float(), "2.weight": S2[r].float()}, null))
    centres = {lab: c for lab, (_, _, _, c) in fitted.items()}
    centres["wald-sandwich"] = "the student's penalised optimum (Newton)"
    rows = [dict(weight_decay=weight_decay, estimator=lab, centre=centres[lab], **summary(o))
            for lab, o in outcomes.items()]
    minimum = fits.minimum if fits.minimum is not None else fits.min_eig > 0
    return rows, dict(weight_decay=weight_decay, train_s=train_s,
                      converged=int(fits.converged_within(sand).sum()), not_minimum=int((~minimum).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=200)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--decays", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    args.null_inputs = 4
    torch.set_num_threads(args.threads)
    design = get_design("teacher-sparse")
    t0 = time.perf_counter()
    rows, infos = [], []
    for wd in args.decays:
        r, info = run_decay(design, wd, args)
        rows += r
        infos.append(info)
        print(info, flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    atomic_write(out / "fdr.csv", lambda f: table.to_csv(f, index=False))
    lines = [f"# Network-level FDR on a planted sparse teacher: {args.datasets} datasets", "",
             f"`.venv/bin/python docs/calibration/fdr.py{''.join(' ' + a for a in sys.argv[1:])}` ({args.datasets} datasets, "
             f"{args.epochs} epochs, window {args.window}), {time.perf_counter() - t0:.0f} s on {platform.machine()} "
             f"with {torch.get_num_threads()} thread(s), {datetime.date.today()}; training "
             + ", ".join(f"{i['train_s']:.0f} s at {i['weight_decay']:g}" for i in infos) + ". Newton from the "
             "trained weights (the wald-sandwich row): "
             + ", ".join(f"{i['converged']} of {args.datasets} converged and {i['not_minimum']} not at a minimum at "
                         f"{i['weight_decay']:g}" for i in infos) + " (every student is scored).", "",
             "`mustat.prune_fdr` at FDR 0.05 over the 88 weights of each student (32 null). Realised FDR: the mean "
             "false discovery proportion over datasets (BH's guarantee; 0 where nothing is kept) with a normal 95% "
             "interval; pooled: false discoveries over all discoveries, with a Wilson interval; P(any false): the "
             "share of datasets with at least one; power: the share of the 56 non-null weights kept.", "",
             "| weight decay | estimator | realised FDR | 95% | pooled false share | Wilson 95% | P(any false) | power |"
             " discoveries |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weight_decay']:g} | {r['estimator']} | {r['fdr']:.3f} | [{r['fdr_lo']:.3f}, "
                     f"{r['fdr_hi']:.3f}] | {r['pooled']:.3f} | [{r['pooled_lo']:.3f}, {r['pooled_hi']:.3f}] | "
                     f"{r['any_false']:.2f} | {r['power']:.3f} | {r['discoveries']} |")
    atomic_write(out / "fdr.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
