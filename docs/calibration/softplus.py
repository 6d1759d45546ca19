"""The smooth teacher's references, robustly (hidden-layer issue, item 5): do the replicates' spreads
disagree because their distributions have heavy tails, or because the fits reach several optima?

For each weight decay, on the 6-8-1 softplus regression teacher (``teacher-softplus``):

- ``R`` fresh datasets from the teacher (the full study's teacher datasets, study seed 0), each fitted
  to its penalised optimum three times by Newton (float64, :func:`validation.newton.newton_fits`): from
  the teacher's weights (as the study's teacher reference is), from the teacher plus Gaussian noise of
  ``--jitter`` times the RMS of its weights, and from the consensus (the coordinatewise median of the
  teacher-started fits). Units are matched to the teacher's (Hungarian). A dataset has *several
  optima* when two of its fits are both converged minima (a minimum that moved less than 0.1
  replicate SD over the second half of its iterations), differ in their penalised objective by more than 1e-9
  (relative), and lie more than 0.5 teacher-replicate SDs apart in some weight. *Outlying*: a
  teacher-started fit more than 3 robust spreads from the median in some weight.
- One dataset (study seed 0, replication 0) is fitted from the teacher; the exact penalised sandwich
  there, and ``B`` Newton bootstrap refits warm-started there.
- Every spread both ways: the SD and the robust spread IQR / 1.349 (equal for a Gaussian), per weight,
  and the agreement ratios with each (median over the 65 weights).

Writes softplus.md and softplus.csv next to this file.

    .venv/bin/python docs/calibration/softplus.py              # R = B = 100, decays 1e-4, 1e-3, 1e-2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mustat._io import atomic_write

HERE = Path(__file__).parent
COLUMNS = ["weight_decay", "quantity", "value"]


def robust_sd(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """IQR / 1.349: the SD of a Gaussian, insensitive to tails and a few outlying fits."""
    q75, q25 = np.percentile(x, [75, 25], axis=axis)
    return (q75 - q25) / 1.349


def _flat(params: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return torch.cat([params[n].reshape(params[n].shape[0], -1) for n in names], 1).double().numpy()


def _matched(params: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
    from validation.references import match_units, permute_units, unit_vectors

    rows = []
    for r in range(next(iter(params.values())).shape[0]):
        one = {k: v[r] for k, v in params.items()}
        rows.append(permute_units(one, match_units(unit_vectors(one, "0", "2"), target), "0", "2"))
    return {k: torch.stack([row[k] for row in rows]) for k in params}


def _objective(model, loss, params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor, wd: float) -> np.ndarray:
    from torch.func import functional_call

    out = []
    for r in range(len(X)):
        p = {k: v[r] for k, v in params.items()}
        with torch.no_grad():
            f = functional_call(model, p, (X[r],))
            out.append(float(loss(f, y[r]) + 0.5 * wd * sum(v.square().sum() for v in p.values())))
    return np.asarray(out)


def one_decay(wd: float, R: int, B: int, jitter: float, max_iter: int) -> tuple[dict, pd.DataFrame]:
    from validation.bootstrap import newton_bootstrap
    from validation.designs import get_design
    from validation.newton import flat_parameters, newton_fits
    from validation.references import polish, unit_vectors, wald_references
    from validation.study import data_index

    design = get_design("teacher-softplus")
    teacher, loss = design.teacher(), design.loss()
    names = [n for n, _ in teacher.named_parameters()]
    target = unit_vectors({k: v.detach() for k, v in teacher.named_parameters()}, "0", "2")
    data = [design.sample(data_index(0, 10_000 + r)) for r in range(R)]
    Xs, ys = torch.tensor(np.stack([a[0] for a in data])), torch.tensor(np.stack([a[1] for a in data]))
    t0 = flat_parameters(teacher).double()
    g = torch.Generator().manual_seed(7)
    starts = {"teacher": t0.expand(R, -1).clone(),
              "jittered": t0 + jitter * t0.square().mean().sqrt() * torch.randn(R, len(t0), generator=g, dtype=torch.float64)}
    fits, params = {}, {}
    for name, start in starts.items():
        fits[name] = newton_fits(teacher, loss, Xs, ys, start=start, weight_decay=wd, gtol=1e-9, max_iter=max_iter)
        params[name] = _matched(fits[name].params, target)
    A = _flat(params["teacher"], names)
    sd_t, rsd_t = A.std(0, ddof=1), robust_sd(A)
    # a third start: the replicates' consensus (coordinatewise median of the teacher-started fits)
    consensus = torch.tensor(np.median(A, 0)).expand(R, -1).clone()
    fits["consensus"] = newton_fits(teacher, loss, Xs, ys, start=consensus, weight_decay=wd, gtol=1e-9,
                                    max_iter=max_iter)
    params["consensus"] = _matched(fits["consensus"].params, target)
    flat = {k: _flat(params[k], names) for k in params}
    obj = {k: _objective(teacher, loss, params[k], Xs, ys, wd) for k in params}
    # a fit counts only where it converged: a minimum that no longer moves by 0.1 replicate SD
    minimum = {k: fits[k].converged_within(torch.tensor(sd_t)).numpy() for k in fits}
    best = np.stack([np.where(minimum[k], obj[k], np.inf) for k in params]).min(0)
    several = np.zeros(R, bool)
    gap_sd = np.zeros(R)
    for a in params:
        for b in params:
            if a < b:
                gap = (np.abs(flat[a] - flat[b]) / sd_t).max(1)
                rel = np.abs(obj[a] - obj[b]) / np.abs(obj[a])
                gap_sd = np.maximum(gap_sd, gap)
                several |= minimum[a] & minimum[b] & (rel > 1e-9) & (gap > 0.5)
    # the teacher-started fit is not the best minimum found on that dataset
    teacher_not_best = several & (obj["teacher"] > best * (1 + 1e-9))
    outlying = (np.abs(A - np.median(A, 0)) > 3 * rsd_t).any(1)
    # dataset 0: the fit from the teacher, the sandwich there and the Newton bootstrap around it
    X0, y0, _ = design.sample(data_index(0, 0))
    X0, y0 = torch.tensor(X0), torch.tensor(y0)
    fitted, fit = polish(teacher, loss, X0, y0, weight_decay=wd, gtol=1e-9, max_iter=10 * max_iter)
    sw = wald_references(fitted, loss, X0, y0, weight_decay=wd)["sandwich"]
    sw = torch.cat([sw[n].flatten() for n in names]).numpy()
    boot, boot_fits = newton_bootstrap(fitted, loss, (X0, y0), B=B, weight_decay=wd, seed=0, gtol=1e-9,
                                       max_iter=max_iter)
    Bt = _flat({k: v for k, v in boot.params.items()}, names)
    sd_b, rsd_b = Bt.std(0, ddof=1), robust_sd(Bt)

    def far(x, centre, spread):  # share of replicates beyond 3 robust spreads of the median
        return float((np.abs(x - centre) > 3 * spread).mean())

    med = np.median
    out = dict(
        replicates=R, bootstrap_B=B,
        **{f"{k}_converged": float(fits[k].converged_within(torch.tensor(sd_t)).double().mean()) for k in fits},
        bootstrap_converged=float(boot_fits.converged_within(torch.tensor(sd_b)).double().mean()),
        fit_min_eig=float(fit.min_eig[0]), fit_grad_max=float(fit.grad_max[0]),
        teacher_robust_over_sd=float(med(rsd_t / sd_t)), bootstrap_robust_over_sd=float(med(rsd_b / sd_b)),
        teacher_beyond_3_robust=far(A, med(A, 0), rsd_t), bootstrap_beyond_3_robust=far(Bt, med(Bt, 0), rsd_b),
        teacher_over_sandwich=float(med(sd_t / sw)), teacher_robust_over_sandwich=float(med(rsd_t / sw)),
        bootstrap_over_sandwich=float(med(sd_b / sw)), bootstrap_robust_over_sandwich=float(med(rsd_b / sw)),
        bootstrap_over_teacher=float(med(sd_b / sd_t)), bootstrap_robust_over_teacher_robust=float(med(rsd_b / rsd_t)),
        datasets_outlying=int(outlying.sum()), datasets_with_several_optima=int(several.sum()),
        outlying_with_several_optima=int((outlying & several).sum()), teacher_start_not_best=int(teacher_not_best.sum()),
        all_starts_converged=int(np.logical_and.reduce([minimum[k] for k in minimum]).sum()),
        gap_sd_median=float(med(gap_sd)),
    )
    # with the several-optima datasets left out: is the teacher spread then the bootstrap's?
    keep = ~several
    if keep.sum() >= 10:
        out["teacher_robust_over_sandwich_one_optimum"] = float(med(robust_sd(A[keep]) / sw))
        out["teacher_over_sandwich_one_optimum"] = float(med(A[keep].std(0, ddof=1) / sw))
    return out, pd.DataFrame(dict(weight=np.arange(len(sw)), sandwich=sw, teacher_sd=sd_t, teacher_robust=rsd_t,
                                  bootstrap_sd=sd_b, bootstrap_robust=rsd_b, weight_decay=wd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicates", type=int, default=100)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--decays", default="1e-4,1e-3,1e-2")
    p.add_argument("--jitter", type=float, default=0.5)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--doc", default=str(HERE))
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows, weights = [], []
    for wd in (float(x) for x in args.decays.split(",")):
        out, w = one_decay(wd, args.replicates, args.bootstrap, args.jitter, args.max_iter)
        rows += [dict(weight_decay=wd, quantity=k, value=v) for k, v in out.items()]
        weights.append(w)
        print(wd, out, flush=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write(Path(args.doc) / "softplus.csv", lambda f: table.to_csv(f, index=False, float_format="%.6g"))
    command = (f"`.venv/bin/python docs/calibration/softplus.py --replicates {args.replicates} --bootstrap "
               f"{args.bootstrap} --decays {args.decays} --jitter {args.jitter}`: {time.perf_counter() - t0:.0f} s on "
               f"{platform.machine()}, {datetime.date.today()}.")
    write_markdown(table, command, Path(args.doc))


def write_markdown(table: pd.DataFrame, command: str, doc: Path) -> None:
    """softplus.md from the table of softplus.csv: one row per quantity, one column per decay."""
    wide = table.pivot(index="quantity", columns="weight_decay", values="value")
    lines = ["# The smooth teacher's references, robustly", "", command + " Medians over the 65 weights; "
             "`robust` = IQR / 1.349; the sandwich and the bootstrap at the fit of dataset 0 from the teacher.",
             "", "| quantity | " + " | ".join(f"{c:g}" for c in wide.columns) + " |",
             "|---|" + "---|" * len(wide.columns)]
    for q in dict.fromkeys(table.quantity):
        lines.append(f"| {q} | " + " | ".join("" if pd.isna(wide.loc[q, c]) else f"{wide.loc[q, c]:.4g}"
                                             for c in wide.columns) + " |")
    atomic_write(doc / "softplus.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
