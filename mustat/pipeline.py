"""The main job: train, prune by each criterion, retrain, report.

One module holds the whole orchestration: the settings and their defaults
(:class:`TrainConfig`, :class:`PruneConfig`), the sparsity schedules, the dense
and prune/retrain phases, checkpoints and resume. Everything a run needs is in
its folder: ``params.json`` (every setting, the seeds, versions),
``results.csv`` (tidy), ``accuracy_vs_sparsity.png`` (drawn from the CSV) and
``checkpoints/`` (one per seed and criterion, rewritten atomically after every
round), so an interrupted run resumes where it stopped.

A criterion that uses standard errors is run once per requested estimator and
labelled ``mu[batch-means]``; the estimators come from the registry
(:mod:`mustat.uncertainty`), so a newly registered one works here unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import mustat
from mustat import distributed
from mustat._checks import check_option, check_scalar
from mustat._io import atomic_write, write_json
from mustat.criteria import get_criterion, label, loss_gradient, parse_label
from mustat.data import Dataset, load
from mustat.models import build, flops, loss_fn
from mustat.pruning import Scope
from mustat.training import (
    OPTIMIZERS,
    Sampler,
    TrackWindow,
    evaluate,
    make_optimizer,
    resolve_device,
    seeded,
    steps_per_epoch,
    train_epochs,
)
from mustat.uncertainty import ESTIMATORS, FitContext, make_estimator

#: the default comparison: criteria, and the estimators each se-based criterion is run with
DEFAULT_CRITERIA = ("mu", "magnitude", "random")
DEFAULT_SE = ("pseudo", "calibrated", "batch-means", "curvature")
#: batch-means splits the tracking window into this many batches
BATCH_MEANS_BATCHES = 20
#: the CLI's per-tensor cap: global ranking may not empty a layer (not yet tuned by a benchmark)
DEFAULT_MAX_TENSOR_SPARSITY = 0.99


class Schedule(str, Enum):
    """Sparsity targets of the pruning rounds."""

    GEOMETRIC = "geometric"
    """Halve the remaining weights each round (0.5, 0.75, 0.875, ...), ending at the target."""
    ONESHOT = "oneshot"
    """One round straight to the target."""
    GRADUAL = "gradual"
    """Zhu & Gupta (2017) cubic: s_t = s_f (1 - (1 - t / n)^3), t = 1..n."""


def schedule(kind: str | Schedule, target: float, rounds: int = 5) -> list[float]:
    """The cumulative sparsity after each pruning round."""
    kind = check_option(kind, "schedule", Schedule)
    check_scalar(target, "target_sparsity", kind=Real, low=0.0, high=1.0, closed="neither")
    check_scalar(rounds, "rounds", kind=Integral, low=1)
    if kind is Schedule.ONESHOT:
        return [float(target)]
    if kind is Schedule.GRADUAL:
        return [round(target * (1 - (1 - t / rounds) ** 3), 6) for t in range(1, rounds + 1)]
    out, s = [], 0.5
    while s < target:
        out.append(s)
        s = 1 - (1 - s) / 2
    return out + [float(target)]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``track_epochs`` is the estimators' window: the last
    ``track_epochs`` epochs of each training phase. ``sampler="replacement"``
    (minibatches drawn with replacement) is what the calibrated and batch-means
    standard errors assume."""

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    # Without a penalty a network that fits its training set perfectly has no finite
    # optimum: the weights drift for ever and neither the pseudo bootstrap nor a Wald
    # statistic has anything to estimate (measured in docs/CALIBRATION.md).
    weight_decay: float = 1e-3
    batch_size: int = 64
    epochs: int = 60
    retrain_epochs: int = 40
    track_epochs: int = 40
    sampler: str = "replacement"

    def __post_init__(self):
        check_option(self.optimizer, "optimizer", OPTIMIZERS)
        check_option(self.sampler, "sampler", Sampler)
        check_scalar(self.lr, "lr", kind=Real, low=0.0, closed="neither")
        check_scalar(self.momentum, "momentum", kind=Real, low=0.0, high=1.0, closed="left")
        check_scalar(self.weight_decay, "weight_decay", kind=Real, low=0.0)
        check_scalar(self.batch_size, "batch_size", kind=Integral, low=1)
        check_scalar(self.epochs, "epochs", kind=Integral, low=1)
        check_scalar(self.retrain_epochs, "retrain_epochs", kind=Integral, low=1)
        check_scalar(self.track_epochs, "track_epochs", kind=Integral, low=1)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer, params, lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)

    def window_steps(self, n: int) -> int:
        """Optimizer steps in the shortest tracking window (dense or retraining phase)."""
        return min(self.track_epochs, self.epochs, self.retrain_epochs) * steps_per_epoch(n, self.batch_size)


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run: a criterion (with its estimator when it uses one), the scope and the schedule."""

    criterion: str = "mu"
    se: str | None = "pseudo"
    scope: str = "global"
    schedule: str = "geometric"
    target_sparsity: float = 0.95
    rounds: int = 5
    max_tensor_sparsity: float | None = None

    @property
    def label(self) -> str:
        return label(self.criterion, self.se)


def expand(criteria: Sequence[str], se: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(criterion, estimator)`` pairs: each se-based criterion with every estimator in
    ``se``, the others once. ``"mu[curvature]"`` names one pair directly."""
    pairs = []
    for text in criteria:
        name, est = parse_label(text)
        crit = get_criterion(name)
        if est is not None:
            if not crit.requires_se:
                raise ValueError(f"criterion {name!r} uses no standard errors, so {text!r} makes no sense; write {name!r}")
            check_option(est, "se", sorted(ESTIMATORS))
            pairs.append((name, est))
        elif crit.requires_se:
            if not se:
                raise ValueError(f"criterion {name!r} needs standard errors: give se=[...] from {sorted(ESTIMATORS)}")
            pairs += [(name, check_option(s, "se", sorted(ESTIMATORS))) for s in se]
        else:
            pairs.append((name, None))
    return list(dict.fromkeys(pairs))


def estimator_options(name: str, config: TrainConfig, n: int) -> dict:
    """Options the pipeline gives the estimator ``name`` (the registry's defaults otherwise)."""
    if name == "batch-means":
        return dict(batch_steps=max(1, config.window_steps(n) // BATCH_MEANS_BATCHES))
    return {}


def _context(model, data: Dataset, opt, config: TrainConfig) -> FitContext:
    return FitContext(X=data.X_train, y=data.y_train, loss=lambda out, t: loss_fn(model, out, t), optimizer=opt,
                      batch_size=config.batch_size, weight_decay=config.weight_decay)


def _row(model, data, *, prune: PruneConfig | None, seed, rnd, target, se_ok=None):
    acc, loss = evaluate(model, data.X_test, data.y_test)
    val_acc, _ = evaluate(model, data.X_val, data.y_val)
    rep = mustat.PruningReport.from_model(model)
    dense_macs, sparse_macs = flops(model, data.input_shape)
    return dict(label=prune.label if prune else "dense", criterion=prune.criterion if prune else "dense",
                se=(prune.se or "-") if prune else "-", scope=prune.scope if prune else "-", seed=seed, round=rnd,
                target_sparsity=target, sparsity=mustat.sparsity(model), compression_ratio=rep.compression_ratio,
                flop_speedup=dense_macs / max(sparse_macs, 1),
                empty_tensors=sum(int(p == s) for p, s in zip(rep.pruned, rep.sizes)),
                test_accuracy=acc, test_loss=loss, val_accuracy=val_acc, se_ok=se_ok)


RESULT_COLUMNS = ["label", "criterion", "se", "scope", "seed", "round", "target_sparsity", "sparsity",
                  "compression_ratio", "flop_speedup", "empty_tensors", "test_accuracy", "test_loss", "val_accuracy", "se_ok"]


def dense_phase(model_name: str, data: Dataset, config: TrainConfig, *, seed: int, estimators: Sequence[str] = (),
                progress=None) -> tuple[dict, dict]:
    """Initialise (seeded, without touching the global RNG) and train the dense model,
    recording every *trajectory* estimator in ``estimators`` over the last
    ``track_epochs`` epochs.

    Returns ``(state, row)``: a checkpoint dict to start every criterion from, and the dense result row.
    """
    n_out = data.n_classes or 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(model_name, data.input_shape, n_out, task=data.task)
    model.to(data.X_train.device)
    opt = config.make_optimizer(model.parameters())
    n = len(data.y_train)
    trackers = {}
    for name in estimators:
        # every estimator is built here, before training, so one that cannot handle this
        # model (wald on a large network) fails at once
        est = make_estimator(name, model, **estimator_options(name, config, n))
        if est.trajectory:
            trackers[name] = est
            est.attach(opt)
    gen = torch.Generator().manual_seed(seed)
    with seeded(model, seed):
        train_epochs(model, opt, data.X_train, data.y_train, epochs=config.epochs, batch_size=config.batch_size,
                     sampler=config.sampler, generator=gen, callbacks=[TrackWindow(trackers.values(), config.track_epochs)],
                     progress=progress)
    row = _row(model, data, prune=None, seed=seed, rnd=0, target=0.0)
    state = dict(model=copy.deepcopy(model.state_dict()), optimizer=copy.deepcopy(opt.state_dict()),
                 estimators={k: t.state_dict() for k, t in trackers.items()}, generator=gen.get_state(), round=0,
                 rows=[])
    return state, row


def criterion_scores(model: nn.Module, criterion: str, data: Dataset, *, estimator=None, seed: int) -> dict:
    """Scores of ``criterion`` with what it needs: a fitted ``estimator``'s ``se()`` and
    ``estimate()``, the training loss gradient, or the ``seed`` (random)."""
    if estimator is not None:
        return mustat.score(model, criterion, se=estimator.se(), weights=estimator.estimate())
    if get_criterion(criterion).requires_grad:
        grads = loss_gradient(model, data.X_train, data.y_train, lambda out, t: loss_fn(model, out, t))
        return mustat.score(model, criterion, grads=grads)
    return mustat.score(model, criterion, seed=seed)


def prune_phase(model_name: str, data: Dataset, config: TrainConfig, prune: PruneConfig, start: dict, *,
                seed: int, checkpoint: Path | None = None, progress=None,
                on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Rounds of prune -> retrain from a checkpoint ``start`` (the dense state or a saved round).

    After every round the state is written atomically to ``checkpoint`` (if given)
    and ``on_round(row)`` is called, so an interrupted run resumes at the next round.
    """
    # Optimizer.load_state_dict keeps tensors that need no cast, so training would
    # otherwise mutate ``start``, the dense state every criterion starts from.
    start = copy.deepcopy(start)
    n_out = data.n_classes or 1
    with torch.random.fork_rng(devices=[]):  # its initial values are overwritten: leave the caller's RNG alone
        model = build(model_name, data.input_shape, n_out, task=data.task).to(data.X_train.device)
    # The optimizer first: installing masks reorders model.parameters() (a parametrized
    # weight moves after its bias), and optimizer state is matched by position.
    opt = config.make_optimizer(model.parameters())
    mustat.load_pruned_state_dict(model, start["model"])
    opt.load_state_dict(start["optimizer"])
    est, callbacks = None, []
    if prune.se is not None:
        est = make_estimator(prune.se, model, **estimator_options(prune.se, config, len(data.y_train)))
        if est.trajectory:
            est.load_state_dict(start["estimators"][prune.se])
            est.attach(opt)
            callbacks = [TrackWindow([est], config.track_epochs)]
    gen = torch.Generator()
    gen.set_state(start["generator"].cpu())  # generator states live on the CPU, whatever map_location said
    rows = list(start["rows"])
    targets = schedule(prune.schedule, prune.target_sparsity, prune.rounds)
    for rnd in range(start["round"] + 1, len(targets) + 1):
        target = targets[rnd - 1]
        se_ok = None
        if est is not None:
            est.fit(_context(model, data, opt, config))
            se_ok = est.diagnostics().get("ok")
        scores = criterion_scores(model, prune.criterion, data, estimator=est, seed=seed * 1000 + rnd)
        mustat.prune(model, scores, sparsity=target, scope=prune.scope, max_tensor_sparsity=prune.max_tensor_sparsity)
        distributed.broadcast_masks(model)
        with seeded(model, seed * 1000 + rnd):
            train_epochs(model, opt, data.X_train, data.y_train, epochs=config.retrain_epochs,
                         batch_size=config.batch_size, sampler=config.sampler, generator=gen, callbacks=callbacks,
                         progress=progress)
        rows.append(_row(model, data, prune=prune, seed=seed, rnd=rnd, target=target, se_ok=se_ok))
        if checkpoint is not None and distributed.is_main():
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(),
                         estimators={prune.se: est.state_dict()} if est is not None and est.trajectory else {},
                         generator=gen.get_state(), round=rnd, rows=rows)
            atomic_write(checkpoint, lambda t, s=state: torch.save(s, t))
        if on_round is not None:
            on_round(rows[-1])
    return rows


def run_id(params: dict) -> str:
    """A short id derived from the settings (so equal settings share a folder)."""
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def _load(path: Path) -> dict:
    # On the CPU whatever the training device: generator states must stay CPU
    # ByteTensors, and load_state_dict moves everything else where it belongs.
    return torch.load(path, map_location="cpu")


def run(
    *,
    dataset: str = "digits",
    data_dir: str | None = None,
    model: str = "mlp",
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    se: Sequence[str] = DEFAULT_SE,
    scope: str = "global",
    schedule_kind: str = "geometric",
    target_sparsity: float = 0.95,
    rounds: int = 5,
    max_tensor_sparsity: float | None = None,
    seeds: Sequence[int] = (0,),
    config: TrainConfig | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    quiet: bool = False,
    save_sparse: bool = False,
    on_round: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Run the pipeline for every seed and criterion; returns the tidy results
    (``results.attrs["out"]`` is the run folder).

    ``criteria`` names registered criteria (``"mu"``, ``"magnitude"``, ...; or
    ``"mu[curvature]"`` for one pairing); each one that uses standard errors runs
    with every estimator in ``se``. ``max_tensor_sparsity`` caps the pruned fraction of
    any one tensor (:func:`mustat.prune`). ``save_sparse``: also write each run's final
    pruned model as ``models/seed<S>-<label>.safetensors`` (:func:`mustat.save_sparse`).
    Raises ``ValueError`` for unknown names (listing the valid ones), and when
    ``out`` already holds a run with different settings.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the ranks train data-parallel
    (:mod:`mustat.distributed`); only rank 0 writes, and every rank returns the results.
    """
    config = config or TrainConfig()
    pairs = expand(criteria, se)
    check_option(scope, "scope", Scope)
    check_option(dataset, "dataset", mustat.data.DATASETS)
    check_option(model, "model", mustat.models.MODELS)
    targets = schedule(schedule_kind, target_sparsity, rounds)
    used = list(dict.fromkeys(s for _, s in pairs if s is not None))
    if config.sampler != "replacement" and {"calibrated", "batch-means"} & set(used):
        warnings.warn(
            "the calibrated and batch-means standard errors assume minibatches drawn with replacement; with "
            f"sampler={config.sampler!r} they are biased (use --sampler replacement)",
            stacklevel=2,
        )
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    dev = distributed.init_from_env(resolve_device(device))
    main = distributed.is_main()
    params = dict(dataset=dataset, data_dir=str(data_dir) if data_dir else None, model=model,
                  runs=[label(c, s) for c, s in pairs], scope=scope, schedule=schedule_kind,
                  target_sparsity=target_sparsity, rounds=rounds, max_tensor_sparsity=max_tensor_sparsity, seeds=list(seeds), device=dev.type,
                  train=asdict(config), targets=targets, batch_means_batches=BATCH_MEANS_BATCHES)
    out = Path(out) if out is not None else Path("runs") / run_id(params)
    if main:
        _claim(out, params)
    distributed.barrier()

    total = len(seeds) * (config.epochs + len(pairs) * len(targets) * config.retrain_epochs)
    bar = tqdm(total=total, desc="mustat prune", unit="epoch", disable=quiet or not main)
    rows = []
    ckpt = out / "checkpoints"
    for seed in seeds:
        data = load(dataset, data_dir=data_dir, seed=seed).to(dev)
        dense_path = ckpt / f"seed{seed}-dense.pt"
        distributed.barrier()  # every rank sees the same files before deciding what to resume
        if dense_path.exists():
            dense = _load(dense_path)
            bar.update(config.epochs)
        else:
            state, row = dense_phase(model, data, config, seed=seed, estimators=used, progress=bar)
            dense = dict(state, dense_row=row)
            if main:
                atomic_write(dense_path, lambda t, s=dense: torch.save(s, t))
        rows.append(dense["dense_row"])
        for crit, est in pairs:
            prune = PruneConfig(crit, est, scope, schedule_kind, target_sparsity, rounds, max_tensor_sparsity)
            stem = f"seed{seed}-{prune.label.replace('[', '-').replace(']', '')}"
            path = ckpt / f"{stem}.pt"
            distributed.barrier()
            start = _load(path) if path.exists() else dict(dense, rows=[])
            bar.update(start["round"] * config.retrain_epochs)
            rows += prune_phase(model, data, config, prune, start, seed=seed, checkpoint=path,
                                progress=bar, on_round=on_round)
            if main:
                _write_results(out, rows)
                if save_sparse:
                    _save_model(model, data, _load(path)["model"], out / "models" / f"{stem}.safetensors")
    bar.close()
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    if main:
        _write_results(out, rows)
        plot(results, out / "accuracy_vs_sparsity.png")
    distributed.barrier()
    results.attrs["out"] = str(out)
    return results


def _save_model(model_name: str, data: Dataset, state: dict, path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        model = build(model_name, data.input_shape, data.n_classes or 1, task=data.task)
    mustat.load_pruned_state_dict(model, state)
    mustat.save_sparse(model, path)


def _claim(out: Path, params: dict) -> None:
    """Write params.json, or check that an existing run folder has the same settings."""
    path = out / "params.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") != json.loads(json.dumps(params)):
            raise ValueError(f"{out} holds a run with other settings (see {path}); choose another --out or delete it")
        return
    versions = dict(mustat=mustat.__version__, torch=torch.__version__, numpy=np.__version__,
                    pandas=pd.__version__, python=platform.python_version())
    # the world size does not shape the results (up to float reduction order): not a setting
    write_json(path, dict(settings=params, versions=versions, world_size=distributed.rank_world()[1]))


def _write_results(out: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    atomic_write(out / "results.csv", lambda t: df.to_csv(t, index=False))
    return df


def metric(results: pd.DataFrame) -> str:
    """The column a table reports: test accuracy, or test loss for regression (NaN accuracy)."""
    return "test_loss" if results["test_accuracy"].isna().all() else "test_accuracy"


def table(results: pd.DataFrame) -> pd.DataFrame:
    """The :func:`metric`, mean ± sd over seeds: rows = target sparsity, columns = runs and the dense baseline."""
    col = metric(results)
    pruned = results[results["label"] != "dense"]
    dense = results[results["label"] == "dense"][col]

    def fmt(x):
        return f"{x.mean():.3f}" if len(x) == 1 else f"{x.mean():.3f} ± {x.std(ddof=1):.3f}"

    t = pruned.pivot_table(index="target_sparsity", columns="label", values=col, aggfunc=fmt, sort=False)
    t = t[[c for c in dict.fromkeys(pruned["label"])]]
    t["dense"] = fmt(dense)
    t.index.name = "sparsity"
    t.columns.name = None
    return t


def plot(results: pd.DataFrame, path: Path) -> Path:
    """The :func:`metric` against sparsity by run (seaborn, from the tidy results)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    col = metric(results)
    pruned = results[results["label"] != "dense"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=pruned, x="sparsity", y=col, hue="label", marker="o", errorbar="sd", ax=ax)
    dense = results.loc[results["label"] == "dense", col].mean()
    ax.axhline(dense, color="grey", ls="--", lw=1, label="dense")
    ax.set(xlabel="sparsity (fraction of weights pruned)", ylabel=col.replace("_", " "))
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)
    return path

