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
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import mustat
from mustat._cells import one_thread_in_dask_worker, read_grid, run_cells
from mustat._io import atomic_write, write_json
from mustat.uncertainty import bootstrap_se, information
from validation import metrics as M
from validation.designs import DESIGNS, get_design
from validation.estimators import Setting, resolve, train_and_estimate

SETTING_COLUMNS = ["optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "window", "sampler"]
SUMMARY_COLUMNS = [
    "design", "setting", *SETTING_COLUMNS, "estimator", "reference", "se_ratio_median", "se_ratio_iqr",
    "se_ratio_gmean", "loglog_slope", "spearman_se", "spearman_z", "jaccard_50", "jaccard_90", "coverage95",
    "type1_05", "ks_null", "ks_null_pvalue", "power_05", "n_truth", "n_zero_se", "inv_sqrt_vif_median",
    "window_ok", "n_eff_median", "frac_short_window", "tau_median", "batches", "replications", "bootstrap_B",
    "bootstrap_epochs", "bootstrap_lr",
]

#: every estimator label a default study reads (see validation.estimators.resolve)
DEFAULT_ESTIMATORS = ("pseudo", "pseudo-every10", "pseudo-ema", "pseudo-epoch", "calibrated", "batch-means",
                      "curvature")


@dataclass(frozen=True)
class References:
    """Hyperparameters of the reference computations. They are part of every cell's
    key, so changing one in code recomputes the cells it shapes on resume."""

    glm_bootstrap_epochs: int = 200
    glm_bootstrap_lr: float = 0.02
    mlp_bootstrap_epochs: int = 300
    mlp_bootstrap_lr: float = 0.01
    glm_gtol: float = 1e-8

    def bootstrap(self, glm: bool) -> dict:
        return (dict(epochs=self.glm_bootstrap_epochs, lr=self.glm_bootstrap_lr) if glm
                else dict(epochs=self.mlp_bootstrap_epochs, lr=self.mlp_bootstrap_lr))


REFERENCES = References()


@dataclass(frozen=True)
class Grid:
    """What a study computes: designs x settings, with ``replications`` simulated
    datasets per cell (designs with known truth), ``bootstrap_B`` bootstrap refits,
    and the ``estimators`` read from every run."""

    designs: tuple[str, ...] = ("logistic", "linear", "teacher-mlp", "breast_cancer")
    settings: tuple[Setting, ...] = field(default_factory=lambda: QUICK_SETTINGS)
    replications: int = 6
    bootstrap_B: int = 100
    seed: int = 0
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    references: References = field(default_factory=lambda: REFERENCES)

    def __post_init__(self):
        for d in self.designs:
            if d not in DESIGNS:
                raise ValueError(f"design={d!r} is not valid; choose one of: {', '.join(DESIGNS)}")
        if self.replications < 1 or self.bootstrap_B < 2:
            raise ValueError(f"replications must be >= 1 and bootstrap_B >= 2, got {self.replications}, {self.bootstrap_B}")
        for e in self.estimators:
            resolve(e)
        if not self.estimators:
            raise ValueError("estimators is empty; give at least one estimator label")

    def cells(self) -> list[Cell]:
        return [Cell(d, s, self.replications, self.bootstrap_B, self.seed, tuple(self.estimators), self.references)
                for d in self.designs for s in self.settings]

    def as_dict(self) -> dict:
        return dict(designs=list(self.designs), settings=[s.as_dict() for s in self.settings],
                    replications=self.replications, bootstrap_B=self.bootstrap_B, seed=self.seed,
                    estimators=list(self.estimators), references=asdict(self.references))


QUICK_SETTINGS = tuple(
    Setting(opt, lr, momentum=mom, batch_size=32, epochs=60, window=45, sampler=sampler)
    for opt, lr, mom in (("sgd", 0.05, 0.0), ("sgd", 0.005, 0.9), ("adam", 0.01, 0.0))
    for sampler in ("replacement", "shuffle")
) + (Setting("adam", 0.01, batch_size=32, epochs=60, window=5, sampler="replacement"),)  # a short window


@dataclass(frozen=True)
class Cell:
    design: str
    setting: Setting
    replications: int
    bootstrap_B: int
    seed: int
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    references: References = field(default_factory=lambda: REFERENCES)

    @property
    def key(self) -> str:
        """Derived from everything that shapes the cell's result (reference settings included)."""
        s = self.setting
        text = json.dumps([self.design, s.as_dict(), self.replications, self.bootstrap_B, self.seed,
                           list(self.estimators), asdict(self.references)], sort_keys=True)
        return f"{self.design}-{s.optimizer}-{s.sampler}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _flat(d: dict[str, torch.Tensor], names) -> np.ndarray:
    return np.concatenate([d[n].detach().double().cpu().numpy().ravel() for n in names])


def _glm_references(design, cell: Cell, X: np.ndarray, y: np.ndarray, names, first: bool):
    """Exact Wald SEs at the (penalised) optimum, the per-weight 1/sqrt(VIF), and on the
    first replication the converged penalised bootstrap."""
    wd = cell.setting.weight_decay
    X64, y64 = torch.tensor(X), torch.tensor(y)
    fitted = mustat.fit_glm(design.model(0), X64, y64, weight_decay=wd, gtol=cell.references.glm_gtol)
    w_ref = _flat(dict(fitted.named_parameters()), names)
    out = {}
    for kind, lab in (("observed", "wald"), ("sandwich", "wald-sandwich")):
        out[lab] = (w_ref, _flat(mustat.hessian_se(fitted, fitted.nll, (X64, y64), kind=kind, weight_decay=wd), names))
    # the reference: the sampling SE of the estimate; for a penalised fit only the sandwich is one
    reference = "wald-sandwich" if wd > 0 else "wald"
    info = information(fitted, fitted.nll, (X64, y64), weight_decay=wd)
    vif = (info.H.diagonal() * torch.linalg.inv(info.H).diagonal()).numpy()
    vif = _flat(info.layout.unflatten(torch.as_tensor(vif)), names)
    if first:
        boot = bootstrap_se(fitted, design.loss(fitted), (X64, y64), B=cell.bootstrap_B, weight_decay=wd,
                            seed=cell.seed, **cell.references.bootstrap(glm=True))
        out["bootstrap"] = (w_ref, _flat(boot, names))
    return out, reference, 1 / np.sqrt(vif)


def run_cell(cell: Cell, out: str | Path) -> str:
    """Compute one cell and write its two files; returns the cell key."""
    one_thread_in_dask_worker()
    design = get_design(cell.design)
    s = cell.setting
    rows, per_rep, diags = [], [], {}
    reps = cell.replications if design.simulated and design.glm else 1
    for rep in range(reps):
        X, y, truth = design.sample(rep)
        X32, y32 = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
        model = design.model(cell.seed * 10_000 + rep)
        fits, final = train_and_estimate(model, design.loss(model), X32, y32, s, seed=cell.seed * 10_000 + rep,
                                         estimators=cell.estimators)
        names = list(final)
        estimates = {}
        for lab, (est, se, diag) in fits.items():
            estimates[lab] = (_flat(est, names), _flat(se, names))
            diags.setdefault(lab, []).append(diag)
        if design.glm:
            refs, reference, inv_sqrt_vif = _glm_references(design, cell, X, y, names, first=rep == 0)
            estimates.update(refs)
            w_ref, se_ref = refs[reference]
        else:
            reference = "bootstrap"
            inv_sqrt_vif = np.full(len(estimates[next(iter(estimates))][0]), np.nan)
            boot = bootstrap_se(model, design.loss(model), (X32, y32), B=cell.bootstrap_B, weight_decay=s.weight_decay,
                                seed=cell.seed, **cell.references.bootstrap(glm=False))
            w_ref, se_ref = _flat(final, names), _flat(boot, names)
            estimates["bootstrap"] = (w_ref, se_ref)
        t = np.asarray(truth, dtype=float).ravel() if truth is not None else np.full(len(w_ref), np.nan)
        flat_names = np.concatenate([[n] * int(final[n].numel()) for n in names])
        flat_idx = np.concatenate([np.arange(final[n].numel()) for n in names])
        for name, (we, se) in estimates.items():
            rows.append(pd.DataFrame(dict(design=cell.design, setting=s.label, estimator=name, replication=rep,
                                          param=flat_names, index=flat_idx, weight=we, se=se, ref_weight=w_ref,
                                          ref_se=se_ref, truth=t, inv_sqrt_vif=inv_sqrt_vif)))
            per_rep.append((name, rep, we, se, w_ref, se_ref, t, inv_sqrt_vif))
    cells = pd.concat(rows, ignore_index=True)
    summary = _summarise(cell, design, per_rep, reference, diags)
    out = Path(out)
    atomic_write(out / "cells" / f"{cell.key}.csv", lambda p: cells.to_csv(p, index=False))
    atomic_write(out / "cells" / f"{cell.key}.summary.csv", lambda p: summary.to_csv(p, index=False))
    return cell.key


def _summarise(cell: Cell, design, per_rep, reference: str, diags: dict[str, list[dict]]) -> pd.DataFrame:
    out = []
    boot = cell.references.bootstrap(design.glm)
    for name in dict.fromkeys(r[0] for r in per_rep):
        reps = [r for r in per_rep if r[0] == name]
        row = dict(design=cell.design, setting=cell.setting.label, **cell.setting.as_dict(), estimator=name,
                   reference=reference, replications=len(reps), bootstrap_B=cell.bootstrap_B,
                   bootstrap_epochs=boot["epochs"], bootstrap_lr=boot["lr"])
        agree = pd.DataFrame([M.agreement(we, se, wr, sr) for _, _, we, se, wr, sr, _, _ in reps])
        row.update(agree.mean(numeric_only=True).to_dict())
        row["n_zero_se"] = int(agree["n_zero_se"].sum())
        row["inv_sqrt_vif_median"] = float(np.median(np.concatenate([r[7] for r in reps])))
        if design.simulated and design.glm and len(reps) > 1:
            row.update(M.truth_metrics(np.concatenate([r[2] for r in reps]), np.concatenate([r[3] for r in reps]),
                                       np.concatenate([r[6] for r in reps])))
        d = diags.get(name, [])
        if d and "ok" in d[0]:
            row["window_ok"] = float(np.mean([bool(x["ok"]) for x in d]))
            row["frac_short_window"] = float(np.mean([x["frac_short"] for x in d]))
        if d and "n_eff_median" in d[0]:
            row["n_eff_median"] = float(np.mean([x["n_eff_median"] for x in d]))
        if d and "tau_median" in d[0]:
            row["tau_median"] = float(np.mean([x["tau_median"] for x in d]))
            row["batches"] = float(np.mean([x["batches"] for x in d]))
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
    grid = grid or Grid()
    out = Path(out)
    params_path = out / "params.json"
    settings = json.loads(json.dumps(grid.as_dict()))
    if params_path.exists():
        old = json.loads(params_path.read_text()).get("grid", {})
        # the user's grid must match; reference settings may change in code: they are in every
        # cell's key, so the cells they shape are recomputed rather than mixed with stale ones
        if {k: v for k, v in old.items() if k != "references"} != {k: v for k, v in settings.items() if k != "references"}:
            raise ValueError(f"{out} holds a study with another grid (see {params_path}); choose another --out")
    if not params_path.exists() or old.get("references") != settings["references"]:
        write_json(params_path, dict(grid=settings, versions=dict(
            mustat=mustat.__version__, torch=torch.__version__, numpy=np.__version__, python=platform.python_version())))
    cells = grid.cells()
    todo = [c for c in cells if not (out / "cells" / f"{c.key}.summary.csv").exists()]
    run_cells(run_cell, todo, total=len(cells), scheduler=scheduler, workers=workers, quiet=quiet,
              desc="calibration cells", on_cell=on_cell, out=str(out.resolve()))
    summary = pd.concat([pd.read_csv(out / "cells" / f"{c.key}.summary.csv") for c in cells], ignore_index=True)
    table = pd.concat([pd.read_csv(out / "cells" / f"{c.key}.csv") for c in cells], ignore_index=True)
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    atomic_write(out / "cells.csv", lambda p: table.to_csv(p, index=False))
    from validation.report import write_report

    write_report(out, summary, table)
    return summary, table


def load_grid(path: str | Path) -> Grid:
    """A grid from TOML::

        designs = ["logistic", "teacher-mlp"]
        estimators = ["pseudo", "calibrated", "batch-means", "curvature"]   # optional
        replications = 20
        bootstrap_B = 200
        [[setting]]                      # list-valued keys expand (a Cartesian product)
        optimizer = "sgd"
        lr = [0.01, 0.05]
        sampler = ["replacement", "shuffle"]
        epochs = 80
        window = 60
    """
    spec = read_grid(path, {"designs", "replications", "bootstrap_B", "seed", "setting", "estimators"})
    settings = []
    fields = set(Setting.__dataclass_fields__)
    for block in spec.get("setting", [{}]):
        bad = set(block) - fields
        if bad:
            raise ValueError(f"{path}: unknown setting keys {sorted(bad)}; valid: {sorted(fields)}")
        keys = list(block)
        values = [v if isinstance(v, list) else [v] for v in block.values()]
        for combo in itertools.product(*values):
            settings.append(Setting(**dict(zip(keys, combo))))
    kw = {k: spec[k] for k in ("replications", "bootstrap_B", "seed") if k in spec}
    for key in ("designs", "estimators"):
        if key in spec:
            kw[key] = tuple(spec[key])
    return Grid(settings=tuple(settings), **kw)
