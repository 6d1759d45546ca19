"""Every figure script draws readable figures: a title on each axes, no two tick labels of one
axis overlapping, no axis label or title overlapping another, and outliers clipped and counted.
Each plotting function is rendered on small synthetic tables, the shape of the real ones."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _script(relpath: str):
    """Import a script under docs/ as a module."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overlap(a, b, gap: float = 0.0) -> bool:
    """Whether two boxes (pixels) overlap or come closer than ``gap`` in both directions."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > -gap and min(a.y1, b.y1) - max(a.y0, b.y0) > -gap


def _gap(text, fig) -> float:
    """A readable gap between two labels: 0.4 of the font size (about a space), in pixels."""
    return 0.4 * text.get_fontsize() * fig.dpi / 72


def _tick_labels(axis):
    """The tick labels drawn: non-empty, visible, at a tick inside the view limits."""
    lo, hi = sorted(axis.get_view_interval())
    span = hi - lo
    out = []
    for minor in (False, True):
        locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
        for loc, label in zip(locs, axis.get_ticklabels(minor=minor)):
            if label.get_visible() and label.get_text().strip() and lo - 1e-9 * span <= loc <= hi + 1e-9 * span:
                out.append(label)
    return out


def check_readable(fig) -> None:
    """Titles on every axes; no overlapping tick labels within an axis; no overlapping axis labels,
    titles or figure labels anywhere in the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = []
    for i, ax in enumerate(fig.axes):
        assert any(ax.get_title(loc=loc).strip() for loc in ("center", "left", "right")), f"axes {i} has no title"
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _tick_labels(axis)
            boxes = [t.get_window_extent(renderer) for t in labels]
            for (ta, a), (tb, b) in itertools.combinations(zip(labels, boxes), 2):
                assert not _overlap(a, b, _gap(ta, fig)), (f"axes {i} ({ax.get_title()!r}): {name} tick labels "
                                                           f"{ta.get_text()!r} and {tb.get_text()!r} overlap or touch")
        texts += [t for t in (ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label)
                  if t.get_visible() and t.get_text().strip()]
    texts += [t for t in (fig._suptitle, fig._supxlabel, fig._supylabel) if t is not None and t.get_text().strip()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for (ta, a), (tb, b) in itertools.combinations(zip(texts, boxes), 2):
        assert not _overlap(a, b, _gap(ta, fig)), f"{ta.get_text()!r} and {tb.get_text()!r} overlap or touch"
    plt.close(fig)


# --- synthetic tables -------------------------------------------------------------------------

SETTINGS = ["adam lr=0.01 S=32 replacement 45/60ep", "sgd lr=0.05 S=32 replacement 45/60ep",
            "adam lr=0.01 S=32 shuffle 45/60ep"]


def _cells(rng) -> pd.DataFrame:
    """Per-weight rows: two GLM designs against exact Wald, one hidden design against the teacher
    and the sandwich; two failed bootstrap estimates at 1e-8 (the outliers to clip)."""
    rows = []
    for design, refs in (("logistic", ["wald"]), ("linear", ["wald"]), ("teacher-regression", ["teacher", "wald-sandwich"])):
        for setting in SETTINGS:
            for rep in range(2):
                ref_se = np.exp(rng.uniform(np.log(5e-3), np.log(0.5), 12))
                truth = np.where(np.arange(12) < 4, 0.0, rng.normal(0, 1, 12)) if design != "teacher-regression" else np.full(12, np.nan)
                for est in ("pseudo", "curvature", "bootstrap", "wald"):
                    se = ref_se * np.exp(rng.normal(0, 0.4, 12))
                    if est == "bootstrap" and design == "teacher-regression" and rep == 0 and setting == SETTINGS[0]:
                        se[:2] = 1e-8
                    for ref in refs:
                        rows += [dict(design=design, setting=setting, reference=ref, replication=rep, estimator=est,
                                      se=s, ref_se=r, truth=t, weight=(0 if np.isnan(t) else t) + rng.normal(0, r))
                                 for s, r, t in zip(se, ref_se, truth)]
    return pd.DataFrame(rows)


def _summary(rng, estimators=("pseudo", "calibrated", "batch-means", "curvature", "wald"), ratios=(0.2, 4)) -> pd.DataFrame:
    rows = []
    for design, refs in (("logistic", ["wald"]), ("teacher-regression", ["wald-sandwich", "bootstrap", "teacher"])):
        for setting, wd in zip(SETTINGS, (1e-4, 1e-3, 1e-2)):
            for est in estimators:
                for ref in refs:
                    cov = rng.uniform(0.5, 0.97) if design == "logistic" else np.nan
                    rows.append(dict(design=design, setting=setting, estimator=est, reference=ref, weight_decay=wd,
                                     coverage95=cov, coverage95_lo=cov - 0.01, coverage95_hi=cov + 0.01, n_truth=2000,
                                     se_ratio_median=np.exp(rng.uniform(*np.log(ratios))), ref_mc_rel_error=0.05,
                                     interval_dof=np.inf))
    return pd.DataFrame(rows)


def _pruning_results(rng) -> pd.DataFrame:
    rows = []
    for dataset, model, scope, wd in (("digits", "mlp", "global", 1e-3), ("mnist5k", "lenet5", "layer", 0.0),
                                      ("mnist1d", "cnn1d", "global", 1e-2)):
        for seed in range(2):
            rows.append(dict(dataset=dataset, model=model, scope=scope, weight_decay=wd, seed=seed, label="dense",
                             target_sparsity=0.0, test_accuracy=0.97))
            for label in ("magnitude", "mu[pseudo]", "mu[kfac]"):
                for s in (0.5, 0.75, 0.875, 0.9375, 0.95, 0.98):
                    rows.append(dict(dataset=dataset, model=model, scope=scope, weight_decay=wd, seed=seed, label=label,
                                     target_sparsity=s, test_accuracy=rng.uniform(0.1, 0.97)))
    return pd.DataFrame(rows)


# --- the figures ------------------------------------------------------------------------------

def test_calibration_loglog_clips_outliers_and_says_so():
    from validation.report import LOGLOG_CLIP, draw_loglog

    fig = draw_loglog(_cells(np.random.default_rng(0)))
    titles = [ax.get_title() for ax in fig.axes]
    clipped = [t for t in titles if "clipped" in t]
    assert clipped == ["bootstrap · replacement (2 clipped)"], titles
    assert "clipped" in fig._suptitle.get_text()
    for ax in fig.axes:   # no axis stretched by the 1e-8 estimates: at most the reference range +- the clip
        lo, hi = ax.get_ylim()
        assert hi / lo < 100 * LOGLOG_CLIP**2 * 1.3**2
    check_readable(fig)


@pytest.mark.parametrize("name", ["draw_qq", "draw_coverage", "draw_hidden"])
def test_calibration_figures_are_readable(name):
    import validation.report as report

    rng = np.random.default_rng(1)
    data = _cells(rng) if name == "draw_qq" else _summary(rng)
    check_readable(getattr(report, name)(data))


def test_hidden_figure_with_many_estimators_and_a_wide_range_is_readable():
    """19 estimators (the marginal study's) and ratios from 0.05 to 8: the panels grow, the ticks thin."""
    from validation.report import draw_hidden

    summary = _summary(np.random.default_rng(8), estimators=[f"estimator-{i}" for i in range(19)], ratios=(0.05, 8))
    check_readable(draw_hidden(summary))


def test_calibration_figures_redraw_from_their_points(tmp_path):
    """A study keeps the figures' points beside them; the figures redraw from those and summary.csv."""
    from validation.report import QQ_POINTS, loglog_data, qq_data, redraw

    rng = np.random.default_rng(7)
    cells = _cells(rng)
    cells = cells[cells.estimator.isin(["pseudo", "wald"])]   # two panels: the test is of the files, not the looks
    _summary(rng).to_csv(tmp_path / "summary.csv", index=False)
    loglog_data(cells).to_csv(tmp_path / "loglog_points.csv", index=False)
    q = qq_data(cells)
    assert q.groupby(["estimator", "sampler"]).size().max() <= QQ_POINTS
    q.to_csv(tmp_path / "qq_points.csv", index=False)
    written = {p.name for p in redraw(tmp_path)}
    assert written == {"coverage.png", "hidden_layers.png", "loglog_se.png", "qq_null_pvalues.png"}


def test_window_figure_is_readable():
    window = _script("docs/calibration/window.py")
    rng = np.random.default_rng(2)
    s = pd.DataFrame([dict(lr=lr, batch_size=b, window=w, window_steps=w * 100, steps_per_tau=rng.uniform(20, 600),
                           estimator=e, se_ratio_median=rng.uniform(0.2, 2.0), coverage95=np.nan)
                      for lr in (0.005, 0.05) for b in (16, 64) for w in (10, 150)
                      for e in ("pseudo", "calibrated", "batch-means")])
    check_readable(window.figure(s))


def test_window_figure_redraws_from_the_committed_csv():
    window = _script("docs/calibration/window.py")
    s = pd.read_csv(ROOT / "docs" / "calibration" / "window.csv")
    assert list(s.columns) == window.COLUMNS
    check_readable(window.figure(s))


def test_run_figure_is_readable():
    from mustat.results import figure

    results = _pruning_results(np.random.default_rng(3))
    one = results[(results.dataset == "digits") & (results.scope == "global")]
    check_readable(figure(one, chance=0.1))


def test_benchmark_figure_is_readable():
    from mustat.benchmark import figure

    check_readable(figure(_pruning_results(np.random.default_rng(4))))


def test_scale_figure_is_readable():
    from mustat.scaling import figure

    rng = np.random.default_rng(5)
    df = pd.DataFrame([dict(mode=mode, c=c, label=label, seed=seed, test_accuracy=rng.uniform(0.1, 0.9))
                       for mode in ("after", "init") for c in (0.1, 0.3, 1, 3, 10)
                       for label in ("magnitude", "mu[pseudo]") for seed in range(3)])
    check_readable(figure(df))


def test_structured_figure_is_readable():
    bench = _script("docs/structured/benchmark.py")
    rng = np.random.default_rng(6)
    rows = []
    for model in ("mlp", "lenet5"):
        for seed in range(2):
            rows.append(dict(model=model, label="dense", round=0, seed=seed, speedup_b1=1.0, speedup_b128=1.0,
                             test_accuracy=0.95))
            for label in ("wald[kfac]", "magnitude"):
                for rnd in range(1, 5):
                    rows.append(dict(model=model, label=label, round=rnd, seed=seed, speedup_b1=1 + 0.2 * rnd + rng.uniform(0, 0.1),
                                     speedup_b128=1 + 0.5 * rnd + rng.uniform(0, 0.2), test_accuracy=rng.uniform(0.5, 0.95)))
    check_readable(bench.figure(pd.DataFrame(rows)))


def test_the_checker_finds_overlapping_tick_labels():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(np.arange(20), [f"label {i}" for i in range(20)])
    ax.set_title("crowded")
    with pytest.raises(AssertionError, match="tick labels"):
        check_readable(fig)
    fig, ax = plt.subplots()
    with pytest.raises(AssertionError, match="no title"):
        check_readable(fig)
