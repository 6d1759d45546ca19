"""The calibration study runner: a grid of (design x training setting) cells,
each evaluating every standard-error estimator against a reference.

A cell writes ``cells/<key>.csv`` (one row per weight, estimator and
replication) and then ``cells/<key>.summary.csv`` (one row per estimator), both
atomically; a cell is finished when its summary exists, so an interrupted study
resumes without recomputing finished cells. Cells run in parallel through Dask
distributed (a local cluster by default, or an existing scheduler), or serially.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mustat._cells import grid_values, one_thread_in_dask_worker, read_grid, run_grid
from mustat._io import atomic_write
from mustat.gauge import chains
from mustat.runs import read_table
from mustat.uncertainty import ESTIMATORS, default_estimators
from mustat.uncertainty.bootstrap import plan
from validation import metrics as M
from validation.bootstrap import newton_bootstrap
from validation.designs import DESIGNS, get_design
from validation.estimators import (
    Setting,
    fit_replicates,
    per_replicate,
    resolve,
    split_at,
    train_and_estimate,
)
from validation.references import (
    converged_frac,
    glm_fit,
    glm_references,
    match_units,
    permute_units,
    polish,
    teacher_replicates,
    unit_vectors,
    wald_references,
)

SETTING_COLUMNS = ["optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "window", "sampler"]
SUMMARY_COLUMNS = [
    "design", "setting", *SETTING_COLUMNS, "estimator", "centre", "reference", "ref_mc_rel_error",
    "se_ratio_median", "se_ratio_iqr", "se_ratio_gmean", "loglog_slope", "spearman_se", "spearman_z", "jaccard_50",
    "jaccard_90", "n_weights", "n_ref_uninformative", "n_est_inf", "n_est_zero", "frac_est_inf", "frac_est_zero",
    "interval_dof", "coverage95", "coverage95_lo", "coverage95_hi", "covered_only_est", "covered_only_ref",
    "mcnemar_pvalue", "width95_median", "ref_width95_median", "type1_05", "type1_05_lo", "type1_05_hi", "ks_null",
    "ks_null_pvalue", "power_05", "n_truth", "n_null", "n_zero_se", "inv_sqrt_vif_median", "window_ok",
    "n_eff_median", "frac_short_window", "tau_median", "batches", "replications", "bootstrap_B",
    "teacher_replicates", "ref_converged_frac", "ref_grad_max", "fit_grad_max", "fit_min_eig", "fit_at_minimum",
    "fit_drift_over_se",
    "basin_z_median", "balance_max", "cell_seconds",
]

#: every estimator label a default study reads: the registry's default estimators, each followed
#: by the variants it declares (validation.estimators.resolve)
DEFAULT_ESTIMATORS = tuple(lab for name in default_estimators() for lab in (name, *ESTIMATORS[name].variants))
#: hidden-layer designs are scored against each of these
MLP_REFERENCES = ("wald-sandwich", "bootstrap", "teacher")
#: where the references' intervals are centred
REFERENCE_CENTRE = "penalised optimum (Newton)"


@dataclass(frozen=True)
class References:
    """Hyperparameters of the reference computations. They are part of every cell's
    key, so changing one in code recomputes the cells it shapes on resume.

    Every reference is a converged penalised optimum: ``*_gtol`` bounds the max-abs
    gradient of the penalised mean loss (GLM fits, and the Newton bootstrap refits of
    GLMs; the polished hidden-layer fit, its bootstrap refits and the teacher replicates).
    """

    glm_gtol: float = 1e-10
    mlp_gtol: float = 1e-8
    newton_max_iter: int = 100


REFERENCES = References()


@dataclass(frozen=True)
class Scoped:
    """A training setting that applies to some designs only."""

    designs: tuple[str, ...]
    setting: Setting


@dataclass(frozen=True)
class Grid:
    """What a study computes: designs x settings (plus ``scoped`` settings for named
    designs), with ``replications`` simulated datasets per GLM cell (trained together),
    ``bootstrap_B`` bootstrap refits, ``teacher_replicates`` fresh datasets for the
    teacher reference of hidden-layer designs, and the ``estimators`` read from every run.
    Hidden-layer designs need weight decay (unpenalised, they are not identified)."""

    designs: tuple[str, ...] = ("logistic", "linear", "breast_cancer")
    settings: tuple[Setting, ...] = field(default_factory=lambda: QUICK_SETTINGS)
    replications: int = 125
    bootstrap_B: int = 100
    seed: int = 0
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    references: References = field(default_factory=lambda: REFERENCES)
    scoped: tuple[Scoped, ...] = ()
    teacher_replicates: int = 100

    def __post_init__(self):
        for d in list(self.designs) + [d for sc in self.scoped for d in sc.designs]:
            if d not in DESIGNS:
                raise ValueError(f"design={d!r} is not valid; choose one of: {', '.join(DESIGNS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is not valid; give a non-negative integer")
        if self.replications < 1 or self.bootstrap_B < 2 or self.teacher_replicates < 2:
            raise ValueError(f"replications must be >= 1, bootstrap_B and teacher_replicates >= 2, got "
                             f"{self.replications}, {self.bootstrap_B}, {self.teacher_replicates}")
        for e in self.estimators:
            resolve(e)
        if not self.estimators:
            raise ValueError("estimators is empty; give at least one estimator label")
        for d in dict.fromkeys(d for d, _ in self.pairs()):
            if not self.estimators_for(d):
                raise ValueError(f"design {d!r} has no estimator to read: {list(self.estimators)} are all gauge-fixed "
                                 "variants, which need ReLU-type hidden units; add an estimator that applies to it")
        for design, setting in self.pairs():
            if not get_design(design).glm and setting.weight_decay <= 0:
                raise ValueError(
                    f"design {design!r} has a hidden layer, which is not identified without weight decay "
                    f"(ReLU rescaling, permutations), but setting {setting.label!r} has weight_decay=0; give "
                    "it weight_decay > 0, or scope the setting to GLM designs ([[setting]] designs = [...])")

    def pairs(self) -> list[tuple[str, Setting]]:
        """(design, setting) of every cell: scoped settings first (in practice the longest cells,
        which should not be the last to start)."""
        return ([(d, sc.setting) for sc in self.scoped for d in sc.designs]
                + [(d, s) for d in self.designs for s in self.settings])

    def cells(self) -> list[Cell]:
        return [Cell(d, s, self.replications, self.bootstrap_B, self.seed, self.estimators_for(d), self.references,
                     self.teacher_replicates) for d, s in self.pairs()]

    def estimators_for(self, design: str) -> tuple[str, ...]:
        """The estimator labels a design's cells read: the gauge-fixed variants
        (``gauge="balanced"``, :mod:`mustat.gauge`) only where the design's network has units with a
        rescaling orbit (not a GLM, not a smooth activation)."""
        d = get_design(design)
        if not d.glm and chains(d.model(0)):
            return tuple(self.estimators)
        return tuple(e for e in self.estimators if resolve(e)[1].get("gauge", "none") == "none")

    def as_dict(self) -> dict:
        return dict(designs=list(self.designs), settings=[s.as_dict() for s in self.settings],
                    scoped=[dict(designs=list(sc.designs), setting=sc.setting.as_dict()) for sc in self.scoped],
                    replications=self.replications, bootstrap_B=self.bootstrap_B,
                    teacher_replicates=self.teacher_replicates, seed=self.seed, estimators=list(self.estimators),
                    references=asdict(self.references))


#: GLM settings of the quick study: SGD and Adam drawing minibatches with replacement, Adam
#: reshuffling, and a short Adam window (plus, scoped below, the long window batch means need)
QUICK_SETTINGS = (
    Setting("sgd", 0.05, batch_size=32, epochs=60, window=45),
    Setting("adam", 0.01, batch_size=32, epochs=60, window=45),
    Setting("adam", 0.01, batch_size=32, epochs=60, window=45, sampler="shuffle"),
    Setting("adam", 0.01, batch_size=32, epochs=60, window=5),
)
#: the quick study's hidden-layer cell (the regression teacher, weight decay 1e-2; the full study
#: has 800 epochs and three decays) and the long Adam window on the simulated GLMs: 300 of 320
#: epochs at batch size 64 (9.6k steps, about 240 autocorrelation times, 20 batches of 480 steps;
#: the full study's is 600 of 640 at batch size 32, 38k steps)
QUICK_SCOPED = (
    Scoped(("teacher-regression",), Setting("adam", 0.01, weight_decay=1e-2, batch_size=32, epochs=300, window=250)),
    Scoped(("logistic", "linear"), Setting("adam", 0.02, batch_size=64, epochs=320, window=300)),
)
#: the quick study's bootstrap refits and teacher replicates (hidden-layer cell: Monte-Carlo error
#: 1/sqrt(2 (50 - 1)) = 10% a weight; the full study has 200 of each, 5%)
QUICK_REFITS = 50


def quick_grid() -> Grid:
    """The default study (``mustat calibrate``): 125 datasets (1,000 intervals) per simulated GLM
    cell, the settings above, one hidden-layer cell with 50 bootstrap refits and 50 teacher
    replicates; 113 CPU seconds of cells, about 75-95 s on 2 idle cores (docs/CALIBRATION.md)."""
    return Grid(scoped=QUICK_SCOPED, seed=1, bootstrap_B=QUICK_REFITS, teacher_replicates=QUICK_REFITS)


@dataclass(frozen=True)
class Cell:
    design: str
    setting: Setting
    replications: int
    bootstrap_B: int
    seed: int
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    references: References = field(default_factory=lambda: REFERENCES)
    teacher_replicates: int = 200

    @property
    def key(self) -> str:
        """Derived from everything that shapes the cell's result (reference settings included)."""
        s = self.setting
        text = json.dumps([self.design, s.as_dict(), self.replications, self.bootstrap_B, self.seed,
                           list(self.estimators), asdict(self.references), self.teacher_replicates], sort_keys=True)
        return f"{self.design}-{s.optimizer}-{s.sampler}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def data_index(seed: int, replication: int) -> int:
    """The dataset a study with ``seed`` draws for ``replication``: studies with different seeds
    (the quick study's 1, the full study's 0) see disjoint datasets, and the teacher references'
    replicates (10,000 on) never meet the replications."""
    return 1_000_000 * seed + replication


def _flat(d: dict[str, torch.Tensor], names) -> np.ndarray:
    return np.concatenate([d[n].detach().double().cpu().numpy().ravel() for n in names])


def _glm_cell(cell: Cell, design) -> tuple[list, dict, dict, dict]:
    """Train every replicate dataset together; numpy Wald references for each, and the
    Newton-converged bootstrap on replication 0."""
    s = cell.setting
    R = cell.replications if design.simulated else 1
    samples = [design.sample(data_index(cell.seed, r)) for r in range(R)]
    X, y = np.stack([a[0] for a in samples]), np.stack([a[1] for a in samples])
    truth = samples[0][2]
    model = design.stacked_model([cell.seed * 10_000 + r for r in range(R)])
    Xt = torch.tensor(X.transpose(1, 0, 2), dtype=torch.float32)
    yt = torch.tensor(y.T.copy(), dtype=torch.float32)
    apart = tuple(lab for lab in cell.estimators if per_replicate(lab))
    fits, _, mean = train_and_estimate(model, design.stacked_loss(), Xt, yt, s, seed=cell.seed * 10_000,
                                       estimators=tuple(lab for lab in cell.estimators if lab not in apart),
                                       average=any(split_at(lab)[1] for lab in apart))
    fits.update(fit_replicates(model, lambda: design.model(0), design.loss(), Xt, yt, s, apart, window_mean=mean))
    fits = {lab: fits[lab] for lab in cell.estimators}
    refs = glm_references(design.family, X, y, weight_decay=s.weight_decay)
    reference = "wald-sandwich" if s.weight_decay > 0 else "wald"
    per_weight = {lab: (est["linear.weight"].double().numpy(), se["linear.weight"].double().numpy())
                  for lab, (est, se, _, _) in fits.items()}
    per_weight["wald"] = (refs["coef"], refs["se_observed"])
    per_weight["wald-sandwich"] = (refs["coef"], refs["se_sandwich"])
    # the converged bootstrap of replication 0: numpy Newton refits on the resamples that
    # validation.bootstrap.newton_bootstrap draws (tests/test_newton.py: the same refits)
    resample, _ = plan(X.shape[1], B=cell.bootstrap_B, epochs=0, seed=cell.seed)
    rows_b = resample.numpy()
    boot_coef, boot_grad = glm_fit(design.family, X[0][rows_b], y[0][rows_b], weight_decay=s.weight_decay,
                                   gtol=cell.references.glm_gtol, strict=False)
    # a resample of near-separated data can be separable (no MLE): the SD is over the refits that
    # converged, and their fraction is the row's ref_converged_frac
    ok = boot_grad <= cell.references.glm_gtol
    se_boot = boot_coef[ok, :-1].std(0, ddof=1) if ok.sum() >= 2 else np.full(X.shape[2], np.nan)
    per_weight["bootstrap"] = (refs["coef"][:1], se_boot[None])
    w_ref, se_ref = per_weight[reference]
    t = np.asarray(truth, dtype=float).ravel() if truth is not None else np.full(X.shape[2], np.nan)
    rows = []
    for name, (we, se) in per_weight.items():
        for rep in range(len(we)):
            rows.append(dict(estimator=name, reference=reference, replication=rep, param="linear.weight",
                             weight=we[rep], se=se[rep], ref_weight=w_ref[rep], ref_se=se_ref[rep], truth=t,
                             inv_sqrt_vif=refs["inv_sqrt_vif"][rep]))
    centres = {lab: c for lab, (_, _, _, c) in fits.items()}
    centres.update({k: REFERENCE_CENTRE for k in ("wald", "wald-sandwich")},
                   bootstrap="penalised optimum (refits warm-started there)")
    extra = dict(ref_converged_frac=float((boot_grad <= cell.references.glm_gtol).mean()),
                 ref_grad_max=float(boot_grad.max()))
    return rows, {lab: d for lab, (_, _, d, _) in fits.items()}, centres, extra


def _teacher_reference(cell: Cell, design, weight_decay: float, out: Path) -> dict:
    """Gauge-fixed teacher replicates (cached in ``out/references``: they do not depend on the
    training setting, only on the design, the penalty and the reference settings)."""
    text = json.dumps([design.name, weight_decay, cell.teacher_replicates, cell.seed, asdict(cell.references)],
                      sort_keys=True)
    path = out / "references" / f"teacher-{design.name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    data = [design.sample(data_index(cell.seed, 10_000 + r)) for r in range(cell.teacher_replicates)]
    Xs = torch.tensor(np.stack([a[0] for a in data]))
    ys = torch.tensor(np.stack([a[1] for a in data]))
    ref = teacher_replicates(design.teacher(), design.loss(), Xs, ys, weight_decay=weight_decay,
                             gtol=cell.references.mlp_gtol, max_iter=cell.references.newton_max_iter)
    ref.pop("params")
    atomic_write(path, lambda p: torch.save(ref, p))
    return ref


def _mlp_cell(cell: Cell, design, out: Path) -> tuple[list, dict, dict, dict]:
    """Train one network; polish it to its penalised optimum; exact penalised Wald, the Newton
    bootstrap there and (with a teacher) the gauge-fixed teacher replicates as references."""
    s = cell.setting
    wd = s.weight_decay
    X, y, _ = design.sample(data_index(cell.seed, 0))
    model = design.model(cell.seed * 10_000)
    loss = design.loss()
    fits, final, _ = train_and_estimate(model, loss, torch.tensor(X, dtype=torch.float32),
                                        torch.tensor(y, dtype=torch.float32), s, seed=cell.seed * 10_000,
                                        estimators=cell.estimators)
    names = list(final)
    X64, y64 = torch.tensor(X), torch.tensor(y)
    refs = cell.references
    # one problem, so a generous budget: a unit that training collapsed is revived through the
    # saddle escape, which needs iterations after the first descent
    fitted, fit = polish(model, loss, X64, y64, weight_decay=wd, gtol=refs.mlp_gtol,
                         max_iter=10 * refs.newton_max_iter)
    theta = {k: v.detach() for k, v in fitted.named_parameters()}
    boot, boot_fits = newton_bootstrap(fitted, loss, (X64, y64), B=cell.bootstrap_B, weight_decay=wd,
                                       seed=cell.seed, gtol=refs.mlp_gtol, max_iter=refs.newton_max_iter)
    ref_se = {"bootstrap": {k: v.std(0, unbiased=True) for k, v in boot.params.items()}}
    # a minimum on ReLU kinks (or a saddle) has an indefinite Hessian: no Wald reference exists there,
    # and its rows are left out (fit_min_eig says why); the bootstrap and teacher stand on their own
    if float(fit.min_eig[0]) > 0:
        wald = wald_references(fitted, loss, X64, y64, weight_decay=wd)
        ref_se.update({"wald": wald["observed"], "wald-sandwich": wald["sandwich"]})
    extra = dict(ref_converged_frac=converged_frac(boot_fits, ref_se["bootstrap"]),
                 ref_grad_max=float(boot.grad_max.max()), fit_grad_max=float(fit.grad_max[0]),
                 fit_min_eig=float(fit.min_eig[0]),
                 fit_drift_over_se=float(fit.drift_over(torch.cat([ref_se["bootstrap"][k].flatten()
                                                                   for k in fit.params]))[0]),
                 fit_at_minimum=bool(fit.minimum[0]))
    if design.teacher is not None:
        t = _teacher_reference(cell, design, wd, out)
        teacher_units = unit_vectors({k: v.detach() for k, v in design.teacher().named_parameters()}, "0", "2")
        perm = match_units(unit_vectors(theta, "0", "2"), teacher_units)
        inv = np.argsort(perm)  # the fit's unit i is the teacher's unit inv[i]
        ref_se["teacher"] = permute_units(t["sd"], inv, "0", "2")
        mean = permute_units(t["mean"], inv, "0", "2")
        z = np.abs(_flat(theta, names) - _flat(mean, names)) / _flat(ref_se["teacher"], names)
        extra.update(basin_z_median=float(np.median(z[np.isfinite(z)])), balance_max=t["balance_max"],
                     ref_converged_frac=min(extra["ref_converged_frac"], t["converged_frac"]),
                     ref_grad_max=max(extra["ref_grad_max"], t["grad_max"]))
    w_hat = _flat(theta, names)
    per_weight = {lab: (_flat(est, names), _flat(se, names)) for lab, (est, se, _, _) in fits.items()}
    per_weight.update({k: (w_hat, _flat(v, names)) for k, v in ref_se.items()})
    centres = {lab: c for lab, (_, _, _, c) in fits.items()}
    centres.update({k: REFERENCE_CENTRE for k in ref_se})
    flat_names = np.concatenate([[n] * int(final[n].numel()) for n in names])
    rows = []
    for reference in (r for r in MLP_REFERENCES if r in ref_se):
        se_ref = _flat(ref_se[reference], names)
        for name, (we, se) in per_weight.items():
            if name != reference:
                rows.append(dict(estimator=name, reference=reference, replication=0, param=flat_names, weight=we,
                                 se=se, ref_weight=w_hat, ref_se=se_ref, truth=np.full(len(we), np.nan),
                                 inv_sqrt_vif=np.full(len(we), np.nan)))
    return rows, {lab: d for lab, (_, _, d, _) in fits.items()}, centres, extra


def run_cell(cell: Cell, out: str | Path) -> str:
    """Compute one cell and write its two files; returns the cell key."""
    one_thread_in_dask_worker()
    out = Path(out)
    design = get_design(cell.design)
    start = time.perf_counter()
    rows, diags, centres, extra = _glm_cell(cell, design) if design.glm else _mlp_cell(cell, design, out)
    extra["cell_seconds"] = time.perf_counter() - start
    summary = _summarise(cell, design, rows, diags, centres, extra)
    frames = []
    for r in rows:
        k = len(np.atleast_1d(r["weight"]))
        param = r["param"] if isinstance(r["param"], np.ndarray) else np.full(k, r["param"])
        idx = np.concatenate([np.arange((param == p).sum()) for p in dict.fromkeys(param)])
        frames.append(pd.DataFrame(dict(design=cell.design, setting=cell.setting.label, estimator=r["estimator"],
                                        reference=r["reference"], replication=r["replication"], param=param,
                                        index=idx, weight=r["weight"], se=r["se"], ref_weight=r["ref_weight"],
                                        ref_se=r["ref_se"], truth=r["truth"], inv_sqrt_vif=r["inv_sqrt_vif"])))
    cells = pd.concat(frames, ignore_index=True)
    atomic_write(out / "cells" / f"{cell.key}.csv", lambda p: cells.to_csv(p, index=False))
    atomic_write(out / "cells" / f"{cell.key}.summary.csv", lambda p: summary.to_csv(p, index=False))
    return cell.key


def _summarise(cell: Cell, design, rows: list[dict], diags: dict[str, dict], centres: dict[str, str],
               extra: dict) -> pd.DataFrame:
    out = []
    for name, reference in dict.fromkeys((r["estimator"], r["reference"]) for r in rows):
        reps = [r for r in rows if r["estimator"] == name and r["reference"] == reference]
        row = dict(design=cell.design, setting=cell.setting.label, **cell.setting.as_dict(), estimator=name,
                   centre=centres.get(name, ""), reference=reference, replications=len(reps),
                   bootstrap_B=cell.bootstrap_B, **extra)
        mc = {"bootstrap": cell.bootstrap_B, "teacher": cell.teacher_replicates}.get(reference)
        row["ref_mc_rel_error"] = 1 / np.sqrt(2 * (mc - 1)) if mc else 0.0
        if not design.glm:
            row["teacher_replicates"] = cell.teacher_replicates if design.teacher is not None else np.nan
        # pooled over the replications: every weight of every dataset is one comparison
        row.update(M.agreement(*(np.concatenate([np.ravel(r[k]) for r in reps])
                                 for k in ("weight", "se", "ref_weight", "ref_se"))))
        vif = np.concatenate([np.atleast_1d(r["inv_sqrt_vif"]) for r in reps])
        row["inv_sqrt_vif_median"] = float(np.median(vif)) if np.isfinite(vif).any() else np.nan
        d = diags.get(name)
        dof = d.get("dof") if d else None
        row["interval_dof"] = dof if dof is not None else np.inf
        if design.simulated and design.glm and len(reps) > 1:
            pooled = [np.concatenate([np.ravel(r[k]) for r in reps]) for k in ("weight", "se", "ref_weight",
                                                                                   "ref_se", "truth")]
            row.update(M.truth_metrics(pooled[0], pooled[1], pooled[4], dof=dof))
            row.update(M.paired_coverage(*pooled, dof=dof))
        if d and "ok" in d:
            row["window_ok"] = float(bool(d["ok"]))
            row["frac_short_window"] = float(d["frac_short"])
        if d and "n_eff_median" in d:
            row["n_eff_median"] = float(d["n_eff_median"])
        if d and "tau_median" in d:
            row["tau_median"] = float(d["tau_median"])
            row["batches"] = float(d["batches"])
        out.append(row)
    return pd.DataFrame(out).reindex(columns=SUMMARY_COLUMNS)


def run_study(
    grid: Grid | None = None,
    out: str | Path = "runs/calibration",
    *,
    scheduler: str = "local",
    workers: int = 2,
    quiet: bool = False,
    on_cell: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or resume) a study; writes ``params.json``, ``cells.csv``, ``summary.csv``,
    the figures and ``report.md`` into ``out``; returns ``(summary, cells)``.

    ``scheduler``: ``"local"`` (a Dask LocalCluster of ``workers`` processes),
    ``"serial"`` (in this process), or the address of an existing Dask scheduler.
    """
    grid = grid or quick_grid()
    out = Path(out)
    cells = grid.cells()
    # the user's grid must match; reference settings may change in code: they are in every
    # cell's key, so the cells they shape are recomputed rather than mixed with stale ones
    run_grid(run_cell, cells, out, key="grid", settings=grid.as_dict(), volatile=("references",),
             done=lambda c: (out / "cells" / f"{c.key}.summary.csv").exists(), scheduler=scheduler,
             workers=workers, quiet=quiet, desc="calibration cells", on_cell=on_cell)
    summary = pd.concat([read_table(out / "cells" / f"{c.key}.summary.csv", ["design", "estimator"]) for c in cells],
                        ignore_index=True)
    table = pd.concat([read_table(out / "cells" / f"{c.key}.csv", ["design", "estimator", "se"]) for c in cells],
                      ignore_index=True)
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    atomic_write(out / "cells.csv", lambda p: table.to_csv(p, index=False))
    from validation.report import write_report

    write_report(out, summary, table)
    return summary, table


def load_grid(path: str | Path) -> Grid:
    """A grid from TOML::

        designs = ["logistic", "linear"]
        estimators = ["pseudo", "calibrated", "batch-means", "curvature"]   # optional
        replications = 125
        bootstrap_B = 200
        teacher_replicates = 200
        [[setting]]                      # list-valued keys expand (a Cartesian product)
        optimizer = "sgd"
        lr = [0.01, 0.05]
        sampler = ["replacement", "shuffle"]
        epochs = 80
        window = 60
        [[setting]]                      # a block with `designs` applies to those designs only
        designs = ["teacher-regression", "teacher-softmax"]
        weight_decay = [1e-4, 1e-3, 1e-2]
        epochs = 300
        window = 250

    Blocks without ``designs`` apply to the top-level ``designs`` (default: the quick
    study's GLM designs).
    """
    spec = read_grid(path, {"designs", "replications", "bootstrap_B", "teacher_replicates", "seed", "setting",
                            "estimators"}, lists=("designs", "estimators", "setting"))
    if "setting" not in spec:
        raise ValueError(f"{path} defines no cells: give [[setting]] blocks (see validation.study.load_grid)")
    settings, scoped = [], []
    fields = set(Setting.__dataclass_fields__)
    for i, block in enumerate(spec["setting"]):
        block = dict(block)
        designs = block.pop("designs", None)
        bad = set(block) - fields
        if bad:
            raise ValueError(f"{path}: unknown setting keys {sorted(bad)}; valid: {sorted(fields | {'designs'})}")
        keys = list(block)
        values = [v if isinstance(v, list) else [v] for v in block.values()]
        for combo in itertools.product(*values):
            setting = grid_values(path, f"[[setting]] block {i + 1}", lambda c=combo, k=keys: Setting(**dict(zip(k, c))))
            if designs is None:
                settings.append(setting)
            else:
                scoped.append(Scoped(tuple([designs] if isinstance(designs, str) else designs), setting))
    kw = {k: spec[k] for k in ("replications", "bootstrap_B", "teacher_replicates", "seed") if k in spec}
    for key in ("designs", "estimators"):
        if key in spec:
            kw[key] = tuple(spec[key])
    if not settings and "designs" not in spec:
        kw["designs"] = ()
    if not settings and not scoped:
        raise ValueError(f"{path} defines no cells: give [[setting]] blocks (see validation.study.load_grid)")
    return grid_values(path, "top-level settings", lambda: Grid(settings=tuple(settings), scoped=tuple(scoped), **kw))
