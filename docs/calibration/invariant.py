"""Coverage of gauge-invariant targets on the regression teacher (6-8-1, ReLU), over many
datasets with independent student initialisations (the hidden-layer issue, part 2).

For each weight decay, ``--datasets`` fresh datasets from the teacher (n = 2,000) train one
student each from its own seeded initialisation (Adam lr 0.01, batch 32 drawn with
replacement, ``--epochs`` epochs, the last ``--window`` tracked; all students stacked into one
model, validation.invariant.StackedMLP). Four targets (validation.invariant): the output f at
10 fixed test points, the 48 path weights, the 80 unit contributions at the test points, and the
65 balanced weights. Rows:

* batch means of the target's trajectory (runs during training; Student-t on 19 dof), centred
  at the target's window mean;
* the window SD of the target (the pseudo bootstrap's rule), same centre, normal intervals;
* the exact delta-method sandwich and observed information at each student's penalised
  optimum (damped Newton from the trained weights), centred there.

The truth is the population penalised optimum: Newton from the teacher on 400,000 samples
(its own sampling error is 7% of one dataset's SD). Every student counts; where each one ended
is reported: at the optimum Newton reaches from the teacher's weights on the same dataset
(every matched balanced weight within half a sandwich SE of it) or at another local optimum,
and the objective's difference between the two. Writes invariant.md and invariant.csv here.

    .venv/bin/python docs/calibration/invariant.py            # 200 datasets, two decays
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mustat._io import atomic_write
from mustat.training import make_optimizer, steps_per_epoch, train_epochs
from validation.designs import get_design
from validation.estimators import Setting
from validation.invariant import (
    StackedMLP,
    TargetTracker,
    coverage_table,
    delta_references,
    forward,
    match_to,
    permute,
    targets,
)
from validation.newton import newton_fits
from validation.study import data_index

HERE = Path(__file__).parent
SEED = 2            # a study seed of its own: datasets disjoint from the quick (1) and full (0) studies
GROUPS = {"f": "f(x) at 10 test points", "path": "path weights", "unit": "unit contributions at the test points",
          "weight": "balanced weights"}


def population_optimum(design, weight_decay: float, n: int, seed: int) -> torch.Tensor:
    """The penalised optimum on ``n`` samples of the teacher, from the teacher's weights."""
    teacher = design.teacher()
    rng = np.random.default_rng(seed)
    X = torch.tensor(rng.standard_normal((n, teacher[0].in_features)))
    with torch.no_grad():
        y = teacher(X)[:, 0] + torch.tensor(rng.standard_normal(n))
    fits = newton_fits(teacher, design.loss(), X[None], y[None], weight_decay=weight_decay, gtol=1e-10,
                       max_iter=100)
    # its SD at this n is about 0.07 of one dataset's; a drift far below that is converged
    if not bool(fits.converged_within(torch.full_like(fits.drift[0], 1e-4))[0]):
        raise RuntimeError(f"the population optimum did not converge (gradient {float(fits.grad_max[0]):.2g}, "
                           f"drift {float(fits.drift.abs().max()):.2g})")
    return torch.cat([fits.params[k][0].flatten() for k, _ in teacher.named_parameters()])


def run_decay(design, weight_decay: float, args) -> tuple[list[dict], dict]:
    setting = Setting("adam", 0.01, weight_decay=weight_decay, batch_size=32, epochs=args.epochs, window=args.window)
    R = args.datasets
    data = [design.sample(data_index(SEED, r)) for r in range(R)]
    X64 = torch.tensor(np.stack([a[0] for a in data]))              # (R, n, d)
    y64 = torch.tensor(np.stack([a[1] for a in data]))
    n = X64.shape[1]
    nets = [design.model(SEED * 10_000 + r) for r in range(R)]
    d, h, k = nets[0][0].in_features, nets[0][0].out_features, nets[0][2].out_features
    model = StackedMLP(nets)
    X_test = torch.tensor(np.random.default_rng(7).standard_normal((10, d)))
    window_steps = args.window * steps_per_epoch(n, setting.batch_size)
    tracker = TargetTracker(model, X_test, batch_steps=window_steps // 20)
    opt = make_optimizer("adam", model.parameters(), lr=setting.lr, weight_decay=weight_decay)
    t0 = time.perf_counter()
    train_epochs(model, opt, (X64.transpose(0, 1).float(), y64.T.float()), epochs=setting.epochs,
                 batch_size=setting.batch_size, sampler="replacement",
                 generator=torch.Generator().manual_seed(SEED * 10_000), loss=design.stacked_loss(),
                 estimators=[tracker], track_epochs=setting.window)
    train_s = time.perf_counter() - t0
    traj = tracker.result(n, setting.batch_size)
    # each student's penalised optimum, from its trained weights
    fits = newton_fits(nets[0], design.loss(), X64, y64, start=model.flat().detach().double(),
                       weight_decay=weight_decay, gtol=1e-8, max_iter=200)
    theta_hat = torch.cat([fits.params[kk].flatten(1) for kk, _ in nets[0].named_parameters()], 1)
    refs = delta_references(theta_hat, X64, y64, design.loss(), X_test, d=d, h=h, k=k, weight_decay=weight_decay)
    theta_star = population_optimum(design, weight_decay, args.population, seed=SEED)
    perm = match_to(theta_hat, theta_star, d, h, k)
    truth = {g: v[0] for g, v in targets(theta_star[None], X_test, d, h, k).items()}
    at_hat = targets(theta_hat, X_test, d, h, k)

    def aligned(group, values):
        return permute(group, values, perm, d=d, h=h, k=k, m=len(X_test)).numpy()

    # where the student ends: the optimum Newton reaches from the teacher's weights on the same
    # dataset, or another one (its objective, and its largest matched balanced-weight gap in SEs)
    teacher = design.teacher()
    from_teacher = newton_fits(teacher, design.loss(), X64, y64, weight_decay=weight_decay, gtol=1e-8, max_iter=200)
    theta_t = torch.cat([from_teacher.params[kk].flatten(1) for kk, _ in teacher.named_parameters()], 1)
    bal_t = targets(theta_t, X_test, d, h, k)["weight"]
    se_hat = refs["sandwich"]["weight"]

    def gap_of(r):
        perm_r = match_to(theta_hat[r:r + 1], theta_t[r], d, h, k)
        diff = permute("weight", at_hat["weight"][r:r + 1], perm_r, d=d, h=h, k=k, m=len(X_test))[0] - bal_t[r]
        return (diff.abs() / permute("weight", se_hat[r:r + 1], perm_r, d=d, h=h, k=k, m=len(X_test))[0]).max()

    gap = torch.stack([gap_of(r) for r in range(R)]).numpy()

    def objective(theta):
        out = torch.stack([forward(theta[r], X64[r], d, h, k)[:, 0] for r in range(R)])
        return ((out - y64).square().mean(1) / 2 + weight_decay / 2 * theta.square().sum(1)).numpy()

    excess = objective(theta_hat) - objective(theta_t)
    hat = {g: aligned(g, at_hat[g]) for g in GROUPS}
    mc_sd = {g: hat[g].std(0, ddof=1) for g in GROUPS}
    rows = []
    for g in GROUPS:
        t = truth[g].numpy()
        sd = mc_sd[g]
        rules = {
            "batch means (trajectory)": (aligned(g, traj[g]["mean"]), aligned(g, traj[g]["bm_se"]), int(traj[g]["dof"])),
            "window SD (trajectory)": (aligned(g, traj[g]["mean"]), aligned(g, traj[g]["sd"]), None),
            "sandwich (exact, at the optimum)": (hat[g], aligned(g, refs["sandwich"][g]), None),
            "observed information (exact)": (hat[g], aligned(g, refs["observed"][g]), None),
        }
        # entries the truth pins down: balanced weights of the output bias etc. all count; an entry
        # with no sampling spread (SD 0) has no interval to score
        live = sd > 0
        for name, (centre, se, dof) in rules.items():
            c, s = centre[:, live], se[:, live]
            cov = coverage_table(c, s, np.broadcast_to(t[live], c.shape), dof)
            # an SE that does not exist (NaN: H not positive definite at a kink minimum) is counted, and
            # the ratio is over the SEs that exist
            ratio = np.nanmedian(np.where(np.isfinite(s), s, np.nan), 0) / sd[live]
            bias = np.abs(c.mean(0) - t[live]) / sd[live]
            rows.append(dict(weight_decay=weight_decay, target=GROUPS[g], rule=name, **cov,
                             se_ratio_median=float(np.nanmedian(ratio)), se_ratio_lo=float(np.nanquantile(ratio, 0.1)),
                             se_ratio_hi=float(np.nanquantile(ratio, 0.9)), centre_bias_median=float(np.median(bias)),
                             no_se=float((~np.isfinite(s)).mean()), datasets=R))
    info = dict(weight_decay=weight_decay, train_s=train_s, datasets=R,
                converged=int(fits.converged_within(refs["sandwich"]["raw"]).sum()),
                not_minimum=int((~(fits.minimum if fits.minimum is not None else fits.min_eig > 0)).sum()),
                truth_mean_dev=float(np.median(np.abs(hat["f"].mean(0) - truth["f"].numpy()) / mc_sd["f"])),
                same_optimum=int((gap <= 0.5).sum()), gap_median=float(np.median(gap)),
                lower=int((excess < 0).sum()), excess_q=[float(q) for q in np.quantile(excess, [0.1, 0.5, 0.9])])
    return rows, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=200)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--population", type=int, default=400_000, help="samples of the population optimum")
    p.add_argument("--decays", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the stacked students are small)")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    design = get_design("teacher-regression")
    t0 = time.perf_counter()
    rows, infos = [], []
    for wd in args.decays:
        r, info = run_decay(design, wd, args)
        rows += r
        infos.append(info)
        print(info, flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    atomic_write(out / "invariant.csv", lambda f: table.to_csv(f, index=False))
    lines = [f"# Invariant targets on the regression teacher: coverage over {args.datasets} datasets", "",
             f"`.venv/bin/python docs/calibration/invariant.py{''.join(' ' + a for a in sys.argv[1:])}` ({args.datasets} datasets, "
             f"{args.epochs} epochs, window {args.window}), {time.perf_counter() - t0:.0f} s on {platform.machine()} with "
             f"{torch.get_num_threads()} threads, {datetime.date.today()}.", "",
             "Each student trains from its own initialisation on its own dataset. Coverage is of 95% intervals "
             "of the population penalised optimum's target; SE ratio: median over replicates of the SE, over the "
             "Monte-Carlo SD of the targets at the students' optima (median and 10-90% range over entries); "
             "centre bias: |mean centre - truth| in Monte-Carlo SDs (median over entries).", "",
             "Where the students end, against Newton from the teacher's weights on the same dataset: how many "
             "reach that optimum (every matched balanced weight within 0.5 SE), the median largest gap in SEs, "
             "how many reach a lower objective, and the objective's difference (10/50/90% quantiles).", "",
             "Newton from each student's trained weights: how many fits converged (at a minimum and moving less "
             "than 0.1 sandwich SE) and how many stopped at a point that is not a minimum; every student is scored.", "",
             "| weight decay | training (s) | Newton converged | not a minimum | at the teacher-start optimum | "
             "gap median (SEs) | lower objective | objective difference | median abs(mean f - truth) (MC SDs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {i['weight_decay']:g} | {i['train_s']:.0f} | {i['converged']} | {i['not_minimum']} | "
              f"{i['same_optimum']} of {i['datasets']} | "
              f"{i['gap_median']:.2g} | {i['lower']} | {', '.join(f'{q:.1e}' for q in i['excess_q'])} | "
              f"{i['truth_mean_dev']:.2f} |" for i in infos]
    lines += ["", "| weight decay | target | rule | coverage | Wilson 95% | intervals | SE ratio median [10%, 90%] | "
                  "centre bias | width median | no SE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weight_decay']:g} | {r['target']} | {r['rule']} | {r['coverage']:.3f} | "
                     f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['intervals']} | {r['se_ratio_median']:.2f} "
                     f"[{r['se_ratio_lo']:.2f}, {r['se_ratio_hi']:.2f}] | {r['centre_bias_median']:.2f} | "
                     f"{r['width_median']:.3g} | {r['no_se']:.3f} |")
    atomic_write(out / "invariant.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
