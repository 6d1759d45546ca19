"""Coverage against a local estimand on the regression teacher (6-8-1, ReLU): issue 35, items 1-2.

Two designs, each at weight decay 1e-3 and 1e-2, ``--datasets`` fresh datasets (n = 2,000, study
seed 3: disjoint from the quick, full and invariant studies):

* ``basin``: each student trains from its own seeded initialisation (as docs/calibration/invariant.py);
  its truth is the population penalised optimum *of the basin it reached*: Newton on
  ``--pop-factor`` x n fresh samples from the teacher, started from the student's own optimum
  (validation.local.local_optima).
* ``near-teacher``: each student starts at the teacher's weights plus N(0, ``--perturb``^2) on every
  parameter; the truth is the teacher-basin population optimum (Newton from the teacher on
  ``--population`` samples), one for all students.

Training: Adam lr 0.01, batch 32 drawn with replacement, ``--epochs`` epochs, the last ``--window``
tracked, all students stacked (validation.invariant.StackedMLP). Targets (validation.invariant):
f at 20 fixed test points, the 48 path weights, the 65 balanced weights (units keep their order:
the truth is reached from the student). Rules: batch means and the window SD of each target's
trajectory (during training), and the exact delta-method sandwich and observed information at the
student's penalised optimum (Newton from its trained weights, certified by
validation.newton.certify). Every rule is scored on the students whose optimum is certified, and
the trajectory rules also on every student.

Each cell is cached under ``--cache`` (atomic writes): a rerun resumes. Writes local.md and
local.csv here.

    OMP_NUM_THREADS=1 .venv/bin/python docs/calibration/local.py            # 100 datasets a cell
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
from validation.invariant import StackedMLP, TargetTracker, delta_references, forward, targets
from validation.local import expected_coverage, local_optima, perturbed_teacher, score
from validation.newton import certify, newton_fits, smooth_polish
from validation.study import data_index

HERE = Path(__file__).parent
SEED = 3
GROUPS = {"f": "f(x) at 20 test points", "path": "path weights", "weight": "balanced weights"}
TRAJ = ("batch means (trajectory)", "window SD (trajectory)")


def population_optimum(design, weight_decay: float, n: int, seed: int, betas: tuple[float, ...]):
    """The surrogate's penalised optimum on ``n`` samples of the teacher: ReLU Newton from the teacher's
    weights, then the surrogate (validation.newton.smooth_polish)."""
    from validation.local import teacher_sample

    teacher = design.teacher()
    X, y = teacher_sample(teacher, n, seed)
    fits = newton_fits(teacher, design.loss(), X[None], y[None], weight_decay=weight_decay, gtol=1e-10,
                       max_iter=150)
    relu = torch.cat([fits.params[k].flatten(1) for k, _ in teacher.named_parameters()], 1)
    d, h, k = teacher[0].in_features, teacher[0].out_features, teacher[2].out_features
    sp = smooth_polish(relu, X[None], y[None], design.loss(), d=d, h=h, k=k, weight_decay=weight_decay, betas=betas,
                       max_iter=50)
    return sp.theta[0], dict(grad_max=sp.grad_max, min_eig=sp.min_eig, minimum=sp.certified, step_se=sp.step_se)


def run_cell(design, kind: str, weight_decay: float, args) -> dict:
    R = args.datasets
    data = [design.sample(data_index(SEED, r)) for r in range(R)]
    X64 = torch.tensor(np.stack([a[0] for a in data]))
    y64 = torch.tensor(np.stack([a[1] for a in data]))
    n = X64.shape[1]
    teacher = design.teacher()
    if kind == "basin":
        nets = [design.model(SEED * 10_000 + r) for r in range(R)]
    else:
        nets = [perturbed_teacher(teacher, args.perturb, SEED * 10_000 + r) for r in range(R)]
    d, h, k = nets[0][0].in_features, nets[0][0].out_features, nets[0][2].out_features
    model = StackedMLP(nets)
    X_test = torch.tensor(np.random.default_rng(7).standard_normal((20, d)))
    window_steps = args.window * steps_per_epoch(n, 32)
    tracker = TargetTracker(model, X_test, batch_steps=window_steps // 20)
    opt = make_optimizer("adam", model.parameters(), lr=0.01, weight_decay=weight_decay)
    t0 = time.perf_counter()
    train_epochs(model, opt, (X64.transpose(0, 1).float(), y64.T.float()), epochs=args.epochs, batch_size=32,
                 sampler="replacement", generator=torch.Generator().manual_seed(SEED * 10_000),
                 loss=design.stacked_loss(), estimators=[tracker], track_epochs=args.window)
    times = {"train": time.perf_counter() - t0}
    traj = tracker.result(n, 32)
    t0 = time.perf_counter()
    fits = newton_fits(nets[0], design.loss(), X64, y64, start=model.flat().detach().double(),
                       weight_decay=weight_decay, gtol=1e-8, max_iter=args.max_iter)
    theta_relu = torch.cat([fits.params[kk].flatten(1) for kk, _ in nets[0].named_parameters()], 1)
    sp = smooth_polish(theta_relu, X64, y64, design.loss(), d=d, h=h, k=k, weight_decay=weight_decay,
                       betas=tuple(args.betas), max_iter=50)
    theta_hat = sp.theta
    times["newton"] = time.perf_counter() - t0
    refs = delta_references(theta_hat, X64, y64, design.loss(), X_test, d=d, h=h, k=k, weight_decay=weight_decay,
                            surrogate_beta=args.betas[-1])
    refs_relu = delta_references(theta_hat, X64, y64, design.loss(), X_test, d=d, h=h, k=k, weight_decay=weight_decay)
    t0 = time.perf_counter()
    if kind == "basin":
        theta_star, pop = local_optima(teacher, design.loss(), theta_hat, weight_decay=weight_decay,
                                       n_pop=args.pop_factor * n, seed=SEED * 1_000_000, max_iter=50,
                                       betas=tuple(args.pop_betas))
        n_pop = args.pop_factor * n
    else:
        star, info = population_optimum(design, weight_decay, args.population, SEED * 1_000_000, tuple(args.pop_betas))
        theta_star = star.expand(R, -1).clone()
        pop = {key: v.expand(R) for key, v in info.items()}
        n_pop = args.population
    times["truth"] = time.perf_counter() - t0
    smooth = dict(certified=sp.certified, step_se=sp.step_se, min_eig=sp.min_eig, grad_max=sp.grad_max,
                  relu_gap=sp.relu_gap, moved_se=sp.moved_se)
    return dict(kind=kind, weight_decay=weight_decay, n=n, n_pop=n_pop, X=X64, y=y64, X_test=X_test,
                theta_hat=theta_hat, theta_relu=theta_relu, theta_star=theta_star, betas=list(args.betas),
                traj={g: {kk: v for kk, v in traj[g].items()} for g in GROUPS}, refs=refs, refs_relu=refs_relu,
                newton=dict(grad_max=fits.grad_max, min_eig=fits.min_eig, minimum=fits.minimum, steps=fits.steps),
                smooth=smooth, pop=pop, times=times, d=d, h=h, k=k)


def analyse(cell: dict, design, args) -> tuple[list[dict], dict, list[str]]:
    d, h, k, wd = cell["d"], cell["h"], cell["k"], cell["weight_decay"]
    theta_hat, theta_star = cell["theta_hat"], cell["theta_star"]
    relu_cert = certify(cell["theta_relu"], cell["X"], cell["y"], design.loss(), d=d, h=h, k=k, weight_decay=wd,
                        tol=args.tol)
    sm = cell["smooth"]
    ok = (sm["certified"] & cell["pop"]["minimum"]).numpy()
    truth = targets(theta_star, cell["X_test"], d, h, k)
    at_hat = targets(theta_hat, cell["X_test"], d, h, k)
    se_raw = cell["refs"]["sandwich"]["raw"]
    rows = []
    for g, label in GROUPS.items():
        t = truth[g].numpy()
        tr = cell["traj"][g]
        rules = {
            TRAJ[0]: (tr["mean"].numpy(), tr["bm_se"].numpy(), int(tr["dof"])),
            TRAJ[1]: (tr["mean"].numpy(), tr["sd"].numpy(), None),
            "sandwich (exact, ReLU a.e. Hessian)": (at_hat[g].numpy(), cell["refs_relu"]["sandwich"][g].numpy(), None),
            "observed information (exact, ReLU)": (at_hat[g].numpy(), cell["refs_relu"]["observed"][g].numpy(), None),
            "sandwich (surrogate's Hessian)": (at_hat[g].numpy(), cell["refs"]["sandwich"][g].numpy(), None),
        }
        for name, (c, s, dof) in rules.items():
            sub = score(c[ok], s[ok], t[ok], dof)
            row = dict(design=cell["kind"], weight_decay=wd, target=label, rule=name, datasets=int(ok.sum()), **sub)
            if name in TRAJ:
                everyone = score(c, s, t, dof)
                row.update(coverage_all=everyone["coverage"], lo_all=everyone["lo"], hi_all=everyone["hi"],
                           intervals_all=everyone["intervals"])
            rows.append(row)
    relu_ok = relu_cert.certified.numpy()
    info = dict(design=cell["kind"], weight_decay=wd, datasets=len(ok), certified=int(ok.sum()),
                smooth_certified=int(sm["certified"].sum()), pop_certified=int(cell["pop"]["minimum"].sum()),
                relu_certified=int(relu_ok.sum()), relu_min_eig_neg=int((~relu_cert.second_order).sum()),
                relu_step_over=int((relu_cert.step_se > args.tol).sum()),
                relu_saddle_at_zero=int(relu_cert.saddle_at_zero.sum()),
                relu_newton_minimum=int(cell["newton"]["minimum"].sum()),
                relu_gap_q=[float(q) for q in np.quantile(sm["relu_gap"].numpy(), [0.1, 0.5, 0.9])],
                relu_lower=int((sm["relu_gap"] < 0).sum()),
                moved_se_median=float(sm["moved_se"].median()),
                truth_moved_median=float(((theta_star - theta_hat).abs() / se_raw).amax(1).median()),
                newton_steps_max=int(cell["newton"]["steps"].max()),
                expected=expected_coverage(cell["n"], cell["n_pop"]), **{f"{k_}_s": v for k_, v in cell["times"].items()})
    fails = [f"{cell['kind']} {wd:g} dataset {r}: ReLU endpoint: {v}" for r, v in enumerate(relu_cert.verdicts())
             if not relu_ok[r]]
    fails += [f"{cell['kind']} {wd:g} dataset {r}: surrogate not certified (step {float(sm['step_se'][r]):.2g} SE, "
              f"min eig {float(sm['min_eig'][r]):.2g}; truth certified {bool(cell['pop']['minimum'][r])})"
              for r in range(len(ok)) if not ok[r]]
    return rows, info, fails


def recount(design, weight_decay: float, args) -> dict:
    """The invariant study's students (docs/calibration/invariant.py: study seed 2, the same datasets,
    initialisations and batches), retrained without trackers and polished by this Newton: how many
    endpoints are minima now, and why the others are not."""
    R, seed = args.recount, 2
    data = [design.sample(data_index(seed, r)) for r in range(R)]
    X64 = torch.tensor(np.stack([a[0] for a in data]))
    y64 = torch.tensor(np.stack([a[1] for a in data]))
    nets = [design.model(seed * 10_000 + r) for r in range(R)]
    d, h, k = nets[0][0].in_features, nets[0][0].out_features, nets[0][2].out_features
    model = StackedMLP(nets)
    opt = make_optimizer("adam", model.parameters(), lr=0.01, weight_decay=weight_decay)
    t0 = time.perf_counter()
    train_epochs(model, opt, (X64.transpose(0, 1).float(), y64.T.float()), epochs=300, batch_size=32,
                 sampler="replacement", generator=torch.Generator().manual_seed(seed * 10_000),
                 loss=design.stacked_loss())
    out = dict(weight_decay=weight_decay, datasets=R, train_s=time.perf_counter() - t0)
    start = model.flat().detach().double()
    for label, max_iter in (("200 steps (the invariant study's budget)", 200), (f"{args.recount_iter} steps", args.recount_iter)):
        t0 = time.perf_counter()
        fits = newton_fits(nets[0], design.loss(), X64, y64, start=start, weight_decay=weight_decay, gtol=1e-8,
                           max_iter=max_iter)
        theta = torch.cat([fits.params[kk].flatten(1) for kk, _ in nets[0].named_parameters()], 1)
        cert = certify(theta, X64, y64, design.loss(), d=d, h=h, k=k, weight_decay=weight_decay, tol=args.tol)
        sp = smooth_polish(theta, X64, y64, design.loss(), d=d, h=h, k=k, weight_decay=weight_decay,
                           betas=tuple(args.betas), max_iter=50)
        # the ReLU objective along the segment from Newton's endpoint to the surrogate's optimum: a
        # rise first (a barrier) means the endpoint is a separate, shallower local minimum
        def relu_objective(t):
            return torch.stack([design.loss()(forward(t[b], X64[b], d, h, k), y64[b]) for b in range(R)]) \
                + 0.5 * weight_decay * t.square().sum(1)

        base = relu_objective(theta)
        profile = torch.stack([relu_objective(theta + a * (sp.theta - theta)) - base
                               for a in np.linspace(0, 1, 21)], 1)                     # (R, 21)
        at_sp = certify(sp.theta, X64, y64, design.loss(), d=d, h=h, k=k, weight_decay=weight_decay, tol=args.tol)
        again = newton_fits(nets[0], design.loss(), X64, y64, start=sp.theta, weight_decay=weight_decay, gtol=1e-8,
                            max_iter=max_iter)
        theta2 = torch.cat([again.params[kk].flatten(1) for kk, _ in nets[0].named_parameters()], 1)
        stay = ((theta2 - sp.theta).abs() / at_sp.se.clamp_min(1e-300)).amax(1)
        barrier = profile.amax(1)
        out[label + " profile"] = dict(
            barrier_q=[float(q) for q in np.quantile(barrier.numpy(), [0.1, 0.5, 0.9])],
            with_barrier=int((barrier > 0).sum()), relu_cert_at_surrogate=int(at_sp.certified.sum()),
            stay_q=[float(q) for q in np.quantile(stay.numpy(), [0.5, 0.9, 1.0])],
            drop_q=[float(q) for q in np.quantile(profile[:, -1].numpy(), [0.1, 0.5, 0.9])])
        out[label] = dict(newton_minimum=int(fits.minimum.sum()), certified=int(cert.certified.sum()),
                          second_order_fails=int((~cert.second_order).sum()),
                          step_over=int((cert.step_se > args.tol).sum()),
                          saddle_at_zero=int(cert.saddle_at_zero.sum()),
                          smooth_certified=int(sp.certified.sum()), relu_lower=int((sp.relu_gap < 0).sum()),
                          relu_gap_median=float(sp.relu_gap.median()), moved_se_median=float(sp.moved_se.median()),
                          verdicts=[f"dataset {r}: {v}" for r, v in enumerate(cert.verdicts()) if not bool(cert.certified[r])],
                          seconds=time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=100)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--max-iter", type=int, default=300, help="Newton steps per student fit (ReLU)")
    p.add_argument("--recount-iter", type=int, default=600, help="Newton steps of the recount's second polish")
    p.add_argument("--pop-factor", type=int, default=20, help="population sample per basin, in multiples of n")
    p.add_argument("--betas", type=float, nargs="+", default=[100.0, 1000.0, 10000.0],
                   help="the students' smooth surrogate: softplus sharpnesses, continued from the ReLU endpoint")
    p.add_argument("--pop-betas", type=float, nargs="+", default=[100.0, 300.0, 1000.0],
                   help="the truth's surrogate (a sharper one is stiff on a large sample)")
    p.add_argument("--population", type=int, default=200_000, help="samples of the teacher-basin optimum")
    p.add_argument("--perturb", type=float, default=0.05, help="SD of the near-teacher students' start")
    p.add_argument("--tol", type=float, default=0.1, help="certificate: largest Newton step in sandwich SEs")
    p.add_argument("--decays", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--designs", nargs="+", default=["basin", "near-teacher"], choices=["basin", "near-teacher"])
    p.add_argument("--recount", type=int, default=200,
                   help="the invariant study's students at weight decay 1e-2 re-polished (0: skip)")
    p.add_argument("--cache", default="runs/local-cache")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    torch.set_num_threads(1)
    design = get_design("teacher-regression")
    t_start = time.perf_counter()
    cache = Path(args.cache)
    rows, infos, failures = [], [], []
    for kind in args.designs:
        for wd in args.decays:
            path = cache / f"{kind}-{wd:g}-{args.datasets}.pt"
            if not path.exists():
                cell = run_cell(design, kind, wd, args)
                atomic_write(path, lambda f, c=cell: torch.save(c, f))
                print(f"{kind} {wd:g}: {cell['times']}", flush=True)
            cell = torch.load(path, weights_only=False)
            r, info, fail = analyse(cell, design, args)
            rows += r
            infos.append(info)
            failures += fail
            print(info, flush=True)
    recounted = None
    if args.recount:
        path = cache / f"recount-0.01-{args.recount}-{args.recount_iter}.pt"
        if not path.exists():
            rc = recount(design, 1e-2, args)
            atomic_write(path, lambda f, c=rc: torch.save(c, f))
        recounted = torch.load(path, weights_only=False)
        print({k_: v for k_, v in recounted.items()}, flush=True)
    wall = time.perf_counter() - t_start
    table = pd.DataFrame(rows)
    out = Path(args.out)
    atomic_write(out / "local.csv", lambda f: table.to_csv(f, index=False))
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python docs/calibration/local.py" + "".join(" " + a for a in sys.argv[1:])
    lines = [f"# Coverage against a local estimand on the regression teacher ({args.datasets} datasets a cell)", "",
             f"`{cmd}`: {wall:.0f} s wall for this invocation (cells already cached are not rerun; the cells' own "
             f"times are below) on {platform.machine()} ({platform.node()}), 1 thread, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             f"Students: {args.epochs} epochs, window {args.window}; ReLU Newton polish at most {args.max_iter} steps, "
             f"then the smooth surrogate (softplus, beta {', '.join(f'{b:g}' for b in args.betas)} in turn) to its certified "
             f"optimum (validation.newton.smooth_polish: Newton step <= 0.01 SE, smallest Hessian eigenvalue > 0): the "
             f"student's optimum. Truth, the population optimum of the surrogate (beta "
             f"{', '.join(f'{b:g}' for b in args.pop_betas)} in turn, certified likewise): `basin`, from each student's "
             f"optimum on {args.pop_factor} x n fresh samples; `near-teacher` (start: teacher + N(0, {args.perturb:g}^2)), "
             f"from the teacher on {args.population} samples. Exact references at the student's optimum: the delta-method "
             f"sandwich and observed information with the ReLU network's (almost-everywhere) Hessian, and the sandwich with "
             f"the surrogate's Hessian. The ReLU endpoints are judged by validation.newton.certify (kink-aware step <= {args.tol:g} SE, "
             f"second order, no zero unit that can grow).", "",
             "| design | weight decay | scored (surrogate and truth certified) | ReLU endpoint certified | ReLU: "
             "second order fails | ReLU: step > tol | ReLU: zero unit can grow | ReLU Newton's own minimum flag | "
             "ReLU objective, surrogate - ReLU endpoint (10/50/90%) | surrogate lower | surrogate - ReLU endpoint, "
             "median max (SE) | truth - student median max (SE) | exact coverage expected | train / newton / truth (s) |",
             "|" + "---|" * 14]
    lines += [f"| {i['design']} | {i['weight_decay']:g} | {i['certified']} of {i['datasets']} | {i['relu_certified']} | "
              f"{i['relu_min_eig_neg']} | {i['relu_step_over']} | {i['relu_saddle_at_zero']} | {i['relu_newton_minimum']} | "
              f"{', '.join(f'{q:.1e}' for q in i['relu_gap_q'])} | {i['relu_lower']} | {i['moved_se_median']:.2g} | "
              f"{i['truth_moved_median']:.2g} | {i['expected']:.3f} | "
              f"{i['train_s']:.0f} / {i['newton_s']:.0f} / {i['truth_s']:.0f} |" for i in infos]
    lines += ["", "Coverage on the certified students (Wilson 95%); z = (centre - truth) / SE: its SD over intervals and the "
              "centre's bias (median over entries of |mean z over datasets|). Trajectory rules also on every student.", "",
              "| design | weight decay | target | rule | coverage | Wilson 95% | intervals | z SD | bias (SE) | "
              "every student: coverage [Wilson] (intervals) |", "|" + "---|" * 10]
    for r in rows:
        allc = (f"{r['coverage_all']:.3f} [{r['lo_all']:.3f}, {r['hi_all']:.3f}] ({r['intervals_all']})"
                if r["rule"] in TRAJ else "")
        lines.append(f"| {r['design']} | {r['weight_decay']:g} | {r['target']} | {r['rule']} | {r['coverage']:.3f} | "
                     f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['intervals']} | {r['z_sd']:.2f} | {r['bias_se']:.2f} | {allc} |")
    if recounted is not None:
        lines += ["", f"The invariant study's first {recounted['datasets']} students at weight decay 1e-2 (study seed 2; "
                  f"docs/calibration/invariant.md counted 94 of 200 endpoints not a minimum), retrained "
                  f"({recounted['train_s']:.0f} s) and polished by this Newton:", "",
                  "| Newton budget | Newton's own minimum flag | ReLU certificate | second order fails | step > tol | "
                  "zero unit can grow | surrogate certified | surrogate's ReLU objective lower (median difference) | "
                  "surrogate - ReLU endpoint, median max (SE) | seconds |",
                  "|" + "---|" * 10]
        for label, r in recounted.items():
            if isinstance(r, dict) and "newton_minimum" in r:
                lines.append(f"| {label} | {r['newton_minimum']} | {r['certified']} | {r['second_order_fails']} | "
                             f"{r['step_over']} | {r['saddle_at_zero']} | {r['smooth_certified']} | {r['relu_lower']} "
                             f"({r['relu_gap_median']:.1e}) | {r['moved_se_median']:.2g} | {r['seconds']:.0f} |")
        lines += ["", "The ReLU objective along the segment from each Newton endpoint to the surrogate's optimum (21 "
                  "points): the largest rise above the endpoint (a barrier: the endpoint is a separate local minimum) "
                  "and the change at the far end (10/50/90%); at the surrogate's optimum, the ReLU certificate and how "
                  "far ReLU Newton moves from it (50/90/100%, in sandwich SEs):", "",
                  "| Newton budget | endpoints with a barrier | barrier | change at the far end | ReLU certificate at the "
                  "surrogate's optimum | ReLU Newton's move from it (SE) |", "|" + "---|" * 6]
        for label, r in recounted.items():
            if label.endswith(" profile"):
                lines.append(f"| {label[:-8]} | {r['with_barrier']} | {', '.join(f'{q:.1e}' for q in r['barrier_q'])} | "
                             f"{', '.join(f'{q:.1e}' for q in r['drop_q'])} | {r['relu_cert_at_surrogate']} | "
                             f"{', '.join(f'{q:.2g}' for q in r['stay_q'])} |")
        for label, r in recounted.items():
            if isinstance(r, dict) and "verdicts" in r:
                lines += ["", f"Not certified after {label}:", ""] + [f"- {v}" for v in r["verdicts"]]
    lines += ["", "Endpoints not certified, and why (ReLU endpoints by validation.newton.certify; surrogate optima):", ""]
    lines += [f"- {f}" for f in failures]
    atomic_write(out / "local.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
