"""The pruning benchmark: a grid of train -> prune -> retrain runs, each criterion against
magnitude pruning, with the statistics a comparison needs (mean, sd and 95% CI over seeds,
paired tests), from a TOML grid::

    criteria = ["magnitude", "random", "gradient-weight", "mu"]
    se = ["pseudo", "calibrated", "batch-means", "curvature"]   # each se-based criterion runs with each
    seeds = [0, 1, 2, 3, 4]
    target_sparsity = 0.99            # geometric rounds 50, 75, 87.5, 93.75, 96.9, 99 %
    [[experiment]]                    # list-valued keys expand (a Cartesian product)
    dataset = "mnist5k"               # or "mnist" / "cifar10" with data_dir = "path/to/your/files"
    model = ["mlp", "lenet5"]
    scope = ["global", "layer"]
    weight_decay = 1e-3
    epochs = 30
    retrain_epochs = 10
    track_epochs = 10

A *cell* is one experiment setting and one seed: every criterion of the grid runs in it
from the same dense model (one :func:`mustat.pipeline.run`), so criteria are compared
paired, seed by seed. A cell writes ``cells/<key>.csv`` atomically when it is complete;
its key is derived from every setting that shapes it, so a resumed benchmark never
reuses a stale cell, and an interrupted cell resumes from its own checkpoints. Cells run
serially or on Dask distributed (:mod:`mustat._cells`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from mustat._cells import grid_values, one_thread_in_dask_worker, read_grid, run_grid
from mustat._checks import check_option, check_scalar
from mustat._io import atomic_write
from mustat.config import DEFAULT_CRITERIA, TrainConfig, estimator_constants, expand, schedule
from mustat.data import DATASETS
from mustat.models import MODELS
from mustat.pipeline import run
from mustat.pruning import Scope
from mustat.results import RESULT_COLUMNS, metric
from mustat.runs import read_table
from mustat.uncertainty import default_estimators

#: the keys of an ``[[experiment]]`` block that are not :class:`TrainConfig` fields
EXPERIMENT_KEYS = ("dataset", "model", "scope", "schedule", "max_tensor_sparsity", "data_dir")
BASELINE = "magnitude"


@dataclass(frozen=True)
class Experiment:
    """One setting of the benchmark (everything but the seed and the criteria).
    ``max_tensor_sparsity = 0`` means no per-tensor cap; ``data_dir`` is the folder of a
    dataset read from your files (``mnist``, ``fashion_mnist``, ``cifar10``)."""

    dataset: str = "digits"
    model: str = "mlp"
    scope: str = "global"
    schedule: str = "geometric"
    max_tensor_sparsity: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    data_dir: str | None = None

    def __post_init__(self):
        for name in ("dataset", "model", "scope", "schedule"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a name (a string), got {getattr(self, name)!r}")
        check_option(self.dataset, "dataset", DATASETS)
        check_option(self.model, "model", MODELS)
        check_option(self.scope, "scope", Scope)
        check_scalar(self.max_tensor_sparsity, "max_tensor_sparsity", kind=Real, low=0.0, high=1.0)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise TypeError(f"data_dir must be a folder path (a string), got {self.data_dir!r}")

    def as_dict(self) -> dict:
        d = dict(dataset=self.dataset, model=self.model, scope=self.scope, schedule=self.schedule,
                 max_tensor_sparsity=self.max_tensor_sparsity, **asdict(self.train))
        if self.data_dir is not None:  # only then: the keys of bundled-data cells stay what they were
            d["data_dir"] = self.data_dir
        return d


@dataclass(frozen=True)
class BenchmarkGrid:
    experiments: tuple[Experiment, ...]
    criteria: tuple[str, ...] = DEFAULT_CRITERIA
    se: tuple[str, ...] = field(default_factory=lambda: tuple(default_estimators()))
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    target_sparsity: float = 0.99
    rounds: int = 5

    def __post_init__(self):
        if not self.experiments:
            raise ValueError("the grid has no [[experiment]] block")
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed")
        for seed in self.seeds:
            check_scalar(seed, "seeds", kind=Integral, low=0)
        expand(self.criteria, self.se)  # unknown names fail here, listing the valid ones
        schedule("geometric", self.target_sparsity, self.rounds)
        for e in self.experiments:
            schedule(e.schedule, self.target_sparsity, self.rounds)

    def cells(self) -> list[Cell]:
        return [Cell(e, seed, self.criteria, self.se, self.target_sparsity, self.rounds)
                for e in self.experiments for seed in self.seeds]

    def as_dict(self) -> dict:
        return dict(experiments=[e.as_dict() for e in self.experiments], criteria=list(self.criteria),
                    se=list(self.se), seeds=list(self.seeds), target_sparsity=self.target_sparsity, rounds=self.rounds)


@dataclass(frozen=True)
class Cell:
    experiment: Experiment
    seed: int
    criteria: tuple[str, ...]
    se: tuple[str, ...]
    target_sparsity: float
    rounds: int

    def settings(self) -> dict:
        # code-level constants that shape a result belong in the key too
        used = [s for _, s in expand(self.criteria, self.se) if s is not None]
        return dict(self.experiment.as_dict(), seed=self.seed, criteria=list(self.criteria), se=list(self.se),
                    target_sparsity=self.target_sparsity, rounds=self.rounds,
                    estimator_constants=estimator_constants(dict.fromkeys(used)))

    @property
    def key(self) -> str:
        e = self.experiment
        digest = hashlib.sha1(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{e.dataset}-{e.model}-{e.scope}-s{self.seed}-{digest}"


def run_cell(cell: Cell, out: str | Path, device: str = "cpu") -> str:
    """Run one cell (resuming its own checkpoints) and write ``cells/<key>.csv``; returns the key."""
    one_thread_in_dask_worker()
    out = Path(out)
    e = cell.experiment
    start = time.perf_counter()
    results = run(dataset=e.dataset, model=e.model, criteria=cell.criteria, se=cell.se, scope=e.scope,
                  schedule=e.schedule, target_sparsity=cell.target_sparsity, rounds=cell.rounds,
                  max_tensor_sparsity=e.max_tensor_sparsity or None, seeds=(cell.seed,), train=e.train,
                  data_dir=e.data_dir, device=device, out=out / "runs" / cell.key, quiet=True)
    for k, v in e.as_dict().items():
        results[k] = v  # the dense row too (the pipeline labels its scope "-"): it is this setting's baseline
    # the cost of this cell (of its last attempt, if it resumed from checkpoints) and the threads it ran on:
    # float32 training reproduces only at the same thread count
    results["cell_seconds"] = round(time.perf_counter() - start, 1)
    results["torch_threads"] = torch.get_num_threads()
    atomic_write(out / "cells" / f"{cell.key}.csv", lambda p: results.to_csv(p, index=False))
    return cell.key


def run_benchmark(grid: BenchmarkGrid, out: str | Path = "runs/benchmark", *, scheduler: str = "local",
                  workers: int = 2, device: str = "cpu", quiet: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or resume) a benchmark; writes ``params.json``, ``results.csv`` (every round of every
    cell), ``summary.csv``, ``report.md`` and ``accuracy_vs_sparsity.png`` into ``out``; returns
    ``(summary, results)``. ``scheduler``: ``"local"``, ``"serial"`` or a Dask scheduler address."""
    out = Path(out)
    cells = grid.cells()
    run_grid(run_cell, cells, out, key="grid", settings=grid.as_dict(),
             done=lambda c: (out / "cells" / f"{c.key}.csv").exists(), scheduler=scheduler, workers=workers,
             quiet=quiet, desc="benchmark cells", device=device)
    results = pd.concat([read_table(out / "cells" / f"{c.key}.csv", RESULT_COLUMNS) for c in cells], ignore_index=True)
    summary = summarise(results)
    atomic_write(out / "results.csv", lambda p: results.to_csv(p, index=False))
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    plot(results, out / "accuracy_vs_sparsity.png")
    atomic_write(out / "report.md", lambda p: Path(p).write_text(report(summary)))
    return summary, results


#: the columns that identify one comparison (one experiment setting), besides seed and criterion:
#: every field of an experiment, derived from the classes so a new setting is never merged over
SETTING = [*EXPERIMENT_KEYS, *(f.name for f in fields(TrainConfig))]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per setting, criterion and sparsity: the metric's mean, sd and 95% t-interval over
    seeds, the mean sparsity, compression ratio and theoretical FLOP speed-up, the dense
    baseline, and a paired comparison with magnitude pruning on the same seeds (mean
    difference; Wilcoxon signed-rank, sign-test and paired t p-values, two-sided)."""
    metric_col = metric(results)
    keys = [c for c in SETTING if c in results]
    dense = results[results.label == "dense"].groupby(keys, dropna=False)[metric_col].mean().rename("dense")
    pruned = results[results.label != "dense"]
    rows = []
    group_cols = keys + ["label", "target_sparsity"]
    for values, g in pruned.groupby(group_cols, dropna=False, sort=False):
        row = dict(zip(group_cols, values))
        x = g[metric_col].to_numpy(float)
        n = len(x)
        sd = float(np.std(x, ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
        lo, hi = float(x.mean()) - half, float(x.mean()) + half
        if metric_col == "test_accuracy":  # an accuracy lies in [0, 1]: the t-interval is clipped there
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        row.update(metric=metric_col, n_seeds=n, mean=float(x.mean()), sd=sd, ci_low=lo,
                   ci_high=hi, sparsity=float(g.sparsity.mean()),
                   compression_ratio=float(g.compression_ratio.mean()),
                   flop_speedup=float(g.flop_speedup.mean()) if "flop_speedup" in g else float("nan"))
        row.update(_paired(pruned, row, keys, metric_col))
        rows.append(row)
    summary = pd.DataFrame(rows)
    if len(summary):
        summary = summary.merge(dense.reset_index(), on=keys, how="left")
        if "cell_seconds" in results:
            cost = results.groupby(keys + ["seed"], dropna=False)[["cell_seconds", "torch_threads"]].first()
            cost = cost.groupby(keys, dropna=False).median()
            summary = summary.merge(cost.reset_index(), on=keys, how="left")
    return summary


def _paired(pruned: pd.DataFrame, row: dict, keys: list[str], metric: str) -> dict:
    nan = dict(diff_vs_magnitude=np.nan, wilcoxon_p=np.nan, sign_p=np.nan, paired_t_p=np.nan)
    if row["label"] == BASELINE:
        return nan
    same = np.ones(len(pruned), bool)
    for k in keys + ["target_sparsity"]:
        same &= (pruned[k] == row[k]).to_numpy() | (pruned[k].isna().to_numpy() & pd.isna(row[k]))
    here = pruned[same]
    a = here[here.label == row["label"]].set_index("seed")[metric]
    b = here[here.label == BASELINE].set_index("seed")[metric]
    seeds = a.index.intersection(b.index)
    if len(seeds) < 2:
        return nan
    d = (a[seeds] - b[seeds]).to_numpy(float)
    out = dict(diff_vs_magnitude=float(d.mean()))
    nonzero = d[d != 0]
    out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue) if len(nonzero) else 1.0
    out["sign_p"] = (float(stats.binomtest(int((nonzero > 0).sum()), len(nonzero)).pvalue)
                     if len(nonzero) else 1.0)
    out["paired_t_p"] = float(stats.ttest_rel(a[seeds], b[seeds]).pvalue) if d.std() > 0 else (1.0 if not d.any() else 0.0)
    return out


def comparison(summary: pd.DataFrame, min_sparsity: float = 0.9, alpha: float = 0.05) -> pd.DataFrame:
    """Each criterion against magnitude at every sparsity ``>= min_sparsity``, one row per setting
    and criterion: the worst and the best mean paired difference (``worst_diff``, ``best_diff``),
    how many of those sparsities are significantly below or above magnitude (paired t, two-sided
    ``p < alpha``: ``n_below``, ``n_above``, of ``n_sparsities``), and, at the highest sparsity,
    the difference from magnitude and the mean accuracy minus the dense model's (``vs_dense_at_max``,
    magnitude included)."""
    keys = [c for c in SETTING if c in summary]
    rows = []
    high = summary[summary.target_sparsity >= min_sparsity - 1e-12]
    for values, g in high.groupby(keys + ["label"], dropna=False, sort=False):
        top = g[g.target_sparsity == g.target_sparsity.max()].iloc[0]
        row = dict(zip(keys + ["label"], values), n_sparsities=len(g), max_sparsity=float(top.target_sparsity),
                   vs_dense_at_max=float(top["mean"] - top.dense))
        if row["label"] != BASELINE:
            sig = g.paired_t_p < alpha
            row.update(worst_diff=float(g.diff_vs_magnitude.min()), best_diff=float(g.diff_vs_magnitude.max()),
                       n_below=int((sig & (g.diff_vs_magnitude < 0)).sum()),
                       n_above=int((sig & (g.diff_vs_magnitude > 0)).sum()),
                       diff_at_max=float(top.diff_vs_magnitude))
        rows.append(row)
    return pd.DataFrame(rows)


def _comparison_tables(summary: pd.DataFrame) -> list[str]:
    comp = comparison(summary)
    if comp.empty or "worst_diff" not in comp:
        return []
    keys = [c for c in SETTING if c in comp and comp[c].nunique(dropna=False) > 1] or ["dataset"]
    comp = comp.assign(setting=[", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
                                for values in comp[keys].itertuples(index=False)])
    rows = {(r.setting, r.label): r for r in comp.itertuples(index=False)}
    settings, labels = list(dict.fromkeys(comp.setting)), list(dict.fromkeys(comp.label))

    def table(columns, cell):
        lines = ["| " + " / ".join(keys) + " | " + " | ".join(columns) + " |",
                 "| --- | " + " | ".join("---" for _ in columns) + " |"]
        for setting in settings:
            cells = [cell(rows[setting, c]) if (setting, c) in rows else "" for c in columns]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        return lines

    def versus(r):
        if pd.isna(r.worst_diff):
            return "(needs 2 seeds)"
        return f"{100 * r.worst_diff:+.1f} ({int(r.n_below)}↓ {int(r.n_above)}↑ of {int(r.n_sparsities)})"

    return (["## Against magnitude at every sparsity >= 90%", "",
             "Mean paired difference from magnitude in accuracy points (100 x), the worst over those "
             "sparsities, and how many of them are significantly below / above magnitude (paired t, p < 0.05).", ""]
            + table([lab for lab in labels if lab != BASELINE], versus)
            + ["", "## At the highest sparsity: accuracy minus the dense model's, points", ""]
            + table(labels, lambda r: f"{100 * r.vs_dense_at_max:+.1f}") + [""])


def report(summary: pd.DataFrame) -> str:
    """Markdown tables of the summary: per setting, the metric ``mean ± sd [95% CI]`` by sparsity
    and criterion, with a star where the paired t-test against magnitude has p < 0.05."""
    lines = ["# Pruning benchmark", "",
             "Mean ± sd over seeds with the 95% t-interval; `*`: differs from magnitude on the same seeds "
             "(paired t, two-sided p < 0.05; Wilcoxon and sign-test p-values are in summary.csv: with 5 seeds "
             "their smallest possible two-sided p is 0.0625). `x`: compression ratio, FLOP speed-up "
             "(theoretical, nonzero multiply-accumulates).", ""]
    if summary.empty:
        return "\n".join(lines + ["(no results)"]) + "\n"
    lines += _comparison_tables(summary)
    keys = [c for c in SETTING if c in summary]
    for values, g in summary.groupby(keys, dropna=False, sort=False):
        s = dict(zip(keys, values))
        lines.append(f"## {s['dataset']} / {s['model']} / {s['scope']} scope, {s['optimizer']} lr {s['lr']:g}, "
                     f"weight decay {s['weight_decay']:g}"
                     + (f", cap {s['max_tensor_sparsity']:g}" if s.get("max_tensor_sparsity") else ", no cap"))
        lines.append(f"dense {g['metric'].iloc[0].replace('_', ' ')}: {g['dense'].iloc[0]:.4f}"
                     + (f"; cell time median {g['cell_seconds'].iloc[0]:.0f} s on {g['torch_threads'].iloc[0]:.0f} "
                        "torch thread(s)" if pd.notna(g.get("cell_seconds", pd.Series([np.nan])).iloc[0]) else ""))
        lines.append("")
        labels = list(dict.fromkeys(g.label))
        lines.append("| sparsity | compression, FLOP speed-up | " + " | ".join(labels) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in labels) + " |")
        for target, t in g.groupby("target_sparsity", sort=True):
            cells = []
            for lab in labels:
                r = t[t.label == lab]
                if r.empty:
                    cells.append("")
                    continue
                r = r.iloc[0]
                star = "*" if (r.paired_t_p < 0.05) else ""
                spread = f" ± {r.sd:.4f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.n_seeds > 1 else " (1 seed)"
                cells.append(f"{r['mean']:.4f}{spread}{star}")
            first = t.iloc[0]
            lines.append(f"| {target:.4g} | {first.compression_ratio:.1f}x, {first.flop_speedup:.1f}x | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: pd.DataFrame, path: Path) -> Path:
    """Save :func:`figure` as a PNG at ``path`` (atomically); returns the path."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def figure(results: pd.DataFrame):
    """The metric against sparsity, one panel per dataset / model / scope, bands = 95% CI over seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import seaborn as sns

    metric_col = metric(results)
    pruned = results[results.label != "dense"].copy()
    pruned["panel"] = (pruned.dataset + " / " + pruned.model + " / " + pruned.scope
                       + " / wd " + pruned.weight_decay.map("{:g}".format))
    grid = sns.relplot(data=pruned, x="target_sparsity", y=metric_col, hue="label", col="panel", col_wrap=min(3, pruned.panel.nunique()),
                       kind="line", marker="o", errorbar=("ci", 95), seed=0, height=3.2, aspect=1.2, facet_kws=dict(sharey=False))
    grid.set_titles("{col_name}")
    grid.set_axis_labels("sparsity", metric_col.replace("_", " "))
    grid.figure.suptitle(f"{metric_col.replace('_', ' ').capitalize()} against sparsity by criterion "
                         f"(mean, 95% CI over {results['seed'].nunique()} seeds)", y=1.04)
    return grid.figure


def load_grid(path: str | Path) -> BenchmarkGrid:
    """A :class:`BenchmarkGrid` from TOML (module notes); unknown keys are errors listing the valid ones."""
    spec = read_grid(path, {"criteria", "se", "seeds", "target_sparsity", "rounds", "experiment"},
                     lists=("criteria", "se", "seeds", "experiment"))
    if "experiment" not in spec:
        raise ValueError(f"{path} has no [[experiment]] block; add one (see mustat.benchmark)")
    train_keys = {f.name for f in fields(TrainConfig)}
    valid = set(EXPERIMENT_KEYS) | train_keys
    experiments = []
    for i, block in enumerate(spec["experiment"]):
        bad = set(block) - valid
        if bad:
            raise ValueError(f"{path}: unknown experiment keys {sorted(bad)}; valid: {sorted(valid)}")
        keys = list(block)
        for combo in itertools.product(*[v if isinstance(v, list) else [v] for v in block.values()]):
            d = dict(zip(keys, combo))
            experiments.append(grid_values(path, f"[[experiment]] block {i + 1}", lambda d=d: Experiment(
                **{k: v for k, v in d.items() if k in EXPERIMENT_KEYS},
                train=TrainConfig(**{k: v for k, v in d.items() if k in train_keys}))))
    kw = {k: tuple(spec[k]) for k in ("criteria", "se", "seeds") if k in spec}
    kw.update({k: spec[k] for k in ("target_sparsity", "rounds") if k in spec})
    return grid_values(path, "top-level settings", lambda: BenchmarkGrid(experiments=tuple(experiments), **kw))
