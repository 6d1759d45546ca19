"""SE ratio to the exact Wald SE against the window's length in autocorrelation times, over
learning rate, batch size and window (the hidden-layer issue, part 6).

Runs docs/calibration/full/window.toml (logistic GLM, Adam, 50 datasets a cell) and plots each
trajectory estimator's median SE ratio against window steps / tau, where tau is batch means' own
estimate of the median integrated autocorrelation time in that cell. Writes window.png,
window.csv (the points of the figure) and window.md here; the study's files go to --out
(resumable). ``--redraw`` redraws window.png from window.csv alone.

``--centre`` asks why batch means under-covers where its SE ratio is about 1 (the cells of lr 0.02
and 0.05 with long windows): 400 fresh datasets in each of four such cells, and one of them on the
linear design (:func:`centre_grid`),
and for every interval the centre's offset from the exact optimum in exact SEs and the coverage of
the same SE around the exact optimum (:func:`validation.metrics.centre_and_interval`). Writes
window_centre.md and window_centre.csv here.

    .venv/bin/python docs/calibration/window.py
    .venv/bin/python docs/calibration/window.py --redraw
    .venv/bin/python docs/calibration/window.py --centre
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import pandas as pd

from mustat._io import atomic_write
from validation.report import _log_ticks, _setup

HERE = Path(__file__).parent
#: the columns of window.csv, one row per cell and estimator
COLUMNS = ["lr", "batch_size", "window", "window_steps", "steps_per_tau", "estimator", "se_ratio_median", "coverage95"]


def figure(s: pd.DataFrame):
    """Each trajectory estimator's median SE ratio to the exact Wald SE against window steps / tau
    (log-log), marked by batch size and sized by learning rate; returns the Figure."""
    sns = _setup()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    sns.scatterplot(data=s, x="steps_per_tau", y="se_ratio_median", hue="estimator", style="batch_size",
                    size="lr", sizes=(30, 120), ax=ax)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis, s.steps_per_tau.min() / 1.2, s.steps_per_tau.max() * 1.2)
    _log_ticks(ax.yaxis, s.se_ratio_median.min() / 1.2, s.se_ratio_median.max() * 1.2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("window steps / tau (batch means' median autocorrelation time)")
    ax.set_ylabel("median SE / exact Wald SE")
    ax.set_title("logistic GLM, Adam: SE ratio against the window")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(s: pd.DataFrame, doc: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(s)
    atomic_write(Path(doc) / "window.png", lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


def centre_grid(replications: int = 400):
    """Four cells of the window grid where batch means' SE ratio was 0.95-1.02 yet its coverage
    0.91-0.93 (window.md), with ``replications`` datasets each (study seed 6, datasets of their own),
    and the first of them on the linear design, whose loss is quadratic: constant-step SGD's
    stationary mean is the optimum there, while on a logistic loss it is off by O(lr)."""
    from validation.estimators import Setting
    from validation.study import Grid, Scoped

    long = Setting("adam", 0.05, batch_size=16, epochs=165, window=150)
    settings = (long,
                Setting("adam", 0.05, batch_size=64, epochs=165, window=150),
                Setting("adam", 0.02, batch_size=16, epochs=165, window=150),
                Setting("adam", 0.05, batch_size=16, epochs=60, window=45))
    return Grid(designs=("logistic",), settings=settings, scoped=(Scoped(("linear",), long),),
                estimators=("batch-means",), replications=replications, bootstrap_B=2, seed=6)


#: the columns of window_centre.csv: one row per cell (coef = "all") and per cell and coefficient
CENTRE_COLUMNS = ["design", "lr", "batch_size", "window", "coef", "n_datasets", "n_intervals", "dof", "se_ratio_median",
                  "log_ratio_sd", "log_ratio_sd_chi2", "bias_z_mean", "bias_z_mean_se", "bias_z_coef_max",
                  "bias_z_sd", "bias_z_abs_median", "cov_est", "cov_est_se", "cov_se_at_opt", "cov_se_at_opt_se",
                  "cov_centre_exact_se", "cov_centre_exact_se_se", "cov_exact", "cov_exact_se"]


def centre_rows(summary: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """:func:`validation.metrics.centre_and_interval` of batch means in each cell, pooled over the
    weights (``coef = "all"``) and per coefficient."""

    from validation.metrics import centre_and_interval

    rows = []
    bm = summary[(summary.estimator == "batch-means") & (summary.reference == "wald")]
    for r in bm.itertuples(index=False):
        c = cells[(cells.design == r.design) & (cells.setting == r.setting) & (cells.estimator == "batch-means")
                  & (cells.reference == "wald")]
        c = c.sort_values(["replication", "index"])
        for coef, part in [("all", c), *((str(j), p) for j, p in c.groupby("index"))]:
            out = centre_and_interval(*(part[k].to_numpy(float) for k in ("weight", "se", "ref_weight", "ref_se",
                                                                           "truth")),
                                      dof=float(r.interval_dof), groups=part.replication.to_numpy())
            rows.append(dict(design=r.design, lr=r.lr, batch_size=r.batch_size, window=r.window, coef=coef, dof=r.interval_dof,
                             **out))
    return pd.DataFrame(rows).reindex(columns=CENTRE_COLUMNS)


def centre_main(args) -> None:
    from validation.study import run_study

    t0 = time.perf_counter()
    summary, cells = run_study(centre_grid(), args.out + "-centre", workers=args.workers, quiet=True)
    seconds = time.perf_counter() - t0
    d = centre_rows(summary, cells)
    atomic_write(Path(args.doc) / "window_centre.csv", lambda f: d.to_csv(f, index=False, float_format="%.6g"))

    def pm(v, e):
        return f"{v:.3f} ± {e:.3f}"

    lines = ["# Batch means where its SE ratio is about 1: the centre or the interval?", "",
             f"`.venv/bin/python docs/calibration/window.py --centre`: {seconds:.0f} s on {platform.machine()} (a "
             f"resumed run counts only what it computed), {datetime.date.today()}. Logistic GLM (and the linear one "
             "in one cell), Adam, 400 datasets (3,200 intervals) a cell, study seed 6. `bias` is the window mean's offset from the exact optimum "
             "(the MLE) in exact Wald SEs, its mean over all intervals ± its SE with datasets as clusters, and the "
             "largest |mean| over the 8 coefficients. Coverages of the truth ± clustered SE: batch means' own "
             "interval (window mean ± t SE), batch means' SE around the exact optimum (t), the exact SE around the "
             "window mean (normal), and the exact Wald interval. `log SE ratio SD`: the spread of log(batch means "
             "/ exact) over intervals beside the chi-square spread an SE from dof + 1 independent batches has.", "",
             "| design | lr | batch | window (epochs) | dof | SE ratio (median) | log SE ratio SD (chi-square) | bias, mean "
             "(SE units) | bias, largest coefficient | window mean: SD about the optimum (SE units) | batch means "
             "interval | batch-means SE at the optimum | exact SE at the window mean | exact Wald |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d[d.coef == "all"].itertuples(index=False):
        lines.append(f"| {r.design} | {r.lr:g} | {r.batch_size:.0f} | {r.window:.0f} | {r.dof:.0f} | {r.se_ratio_median:.3f} | "
                     f"{r.log_ratio_sd:.3f} ({r.log_ratio_sd_chi2:.3f}) | {pm(r.bias_z_mean, r.bias_z_mean_se)} | "
                     f"{r.bias_z_coef_max:.3f} | {r.bias_z_sd:.3f} | {pm(r.cov_est, r.cov_est_se)} | "
                     f"{pm(r.cov_se_at_opt, r.cov_se_at_opt_se)} | "
                     f"{pm(r.cov_centre_exact_se, r.cov_centre_exact_se_se)} | {pm(r.cov_exact, r.cov_exact_se)} |")
    lines += ["", "Per coefficient (bias mean in exact SEs / median SE ratio / batch means' coverage):", "",
              "| design | lr | batch | window | " + " | ".join(f"coef {j}" for j in range(8)) + " |",
              "|---|---|---|---|" + "---|" * 8]
    for (design, lr, b, w), part in d[d.coef != "all"].groupby(["design", "lr", "batch_size", "window"], sort=False):
        cells_ = [f"{r.bias_z_mean:+.2f} / {r.se_ratio_median:.2f} / {r.cov_est:.3f}"
                  for r in part.sort_values("coef", key=lambda s: s.astype(int)).itertuples(index=False)]
        lines.append(f"| {design} | {lr:g} | {b:.0f} | {w:.0f} | " + " | ".join(cells_) + " |")
    atomic_write(Path(args.doc) / "window_centre.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


def newton_step(X, y, w, b):
    """One full-data Newton step of the logistic log-likelihood from ``(w, b)`` per replicate, by the
    library's :func:`mustat.newton_recentre` (float64): ``X (R, n, d)``, ``y (R, n)``, ``w (R, d)``,
    ``b (R,)``; returns ``(w, b)``."""
    import numpy as np
    import torch

    import mustat

    def summed(out, target):
        return torch.nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), target.reshape(-1), reduction="sum")

    out_w, out_b = np.empty_like(w), np.empty_like(b)
    for r in range(len(X)):
        glm = torch.nn.Linear(X.shape[2], 1).double()
        with torch.no_grad():
            glm.weight.copy_(torch.tensor(w[r])[None])
            glm.bias.fill_(float(b[r]))
        moved = mustat.newton_recentre(glm, summed, (torch.tensor(X[r]), torch.tensor(y[r], dtype=torch.float64)))
        out_w[r], out_b[r] = moved["weight"][0].numpy(), float(moved["bias"])
    return out_w, out_b


def recentre_main(args) -> None:
    """The first cell of :func:`centre_grid` (logistic, lr 0.05, S = 16, 150 of 165 epochs, the same
    400 datasets and seeds) trained again with the window mean of every tensor, then recentred by
    one full-data Newton step from the window mean: is batch means' interval around that centre
    calibrated?"""
    import numpy as np
    import torch

    from validation.designs import get_design
    from validation.estimators import train_and_estimate
    from validation.metrics import centre_and_interval
    from validation.references import glm_references
    from validation.study import data_index

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    grid = centre_grid()
    cell = grid.cells()[1]          # scoped (linear) first, then the logistic cells in order
    assert cell.design == "logistic" and cell.setting.lr == 0.05 and cell.setting.batch_size == 16
    design, s, R = get_design("logistic"), cell.setting, cell.replications
    samples = [design.sample(data_index(cell.seed, r)) for r in range(R)]
    X, y = np.stack([a[0] for a in samples]), np.stack([a[1] for a in samples])
    truth = np.tile(np.asarray(samples[0][2], float), R)
    model = design.stacked_model([cell.seed * 10_000 + r for r in range(R)])
    fits, _, mean = train_and_estimate(model, design.stacked_loss(), torch.tensor(X.transpose(1, 0, 2), dtype=torch.float32),
                                       torch.tensor(y.T.copy(), dtype=torch.float32), s, seed=cell.seed * 10_000,
                                       estimators=("batch-means",), average=True)
    est, se, diag, _ = fits["batch-means"]
    w_bar = mean["linear.weight"].double().numpy()
    b_bar = mean["linear.bias"].double().numpy()
    se = se["linear.weight"].double().numpy()
    refs = glm_references("logistic", X, y)
    groups = np.repeat(np.arange(R), X.shape[2])
    centres = {"window mean": w_bar}
    w, b = w_bar, b_bar
    for k in (1, 2):
        w, b = newton_step(X, y, w, b)
        centres[f"{k} Newton step{'s' if k > 1 else ''} from it"] = w
    lines = ["# Batch means recentred by Newton steps from the window mean", "",
             f"`.venv/bin/python docs/calibration/window.py --recentre`: {time.perf_counter() - t0:.0f} s on "
             f"{platform.machine()}, {datetime.date.today()}. Logistic GLM, Adam lr 0.05, S = 16, 150 of 165 epochs, "
             f"the 400 datasets of window_centre.md's cell; batch means' SE (t, {diag['dof']:.0f} dof) around each "
             "centre. The window mean equals the centre study's to float32 rounding "
             f"(largest difference {np.abs(w_bar - est['linear.weight'].double().numpy()).max():.1e}).", "",
             "| centre | offset from the MLE, mean (exact SEs) | largest coefficient's mean offset | coverage ± SE |",
             "|---|---|---|---|"]
    for name, c in centres.items():
        out = centre_and_interval(c.ravel(), se.ravel(), refs["coef"].ravel(), refs["se_observed"].ravel(), truth,
                                  dof=float(diag["dof"]), groups=groups)
        lines.append(f"| {name} | {out['bias_z_mean']:+.3f} ± {out['bias_z_mean_se']:.3f} | "
                     f"{out['bias_z_coef_max']:.3f} | {out['cov_est']:.3f} ± {out['cov_est_se']:.3f} |")
    atomic_write(Path(args.doc) / "window_recentre.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=str(HERE / "full" / "window.toml"))
    p.add_argument("--out", default="runs/calibration-window")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--doc", default=str(HERE), help="folder for window.png and window.md")
    p.add_argument("--redraw", action="store_true", help="redraw window.png from window.csv in --doc, nothing else")
    p.add_argument("--centre", action="store_true",
                   help="the centre-or-interval study (centre_grid) into --out plus '-centre'; writes window_centre.*")
    p.add_argument("--recentre", action="store_true",
                   help="the centre study's first cell recentred by Newton steps from the window mean; window_recentre.md")
    args = p.parse_args()
    if args.recentre:
        recentre_main(args)
        return
    if args.centre:
        centre_main(args)
        return
    if args.redraw:
        save_figure(pd.read_csv(Path(args.doc) / "window.csv"), args.doc)
        return
    from mustat.training import steps_per_epoch
    from validation.study import load_grid, run_study

    t0 = time.perf_counter()
    summary, _ = run_study(load_grid(args.grid), args.out, workers=args.workers, quiet=True)
    s = summary[summary.reference == "wald"].copy()
    tau = s[s.estimator == "batch-means"].set_index("setting").tau_median
    s["window_steps"] = [w * steps_per_epoch(2000, b) for w, b in zip(s.window, s.batch_size)]
    s["steps_per_tau"] = s.window_steps / s.setting.map(tau)
    s = s[s.estimator.isin(["pseudo", "calibrated", "batch-means"])]
    atomic_write(Path(args.doc) / "window.csv", lambda f: s[COLUMNS].to_csv(f, index=False))
    save_figure(s, args.doc)
    lines = ["# SE ratio against the window", "",
             f"`.venv/bin/python docs/calibration/window.py{''.join(' ' + a for a in sys.argv[1:])}`: "
             f"{time.perf_counter() - t0:.0f} s on {platform.machine()} (a resumed run counts only what it computed), "
             f"{datetime.date.today()}. Logistic GLM, Adam, 50 datasets (400 intervals) a cell. `window.csv` holds "
             "the figure's points; `docs/calibration/window.py --redraw` redraws `window.png` from it.", "",
             "| lr | batch | window (epochs) | window steps | steps / tau | pseudo | calibrated | batch means | "
             "batch means coverage |", "|---|---|---|---|---|---|---|---|---|"]
    wide = s.pivot_table(index=["lr", "batch_size", "window", "window_steps", "steps_per_tau"], columns="estimator",
                         values=["se_ratio_median", "coverage95"]).reset_index()
    for r in wide.itertuples(index=False):
        v = dict(zip(wide.columns, r))
        lines.append(f"| {v[('lr', '')]:g} | {v[('batch_size', '')]:.0f} | {v[('window', '')]:.0f} | "
                     f"{v[('window_steps', '')]:.0f} | {v[('steps_per_tau', '')]:.0f} | "
                     f"{v[('se_ratio_median', 'pseudo')]:.2f} | {v[('se_ratio_median', 'calibrated')]:.2f} | "
                     f"{v[('se_ratio_median', 'batch-means')]:.2f} | {v[('coverage95', 'batch-means')]:.3f} |")
    atomic_write(Path(args.doc) / "window.md", lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
