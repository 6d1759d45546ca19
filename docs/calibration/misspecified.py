"""Which estimators follow the sandwich and which the inverse information, when the model is
misspecified (the hidden-layer issue, part 4).

Runs the grid docs/calibration/full/misspecified.toml (three linear designs fitted with the
unit-variance Gaussian loss: heteroscedastic noise, Student-t(3) noise, an omitted quadratic term;
validation.designs.NOISES) through the study runner, then compares every estimator per weight
with both exact references at the MLE: the inverse observed information (`wald`, the Gaussian
model's own SE) and the HC0 sandwich (`wald-sandwich`, the least-squares estimate's sampling SE
whatever the noise). Coverage is of the true coefficients. Writes misspecified.md here; the
study's own files go to --out (resumable).

    .venv/bin/python docs/calibration/misspecified.py
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

from mustat._io import atomic_write
from validation.study import load_grid, run_study

HERE = Path(__file__).parent
ROWS = ("pseudo", "calibrated", "batch-means", "curvature", "wald", "wald-sandwich")


def per_weight_ratios(cells: pd.DataFrame) -> pd.DataFrame:
    """Median per-weight SE ratio of every estimator to the observed and to the sandwich SE."""
    key = ["design", "setting", "replication", "param", "index"]
    sand = cells[cells.estimator == "wald-sandwich"][key + ["se"]].rename(columns={"se": "se_sandwich"})
    m = cells.merge(sand, on=key)
    m["to_observed"] = m.se / m.ref_se
    m["to_sandwich"] = m.se / m.se_sandwich
    return m.groupby(["design", "setting", "estimator"])[["to_observed", "to_sandwich"]].median().reset_index()


def third_coefficient(cells: pd.DataFrame, summary: pd.DataFrame, design: str = "linear-hetero",
                      index: int = 2) -> pd.DataFrame:
    """Per estimator: median SE ratios and coverage of the truth for one coefficient of one design."""
    from scipy import stats

    from validation.metrics import wilson

    key = ["design", "setting", "replication", "param", "index"]
    c = cells[(cells.design == design) & (cells["index"] == index) & cells.estimator.isin(ROWS)]
    sand = c[c.estimator == "wald-sandwich"][key + ["se"]].rename(columns={"se": "se_sandwich"})
    c = c.merge(sand, on=key)
    dof = summary.set_index(["design", "setting", "estimator"]).interval_dof
    rows = []
    for (setting, est), g in c.groupby(["setting", "estimator"], sort=False):
        nu = dof.get((design, setting, est), np.inf)
        q = stats.norm.ppf(0.975) if not np.isfinite(nu) else stats.t.ppf(0.975, nu)
        hit = np.isfinite(g.se) & (np.abs(g.weight - g.truth) <= q * g.se)
        lo, hi = wilson(int(hit.sum()), len(hit))
        rows.append(dict(setting=setting, estimator=est, to_observed=float(np.median(g.se / g.ref_se)),
                         to_sandwich=float(np.median(g.se / g.se_sandwich)), coverage=float(hit.mean()), lo=lo, hi=hi))
    out = pd.DataFrame(rows)
    return out.assign(_o=out.estimator.map({e: i for i, e in enumerate(ROWS)})).sort_values(["setting", "_o"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=str(HERE / "full" / "misspecified.toml"))
    p.add_argument("--out", default="runs/calibration-misspecified")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--doc", default=str(HERE), help="folder for misspecified.md and .csv")
    args = p.parse_args()
    t0 = time.perf_counter()
    summary, cells = run_study(load_grid(args.grid), args.out, workers=args.workers, quiet=True)
    ratios = per_weight_ratios(cells)
    s = summary.merge(ratios, on=["design", "setting", "estimator"])
    s = s[s.estimator.isin(ROWS)]
    lines = ["# Misspecified linear designs: which reference each estimator follows", "",
             f"`.venv/bin/python docs/calibration/misspecified.py{''.join(' ' + a for a in sys.argv[1:])}`: "
             f"{time.perf_counter() - t0:.0f} s on {platform.machine()} (a resumed run counts only what it "
             f"computed), {datetime.date.today()}. {int(summary.replications.max())} datasets a cell.", "",
             "SE ratios: the median over weights of the estimator's SE over the exact inverse observed "
             "information (the Gaussian model's SE) and over the exact HC0 sandwich, at each dataset's MLE.", "",
             "| design | setting | estimator | SE / observed | SE / sandwich | coverage95 [Wilson] | type-I at 0.05 | "
             "McNemar p vs observed |", "|---|---|---|---|---|---|---|---|"]
    order = {e: i for i, e in enumerate(ROWS)}
    s = s.assign(_o=s.estimator.map(order)).sort_values(["design", "setting", "_o"])
    for r in s.itertuples():
        mc = "" if r.estimator == "wald" or not np.isfinite(r.mcnemar_pvalue) else f"{r.mcnemar_pvalue:.2g}"
        lines.append(f"| {r.design} | {r.setting} | {r.estimator} | {r.to_observed:.3f} | {r.to_sandwich:.3f} | "
                     f"{r.coverage95:.3f} [{r.coverage95_lo:.3f}, {r.coverage95_hi:.3f}] | {r.type1_05:.3f} | {mc} |")
    # heteroscedastic noise through the third feature changes only the third coefficient's sandwich
    # (E[x x' s^2(x)] = Sigma + 1.5 e3 e3' for these Gaussian features), so the medians above hide it
    lines += ["", "The third coefficient of `linear-hetero` alone (the one whose feature drives the noise variance; "
                  "250 intervals a row):", "",
              "| setting | estimator | SE / observed | SE / sandwich | coverage95 [Wilson] |", "|---|---|---|---|---|"]
    third = third_coefficient(cells, summary)
    for r in third.itertuples():
        lines.append(f"| {r.setting} | {r.estimator} | {r.to_observed:.3f} | {r.to_sandwich:.3f} | "
                     f"{r.coverage:.3f} [{r.lo:.3f}, {r.hi:.3f}] |")
    atomic_write(Path(args.doc) / "misspecified.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    atomic_write(Path(args.doc) / "misspecified.csv", lambda f: s.drop(columns="_o").to_csv(f, index=False))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
