"""Figures (seaborn, drawn from the tidy tables) and the Markdown report of a study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mustat._io import atomic_write
from mustat.uncertainty import ESTIMATORS, variant
from validation.metrics import pvalues, zvalues

#: the rows of the headline tables: every registered estimator (the study's variants aside)
MAIN_ESTIMATORS = list(ESTIMATORS)


def quantity_of(label: str) -> str:
    """``"sampling"`` or ``"saliency"`` for an estimator label (its class's ``quantity``; for the
    estimators with a ``kind`` option, the sandwich is a sampling SE), ``"reference"`` otherwise."""
    try:
        name, opts = variant(label.removesuffix("@mean"))
    except ValueError:
        return "reference"
    q = ESTIMATORS[name].quantity
    if isinstance(q, property):
        return "sampling" if opts.get("kind") == "sandwich" else "saliency"
    return q
TRAJECTORY = [name for name, cls in ESTIMATORS.items() if cls.trajectory]


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


def _log_ticks(axis, lo: float | None = None, hi: float | None = None) -> None:
    """Readable ticks on a log axis: minor labels (2x10^1, 3x10^1, ...) collide on an axis that
    spans a decade or two. With the data's range ``lo``..``hi`` under two decades, plain numbers
    on the 1-2-5 sequence inside it; otherwise decade ticks labelled 10^k, at most five."""
    import matplotlib.ticker as mticker

    axis.set_minor_formatter(mticker.NullFormatter())
    if lo is not None and hi is not None and 0 < lo < hi and hi / lo < 100:
        k0, k1 = int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1
        ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
        if len(ticks) >= 2:
            axis.set_major_locator(mticker.FixedLocator(ticks))
            axis.set_major_formatter(mticker.FixedFormatter([f"{t:g}" for t in ticks]))
            return
    axis.set_major_locator(mticker.LogLocator(base=10, numticks=5))
    axis.set_major_formatter(mticker.LogFormatterSciNotation(base=10))


def hidden_designs(table: pd.DataFrame) -> set[str]:
    """Designs scored against the bootstrap or the teacher as a reference: the hidden-layer ones
    (a GLM's bootstrap is an estimator row, scored against exact Wald)."""
    return set(table.loc[table.reference.isin(["bootstrap", "teacher"]), "design"])


def _primary(cells: pd.DataFrame) -> pd.DataFrame:
    """One reference per weight: the exact Wald SE for GLMs, the teacher replicates (else the
    sandwich) for hidden layers."""
    hidden = cells.design.isin(hidden_designs(cells))
    teacher = cells.design.isin(set(cells.loc[cells.reference == "teacher", "design"]))
    keep = ~hidden | np.where(teacher, cells.reference == "teacher", cells.reference == "wald-sandwich")
    return cells[keep]


#: in the log-log figure, estimator SEs further than this factor outside the range of the reference
#: SEs (a failed estimate: 1e-8, or 1e3 times the reference) are drawn on the panel's edge
LOGLOG_CLIP = 10.0


#: the columns of loglog_points.csv, the log-log figure's points (a study keeps them beside the figure)
LOGLOG_COLUMNS = ["design", "setting", "optimizer", "sampler", "estimator", "ref_se", "se"]
#: the columns of qq_points.csv: at most QQ_POINTS quantiles per estimator and sampler
QQ_COLUMNS = ["estimator", "sampler", "expected", "observed"]
QQ_POINTS = 400


def loglog_data(cells: pd.DataFrame) -> pd.DataFrame:
    """The points of :func:`loglog_figure` (columns ``LOGLOG_COLUMNS``): replication 0, every main
    estimator but the reference. A table that already has those columns (``loglog_points.csv``)
    is returned as it is."""
    if "replication" not in cells and set(LOGLOG_COLUMNS) <= set(cells):
        return cells[LOGLOG_COLUMNS].copy()
    cells = _primary(cells)
    d = cells[(cells.replication == 0) & cells.estimator.isin([e for e in MAIN_ESTIMATORS if e != "wald"]) & (cells.se > 0)
              & np.isfinite(cells.se) & (cells.ref_se > 0)].copy()
    d["optimizer"] = d["setting"].str.split(" ").str[0]
    d["sampler"] = np.where(d["setting"].str.contains("replacement"), "replacement", "shuffle")
    return d[LOGLOG_COLUMNS]


def draw_loglog(cells: pd.DataFrame):
    """The figure of :func:`loglog_figure` (a matplotlib Figure, not saved), from the per-weight
    cells or from their :func:`loglog_data`."""
    sns = _setup()
    d = loglog_data(cells)
    # clip per panel: each panel's axes span the reference SEs' range widened by LOGLOG_CLIP both
    # ways, the same on both axes so the diagonal is the diagonal; points outside go on the edge
    d["clipped"] = False
    limits = {}
    for key, g in d.groupby(["sampler", "estimator"]):
        lo, hi = g.ref_se.min() / LOGLOG_CLIP, g.ref_se.max() * LOGLOG_CLIP
        out = (g.se < lo) | (g.se > hi)
        d.loc[g.index, "se"] = g.se.clip(lo, hi)
        d.loc[g.index, "clipped"] = out
        limits[key] = (lo / 1.3, hi * 1.3, int(out.sum()))
    estimators = list(dict.fromkeys(d.estimator))
    g = sns.relplot(data=d, x="ref_se", y="se", col="estimator", row="sampler", hue="optimizer", style="design",
                    kind="scatter", height=2.8, facet_kws=dict(sharex=False, sharey=False), alpha=0.7,
                    col_order=estimators)
    for (sampler, est), ax in g.axes_dict.items():
        lo, hi, n_out = limits.get((sampler, est), (None, None, 0))
        ax.set(xscale="log", yscale="log")
        if lo is not None:
            ax.set(xlim=(lo, hi), ylim=(lo, hi))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        _log_ticks(ax.xaxis)
        _log_ticks(ax.yaxis)
        ax.set_title(f"{est} · {sampler}" + (f" ({n_out} clipped)" if n_out else ""))
        ax.set(xlabel="", ylabel="")
    g.figure.supxlabel("reference SE (Wald: GLMs; teacher replicates or sandwich: MLPs)", y=0.0)
    g.figure.supylabel("estimator SE", x=0.0)
    g.figure.suptitle(f"Estimator SE against the reference SE (replication 0); SEs more than {LOGLOG_CLIP:g}x "
                      "outside the reference range are clipped to the panel's edge (count in the panel title)",
                      y=1.02, fontsize=10)
    return g.figure


def loglog_figure(cells: pd.DataFrame, path: Path) -> Path:
    """Estimator SE against the reference SE, log-log, one panel per estimator (replication 0);
    estimator SEs more than ``LOGLOG_CLIP`` times outside the reference SEs' range are drawn on the
    panel's edge, and each panel's title counts them."""
    _save(draw_loglog(cells), path)
    return path


def qq_data(cells: pd.DataFrame, dof: dict[str, float] | None = None) -> pd.DataFrame:
    """The points of :func:`qq_figure` (columns ``QQ_COLUMNS``): per estimator and sampler, the
    sorted null p-values against U(0, 1) quantiles, thinned to ``QQ_POINTS`` evenly spaced ranks
    (the line is the same). Empty when no weight has a known zero truth."""
    if "truth" not in cells and set(QQ_COLUMNS) <= set(cells):
        return cells[QQ_COLUMNS].copy()
    d = cells[cells.truth.notna() & (cells.truth == 0) & cells.estimator.isin(TRAJECTORY + ["wald"])].copy()
    if d.empty:
        return pd.DataFrame(columns=QQ_COLUMNS)
    d["p"] = pvalues(zvalues(d["weight"].to_numpy(), d["se"].to_numpy()))
    for est, k in (dof or {}).items():
        rows = d.estimator == est
        if rows.any():
            d.loc[rows, "p"] = pvalues(zvalues(d.loc[rows, "weight"].to_numpy(), d.loc[rows, "se"].to_numpy()), k)
    d["sampler"] = np.where(d["setting"].str.contains("replacement"), "replacement", "shuffle")
    parts = []
    for (est, sampler), g in d.groupby(["estimator", "sampler"]):
        p = np.sort(g["p"].to_numpy())
        keep = np.unique(np.linspace(0, len(p) - 1, min(len(p), QQ_POINTS)).round().astype(int))
        parts.append(pd.DataFrame(dict(estimator=est, sampler=sampler,
                                       expected=((np.arange(1, len(p) + 1) - 0.5) / len(p))[keep], observed=p[keep])))
    return pd.concat(parts, ignore_index=True)[QQ_COLUMNS]


def draw_qq(cells: pd.DataFrame, dof: dict[str, float] | None = None):
    """The figure of :func:`qq_figure` from the per-weight cells or their :func:`qq_data`, or None
    when no weight has a known zero truth."""
    sns = _setup()
    q = qq_data(cells, dof)
    if q.empty:
        return None
    g = sns.relplot(data=q, x="expected", y="observed", hue="estimator", col="sampler", kind="line", height=3)
    for ax in g.axes.flat:
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    g.set_titles("{col_name} minibatches")
    g.set_axis_labels("U(0, 1) quantile", "null p-value quantile")
    g.figure.suptitle("Null p-values against U(0, 1): on the diagonal when the test is calibrated", y=1.04, fontsize=10)
    return g.figure


def qq_figure(cells: pd.DataFrame, path: Path, dof: dict[str, float] | None = None) -> Path:
    """QQ plot of null-weight p-values against U(0, 1), per estimator and sampler; an estimator
    with interval degrees of freedom in ``dof`` is referred to Student's t, as its summary rows are."""
    fig = draw_qq(cells, dof)
    if fig is not None:
        _save(fig, path)
    return path


def draw_coverage(summary: pd.DataFrame):
    """The figure of :func:`coverage_figure`, or None when no cell has a coverage."""
    sns = _setup()
    import matplotlib.pyplot as plt

    d = summary[summary.coverage95.notna() & summary.estimator.isin(MAIN_ESTIMATORS)].copy()
    if d.empty:
        return None
    d["cell"] = d["design"] + " · " + d["setting"]
    cells = list(dict.fromkeys(d["cell"]))
    ests = list(dict.fromkeys(d["estimator"]))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(cells) * max(1, len(ests)) ** 0.5 + 1.5))
    palette = sns.color_palette(n_colors=len(ests))
    for j, est in enumerate(ests):
        e = d[d.estimator == est]
        ypos = np.array([cells.index(c) for c in e["cell"]]) + (j - (len(ests) - 1) / 2) * 0.8 / len(ests)
        ax.errorbar(e["coverage95"], ypos, xerr=[e["coverage95"] - e["coverage95_lo"], e["coverage95_hi"] - e["coverage95"]],
                    fmt="o", ms=3, color=palette[j], label=est, lw=1)
    ax.set_yticks(range(len(cells)), cells, fontsize=7)
    ax.invert_yaxis()
    n = float(d["n_truth"].median())
    ax.axvspan(0.935, 0.965, color="grey", alpha=0.2, label=f"0.95 ± 0.015 (n = {n:.0f} intervals a cell)")
    ax.axvline(0.95, color="grey", lw=1)
    ax.set(xlabel="coverage of 95% intervals with Wilson 95% intervals (GLM designs with known truth)", ylabel="")
    ax.set_title("Coverage of 95% intervals by cell and estimator")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def coverage_figure(summary: pd.DataFrame, path: Path) -> Path:
    """Coverage of 95% intervals by training setting, with the binomial band around 0.95."""
    fig = draw_coverage(summary)
    if fig is not None:
        _save(fig, path)
    return path


def draw_hidden(summary: pd.DataFrame):
    """The figure of :func:`hidden_figure`, or None when there is no hidden-layer cell."""
    designs = hidden_designs(summary)
    d = summary[summary.design.isin(designs) & np.isfinite(summary.se_ratio_median)
                & (summary.se_ratio_median > 0) & (summary.estimator != "wald")].copy()
    if d.empty:
        return None
    sns = _setup()
    d["cell"] = d["design"] + " · wd=" + d["weight_decay"].map("{:g}".format)
    # a row of labels per estimator: the panels grow with their number (19 in the marginal study)
    height = max(3.2, 0.2 * d["estimator"].nunique() + 0.8)
    g = sns.catplot(data=d, x="se_ratio_median", y="estimator", hue="cell", col="reference", kind="point",
                    linestyle="none", dodge=0.5 if d["cell"].nunique() > 1 else False, height=height,
                    aspect=1.1 * 3.2 / height, log_scale=(True, False))
    import matplotlib.ticker as mticker

    for ax, ref in zip(g.axes.flat, g.col_names):
        ax.axvspan(0.8, 1.25, color="grey", alpha=0.15)
        mc = float(d.loc[d.reference == ref, "ref_mc_rel_error"].max())
        if mc > 0:
            ax.axvspan(1 - 2 * mc, 1 + 2 * mc, color="tab:orange", alpha=0.15)
        ax.axvline(1, color="grey", lw=1)
        # powers of 2 inside the view: every other one (1 kept) when more than five would crowd;
        # the band's edges 0.8 and 1.25 added when fewer than three fit
        lo, hi = sorted(ax.get_xlim())
        ticks = [2.0**k for k in range(-10, 11) if lo <= 2.0**k <= hi]
        if len(ticks) > 5:
            ticks = [t for t in ticks if round(np.log2(t)) % 2 == 0]
        elif len(ticks) < 3:
            ticks = sorted({*ticks, 0.8, 1.25})
        ax.xaxis.set_major_locator(mticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(mticker.FixedFormatter([f"1/{1 / t:g}" if t < 0.5 else f"{t:g}" for t in ticks]))
        ax.xaxis.set_minor_locator(mticker.NullLocator())
    g.set_titles("against {col_name}")
    g.set_axis_labels("median SE ratio", "")
    g.figure.suptitle("hidden layers: grey [0.8, 1.25]; orange ±2 Monte-Carlo errors of one weight's reference",
                      y=1.03, fontsize=9)
    return g.figure


def hidden_figure(summary: pd.DataFrame, path: Path) -> Path:
    """Hidden-layer cells: each estimator's median SE ratio against each reference (log scale), with
    the reference's own per-weight Monte-Carlo error as a band around 1 and [0.8, 1.25] shaded."""
    fig = draw_hidden(summary)
    if fig is not None:
        _save(fig, path)
    return path


def redraw(out: Path) -> list[Path]:
    """Redraw a study's figures from the tables in ``out``: ``coverage.png`` and
    ``hidden_layers.png`` from ``summary.csv``; ``loglog_se.png`` and ``qq_null_pvalues.png`` from
    ``cells.csv`` where it was kept, else from the points a study writes beside them
    (``loglog_points.csv``, ``qq_points.csv``). Returns the figures written; nothing is recomputed.

        .venv/bin/python -m validation.report docs/calibration/full
    """
    out = Path(out)
    summary = pd.read_csv(out / "summary.csv")
    written = []
    for draw, name in ((draw_coverage, "coverage.png"), (draw_hidden, "hidden_layers.png")):
        fig = draw(summary)
        if fig is not None:
            _save(fig, out / name)
            written.append(out / name)
    if (out / "cells.csv").exists():
        cells = pd.read_csv(out / "cells.csv")
        finite = summary[np.isfinite(summary.interval_dof.astype(float))]
        loglog, qq = cells, qq_data(cells, finite.groupby("estimator").interval_dof.median().to_dict())
    else:
        loglog = pd.read_csv(out / "loglog_points.csv") if (out / "loglog_points.csv").exists() else None
        qq = pd.read_csv(out / "qq_points.csv") if (out / "qq_points.csv").exists() else None
    if loglog is not None:
        written.append(loglog_figure(loglog, out / "loglog_se.png"))
    if qq is not None and not qq.empty:
        written.append(qq_figure(qq, out / "qq_null_pvalues.png"))
    return written


def _fmt(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3g")


def write_report(out: Path, summary: pd.DataFrame, cells: pd.DataFrame) -> Path:
    """Figures plus ``report.md``: headline tables and a reading generated from the numbers."""
    out = Path(out)
    # the figures' points, small enough to commit: the figures redraw from them without cells.csv
    points = loglog_data(cells)
    atomic_write(out / "loglog_points.csv", lambda t: points.to_csv(t, index=False))
    loglog_figure(points, out / "loglog_se.png")
    finite = summary[np.isfinite(summary.interval_dof.astype(float))]
    q = qq_data(cells, dof=finite.groupby("estimator").interval_dof.median().to_dict())
    if not q.empty:
        atomic_write(out / "qq_points.csv", lambda t: q.to_csv(t, index=False))
        qq_figure(q, out / "qq_null_pvalues.png")
    coverage_figure(summary, out / "coverage.png")
    hidden_figure(summary, out / "hidden_layers.png")
    cols = ["design", "setting", "estimator", "centre", "se_ratio_median", "loglog_slope", "spearman_z",
            "frac_est_inf", "coverage95", "coverage95_lo", "coverage95_hi", "covered_only_est", "covered_only_ref",
            "mcnemar_pvalue", "width95_median", "type1_05", "type1_05_lo", "type1_05_hi", "n_truth", "n_null",
            "ks_null_pvalue", "interval_dof", "window_ok"]
    glm = summary[~summary.design.isin(hidden_designs(summary))]
    head = glm[glm.estimator.isin(MAIN_ESTIMATORS)][cols].copy()
    head.insert(head.columns.get_loc("centre") + 1, "quantity", head.estimator.map(quantity_of))
    lines = ["# Calibration study", "",
             "Standard errors of each estimator against references: the exact Wald SE at the (penalised)",
             "optimum for GLM designs (no hidden layer; the sandwich when the fit has weight decay), and for",
             "hidden-layer designs the penalised sandwich, the converged bootstrap and the teacher replicates",
             "(section below). `window_ok`: whether the estimator's own diagnostic accepts its window. Truth",
             "metrics (coverage and type-I error with Wilson 95% intervals, KS of null p-values, power) pool",
             "the simulated datasets of a cell; `covered_only_est` / `covered_only_ref` count the intervals",
             "only the estimator's or only the exact reference's covers (the same weights of the same datasets),",
             "`mcnemar_pvalue` is McNemar's exact test of equal coverage, `width95_median` the estimator's",
             "median interval width; an estimator with finite `interval_dof` (batch means) has",
             "t intervals with that many degrees of freedom. Ratio metrics pool every weight whose reference SE is finite and positive; a failed",
             "estimate (inf or 0) stays in the median and is counted (`frac_est_inf`, `frac_est_zero`).",
             "Tables: `summary.csv` (one row per cell, estimator and reference), `cells.csv` (one row per weight),",
             "`loglog_points.csv` and `qq_points.csv` (the figures' points: `python -m validation.report DIR` redraws them).", "",
             "## Reading", ""]
    lines += _reading(glm)
    lines += ["", "## GLM designs", "", _fmt(head), ""]
    lines += _hidden(summary)
    # link only the figures drawn (a study without GLM cells has no coverage figure)
    figures = [f"![{alt}]({name})" for alt, name in (("log-log SE", "loglog_se.png"),
               ("QQ of null p-values", "qq_null_pvalues.png"), ("coverage", "coverage.png")) if (out / name).exists()]
    if figures:
        lines += ["", "## Figures", ""] + [x for f in figures for x in (f, "")]
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


HIDDEN_COLS = ["design", "setting", "estimator", "reference", "se_ratio_median", "se_ratio_iqr", "spearman_z",
               "frac_est_inf", "ref_mc_rel_error", "window_ok"]
DIAG_COLS = ["design", "setting", "fit_grad_max", "fit_min_eig", "fit_at_minimum", "fit_drift_over_se", "ref_converged_frac",
             "basin_z_median", "balance_max", "bootstrap_B", "teacher_replicates", "cell_seconds"]


def _hidden(summary: pd.DataFrame) -> list[str]:
    """Hidden-layer cells: first how far the references agree, then every estimator against each."""
    designs = hidden_designs(summary)
    if not designs:
        return []
    h = summary[summary.design.isin(designs)]
    refs = {"wald-sandwich", "bootstrap", "teacher"}
    agree = h[h.estimator.isin(refs | {"wald"})]
    lines = ["", "## Hidden layers", "",
             "One-hidden-layer networks with weight decay, scored against three references at the penalised",
             "optimum the trained network sits near: the exact penalised sandwich (`wald-sandwich`), the",
             "converged penalised bootstrap (`bootstrap`, Newton refits warm-started there) and the SD of",
             "gauge-fixed teacher replicates (`teacher`, fresh datasets, hidden units matched to the teacher's).",
             "`wald` (inverse observed information) is the Laplace posterior SD, not a sampling SE, with a penalty.",
             "", "### How far the references agree", "", _fmt(agree[HIDDEN_COLS]), "",
             "### Convergence and gauge of the references", "",
             "`fit_drift_over_se`: how far the polished fit still moved over the second half of its Newton",
             "iterations, in bootstrap SEs; `ref_converged_frac`: refits (and teacher fits) at a strict minimum",
             "that moved less than 0.1 SE; `basin_z_median`: median |fit - teacher-replicate mean| / teacher SD",
             "(0.67 if the fit is one more draw from the replicates' distribution); `balance_max`: the",
             "largest unit imbalance of the teacher fits (0 at a penalised optimum).", "",
             _fmt(h.drop_duplicates(["design", "setting"])[DIAG_COLS]), "",
             "### Every estimator against each reference", "",
             _fmt(h[~h.estimator.isin(refs | {"wald"})][HIDDEN_COLS]), "",
             "![hidden layers](hidden_layers.png)", ""]
    return lines


if __name__ == "__main__":
    import sys

    for folder in sys.argv[1:] or ["."]:
        for path in redraw(Path(folder)):
            print(path)
