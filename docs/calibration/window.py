"""SE ratio to the exact Wald SE against the window's length in autocorrelation times, over
learning rate, batch size and window (the hidden-layer issue, part 6).

Runs docs/calibration/full/window.toml (logistic GLM, Adam, 50 datasets a cell) and plots each
trajectory estimator's median SE ratio against window steps / tau, where tau is batch means' own
estimate of the median integrated autocorrelation time in that cell. Writes window.png,
window.csv (the points of the figure) and window.md here; the study's files go to --out
(resumable). ``--redraw`` redraws window.png from window.csv alone.

    .venv/bin/python docs/calibration/window.py
    .venv/bin/python docs/calibration/window.py --redraw
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=str(HERE / "full" / "window.toml"))
    p.add_argument("--out", default="runs/calibration-window")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--doc", default=str(HERE), help="folder for window.png and window.md")
    p.add_argument("--redraw", action="store_true", help="redraw window.png from window.csv in --doc, nothing else")
    args = p.parse_args()
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
