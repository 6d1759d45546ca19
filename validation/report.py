"""Figures (seaborn, drawn from the tidy tables) and the Markdown report of a study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mustat._io import atomic_write
from validation.metrics import pvalues, zvalues

MAIN_ESTIMATORS = ["pseudo", "calibrated", "batch-means", "curvature", "bootstrap", "wald"]
TRAJECTORY = ["pseudo", "calibrated", "batch-means"]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _setup():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return sns


def loglog_figure(cells: pd.DataFrame, path: Path) -> Path:
    """Estimator SE against the reference SE, log-log, one panel per estimator (replication 0)."""
    sns = _setup()
    d = cells[(cells.replication == 0) & cells.estimator.isin(TRAJECTORY + ["curvature"]) & (cells.se > 0)
              & np.isfinite(cells.se) & (cells.ref_se > 0)].copy()
    d["optimizer"] = d["setting"].str.split(" ").str[0]
    d["sampler"] = np.where(d["setting"].str.contains("replacement"), "replacement", "shuffle")
    g = sns.relplot(data=d, x="ref_se", y="se", col="estimator", row="sampler", hue="optimizer", style="design",
                    kind="scatter", height=2.8, facet_kws=dict(sharex=False, sharey=False), alpha=0.7)
    for ax in g.axes.flat:
        ax.set(xscale="log", yscale="log")
        lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    g.set_titles("{col_name} · {row_name}")
    g.set_axis_labels("reference SE (Wald: GLMs; bootstrap: MLPs)", "estimator SE")
    _save(g.figure, path)
    return path


def qq_figure(cells: pd.DataFrame, path: Path) -> Path:
    """QQ plot of null-weight p-values against U(0, 1), per estimator and sampler."""
    sns = _setup()
    d = cells[cells.truth.notna() & (cells.truth == 0) & cells.estimator.isin(TRAJECTORY + ["wald"])].copy()
    if d.empty:
        return path
    d["p"] = pvalues(zvalues(d["weight"].to_numpy(), d["se"].to_numpy()))
    d["sampler"] = np.where(d["setting"].str.contains("replacement"), "replacement", "shuffle")
    parts = []
    for (est, sampler), g in d.groupby(["estimator", "sampler"]):
        p = np.sort(g["p"].to_numpy())
        parts.append(pd.DataFrame(dict(estimator=est, sampler=sampler, expected=(np.arange(1, len(p) + 1) - 0.5) / len(p), observed=p)))
    q = pd.concat(parts)
    g = sns.relplot(data=q, x="expected", y="observed", hue="estimator", col="sampler", kind="line", height=3)
    for ax in g.axes.flat:
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    g.set_titles("{col_name} minibatches")
    g.set_axis_labels("U(0, 1) quantile", "null p-value quantile")
    _save(g.figure, path)
    return path


def coverage_figure(summary: pd.DataFrame, path: Path) -> Path:
    """Coverage of 95% intervals by training setting, with the binomial band around 0.95."""
    sns = _setup()
    import matplotlib.pyplot as plt

    d = summary[summary.coverage95.notna() & summary.estimator.isin(MAIN_ESTIMATORS)]
    if d.empty:
        return path
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.pointplot(data=d, y="setting", x="coverage95", hue="estimator", linestyle="none", dodge=0.4, ax=ax)
    n = float(d["n_truth"].median())
    band = 2 * np.sqrt(0.95 * 0.05 / n)
    ax.axvspan(0.95 - band, 0.95 + band, color="grey", alpha=0.2, label=f"0.95 ± 2 binomial SE (n={n:.0f})")
    ax.axvline(0.95, color="grey", lw=1)
    ax.set(xlabel="coverage of 95% intervals (GLM designs with known truth)", ylabel="")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return path


def _fmt(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3g")


def write_report(out: Path, summary: pd.DataFrame, cells: pd.DataFrame) -> Path:
    """Figures plus ``report.md``: headline tables and a reading generated from the numbers."""
    out = Path(out)
    loglog_figure(cells, out / "loglog_se.png")
    qq_figure(cells, out / "qq_null_pvalues.png")
    coverage_figure(summary, out / "coverage.png")
    cols = ["design", "setting", "estimator", "se_ratio_median", "loglog_slope", "spearman_z", "jaccard_50",
            "coverage95", "type1_05", "ks_null", "window_ok"]
    head = summary[summary.estimator.isin(MAIN_ESTIMATORS)][cols]
    lines = ["# Calibration study", "",
             "Standard errors of each estimator against a reference: the exact Wald SE at the (penalised)",
             "optimum for GLM designs (no hidden layer; the sandwich when the fit has weight decay), the",
             "warm-started bootstrap with the same weight decay for MLPs. `window_ok`: the fraction of runs",
             "whose window the estimator's own diagnostic accepts. Truth metrics",
             "(coverage, type-I error, KS of null p-values, power) pool the simulated replications.",
             "Tables: `summary.csv` (one row per cell and estimator), `cells.csv` (one row per weight).", "",
             "## Reading", ""]
    lines += _reading(summary)
    lines += ["", "## Headline rows", "", _fmt(head), "",
              "## Figures", "", "![log-log SE](loglog_se.png)", "", "![QQ of null p-values](qq_null_pvalues.png)", "",
              "![coverage](coverage.png)", ""]
    return atomic_write(out / "report.md", lambda t: Path(t).write_text("\n".join(lines)))


def _reading(summary: pd.DataFrame) -> list[str]:
    out = []
    for est in MAIN_ESTIMATORS:
        s = summary[summary.estimator == est]
        if s.empty:
            continue
        for sampler in ("replacement", "shuffle"):
            t = s[s.sampler == sampler] if est in TRAJECTORY else s
            if t.empty:
                continue
            cov = t.coverage95.dropna()
            where = f" ({sampler} minibatches)" if est in TRAJECTORY else ""
            text = (f"- **{est}**{where}: median SE ratio {t.se_ratio_median.min():.2f}–{t.se_ratio_median.max():.2f}, "
                    f"log-log slope {t.loglog_slope.min():.2f}–{t.loglog_slope.max():.2f}, "
                    f"Spearman of |z| {t.spearman_z.min():.2f}–{t.spearman_z.max():.2f}")
            if len(cov):
                text += f"; 95% coverage {cov.min():.2f}–{cov.max():.2f}, type-I error {t.type1_05.min():.2f}–{t.type1_05.max():.2f}"
            out.append(text + ".")
            if est not in TRAJECTORY:
                break
    return out
