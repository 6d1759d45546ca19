"""The main job: train, prune by each criterion, retrain, report.

:func:`run` takes a :class:`~mustat.config.RunConfig`, checks every combination before
any training (:func:`preflight`: estimators against the optimizer and sampler, the cap
against the target, the batch size against the data), then per seed trains the dense
model once (:func:`dense_phase`) and prunes a copy of it by each criterion in rounds of
prune -> retrain (:func:`prune_phase`). The run folder (:mod:`mustat.runs`) holds
``params.json``, ``results.csv``, ``accuracy_vs_sparsity.png`` and ``checkpoints/`` (one
per seed and criterion, rewritten atomically after every round), so an interrupted run
resumes where it stopped and a damaged file is named before anything is overwritten.

A criterion that uses standard errors is run once per requested estimator and labelled
``mu[batch-means]``; estimators come from the registry and say what they need, so a
newly registered one works here unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import mustat
from mustat import distributed
from mustat._params import entries, select
from mustat.config import PruneConfig, RunConfig, TrainConfig
from mustat.criteria import get_criterion, loss_gradient
from mustat.data import Dataset, load
from mustat.models import build, flops, loss_fn
from mustat.pruning import Scope, cap_violation
from mustat.results import RESULT_COLUMNS, plot, table, title  # noqa: F401  (table: the CLI's)
from mustat.runs import (
    FolderLock,
    claim,
    ensure_folder,
    load_checkpoint,
    save_checkpoint,
    write_table,
)
from mustat.training import evaluate, resolve_device, seeded, train_epochs
from mustat.uncertainty import FitContext, make_estimator


def _build(config: RunConfig, data: Dataset, seed: int | None) -> nn.Module:
    """The model, initialised from ``seed`` (None: values to be overwritten) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build(config.model, data.input_shape, data.n_classes or 1, task=data.task)


def preflight(config: RunConfig, data: Dataset) -> None:
    """Check every combination of ``config`` on ``data`` before any training; a ValueError
    names the option, the value and what is allowed.

    Checked: the batch size against the training set; every estimator against the training
    (its optimizers, sampler, window, decay: :meth:`mustat.Estimator.check`) and the model
    (built here, so an estimator that cannot handle it refuses now); the per-tensor cap
    against every round's target."""
    n = len(data.y_train)
    train = config.train
    if train.batch_size > n:
        raise ValueError(f"batch_size={train.batch_size} is larger than the {n} training samples of "
                         f"{config.dataset!r}; use at most {n}")
    model = _build(config, data, None)
    setup = train.setup(n)
    for name in config.estimators():
        make_estimator(name, model, setup=setup)
    if config.max_tensor_sparsity is not None:
        table = entries(model)
        sizes = {n: getattr(table[n].module, table[n].attr).numel() for n in select(model, None)}
        for target in config.targets():
            why = cap_violation(sizes, {}, target, config.scope, config.max_tensor_sparsity)
            if why:
                raise ValueError(f"model {config.model!r}, round target {target}: {why}")


def _context(model, data: Dataset, opt, train: TrainConfig) -> FitContext:
    return FitContext(X=data.X_train, y=data.y_train, loss=lambda out, t: loss_fn(model, out, t), optimizer=opt,
                      batch_size=train.batch_size, weight_decay=train.weight_decay)


def _row(model, data, *, prune: PruneConfig | None, seed, rnd, target, se_ok=None) -> dict:
    acc, loss = evaluate(model, (data.X_test, data.y_test))
    val_acc, _ = evaluate(model, (data.X_val, data.y_val))
    rep = mustat.PruningReport.from_model(model)
    dense_macs, sparse_macs = flops(model, data.input_shape)
    return dict(label=prune.label if prune else "dense", criterion=prune.criterion if prune else "dense",
                se=(prune.se or "-") if prune else "-", scope=prune.scope if prune else "-", seed=int(seed),
                round=int(rnd), target_sparsity=float(target), sparsity=float(mustat.sparsity(model)),
                compression_ratio=float(rep.compression_ratio), flop_speedup=float(dense_macs / max(sparse_macs, 1)),
                empty_tensors=sum(int(p == s) for p, s in zip(rep.pruned, rep.sizes)),
                test_accuracy=float(acc), test_loss=float(loss), val_accuracy=float(val_acc),
                se_ok=None if se_ok is None else bool(se_ok))


def dense_phase(config: RunConfig, data: Dataset, *, seed: int, progress=None) -> dict:
    """Initialise (seeded, without touching the global RNG) and train the dense model,
    recording every *trajectory* estimator the run uses over the last ``track_epochs`` epochs.

    Returns the checkpoint every criterion starts from, with the dense result row."""
    train = config.train
    model = _build(config, data, seed).to(data.X_train.device)
    opt = train.make_optimizer(model.parameters())
    setup = train.setup(len(data.y_train))
    trackers = {}
    for name in config.estimators():
        est = make_estimator(name, model, setup=setup)
        if est.trajectory:
            trackers[name] = est
    gen = torch.Generator().manual_seed(seed)
    with seeded(model, seed):
        train_epochs(model, opt, (data.X_train, data.y_train), epochs=train.epochs, batch_size=train.batch_size,
                     sampler=train.sampler, generator=gen, estimators=list(trackers.values()),
                     track_epochs=train.track_epochs, progress=progress)
    row = _row(model, data, prune=None, seed=seed, rnd=0, target=0.0)
    return dict(model=copy.deepcopy(model.state_dict()), optimizer=copy.deepcopy(opt.state_dict()),
                estimators={k: t.state_dict() for k, t in trackers.items()}, generator=gen.get_state(), round=0,
                rows=[], dense_row=row)


def criterion_scores(model: nn.Module, criterion: str, data: Dataset, *, estimator=None, seed: int) -> dict:
    """Scores of ``criterion`` with what it needs: a fitted ``estimator``'s ``se()`` and
    ``estimate()``, the training loss gradient, or the ``seed`` (random)."""
    if estimator is not None:
        return mustat.score(model, criterion, se=estimator.se(), weights=estimator.estimate())
    if get_criterion(criterion).requires_grad:
        grads = loss_gradient(model, (data.X_train, data.y_train), lambda out, t: loss_fn(model, out, t))
        return mustat.score(model, criterion, grads=grads)
    return mustat.score(model, criterion, seed=seed)


def prune_phase(config: RunConfig, prune: PruneConfig, data: Dataset, start: dict, *, seed: int,
                checkpoint: Path | None = None, progress=None,
                on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Rounds of prune -> retrain from a checkpoint ``start`` (the dense state or a saved round).

    After every round the state is written atomically to ``checkpoint`` (if given)
    and ``on_round(row)`` is called, so an interrupted run resumes at the next round.
    """
    # Optimizer.load_state_dict keeps tensors that need no cast, so training would
    # otherwise mutate ``start``, the dense state every criterion starts from.
    start = copy.deepcopy(start)
    train = config.train
    model = _build(config, data, None).to(data.X_train.device)
    # The optimizer first: installing masks reorders model.parameters() (a parametrized
    # weight moves after its bias), and optimizer state is matched by position.
    opt = train.make_optimizer(model.parameters())
    mustat.load_pruned_state_dict(model, start["model"])
    opt.load_state_dict(start["optimizer"])
    est = None
    if prune.se is not None:
        est = make_estimator(prune.se, model, setup=train.setup(len(data.y_train)))
        if est.trajectory:
            est.load_state_dict(start["estimators"][prune.se])
    gen = torch.Generator()
    gen.set_state(start["generator"].cpu())  # generator states live on the CPU, whatever map_location said
    rows = list(start["rows"])
    targets = prune.targets()
    for rnd in range(start["round"] + 1, len(targets) + 1):
        target = targets[rnd - 1]
        se_ok = None
        if est is not None:
            est.fit(_context(model, data, opt, train))
            se_ok = est.diagnostics().get("ok")
        scores = criterion_scores(model, prune.criterion, data, estimator=est, seed=seed * 1000 + rnd)
        mustat.prune(model, scores, sparsity=target, scope=prune.scope, max_tensor_sparsity=prune.max_tensor_sparsity)
        distributed.broadcast_masks(model)
        with seeded(model, seed * 1000 + rnd):
            train_epochs(model, opt, (data.X_train, data.y_train), epochs=train.retrain_epochs,
                         batch_size=train.batch_size, sampler=train.sampler, generator=gen,
                         estimators=[est] if est is not None else [], track_epochs=train.track_epochs,
                         progress=progress)
        rows.append(_row(model, data, prune=prune, seed=seed, rnd=rnd, target=target, se_ok=se_ok))
        if checkpoint is not None and distributed.is_main():
            save_checkpoint(checkpoint, dict(
                model=model.state_dict(), optimizer=opt.state_dict(),
                estimators={prune.se: est.state_dict()} if est is not None and est.trajectory else {},
                generator=gen.get_state(), round=rnd, rows=rows))
        if on_round is not None:
            on_round(rows[-1])
    return rows


def run_id(params: dict) -> str:
    """A short id derived from the settings (so equal settings share a folder)."""
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def _stem(seed: int, label: str) -> str:
    return f"seed{seed}-{label.replace('[', '-').replace(']', '')}"


def run(config: RunConfig | None = None, *, out: str | Path | None = None, quiet: bool = False,
        save_sparse: bool = False, on_round: Callable[[dict], None] | None = None, **settings) -> pd.DataFrame:
    """Run the pipeline for every seed and criterion; returns the tidy results
    (``results.attrs["out"]`` is the run folder).

    ``config`` (a :class:`~mustat.config.RunConfig`), or its fields as keywords
    (``run(dataset="digits", criteria=["magnitude"], train=TrainConfig(epochs=5))``), or
    both (keywords override). Every combination is checked before any training
    (:func:`preflight`). ``save_sparse``: also write each run's final pruned model as
    ``models/seed<S>-<label>.safetensors`` (:func:`mustat.save_sparse`).

    Raises ``ValueError`` for unknown names or incompatible combinations (naming the
    option), when ``out`` holds a run with other settings (naming them) or is used by
    another run, and for a damaged file in it (naming the file);
    :class:`mustat.training.DivergenceError` when training diverges (nothing of that
    phase is written).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the ranks train data-parallel
    (:mod:`mustat.distributed`); only rank 0 writes, and every rank returns the results.
    """
    config = replace(config, **settings) if config is not None else RunConfig(**settings)
    first = load(config.dataset, data_dir=config.data_dir, seed=config.seeds[0])
    preflight(config, first)
    dev = distributed.init_from_env(resolve_device(config.device))
    main = distributed.is_main()
    params = config.settings(dev.type)
    out = Path(out) if out is not None else Path("runs") / run_id(params)
    pairs = config.pairs()
    ckpt = out / "checkpoints"
    stems = {seed: [_stem(seed, "dense")] + [_stem(seed, config.prune_config(c, s).label) for c, s in pairs]
             for seed in config.seeds}
    lock = FolderLock(ensure_folder(out)) if main else nullcontext()
    with lock:
        done: dict[str, list[dict]] = {}
        if main:
            # every existing checkpoint is read before anything is written: a damaged one is named
            # now, and results.csv always lists every finished row
            for stem in (s for group in stems.values() for s in group):
                if (ckpt / f"{stem}.pt").exists():
                    state = load_checkpoint(ckpt / f"{stem}.pt")
                    done[stem] = [state["dense_row"]] if "dense_row" in state else list(state["rows"])
            claim(out, "settings", params, finished=bool(done), world_size=distributed.rank_world()[1])
        distributed.barrier()

        train = config.train
        total = len(config.seeds) * (train.epochs + len(pairs) * len(config.targets()) * train.retrain_epochs)
        bar = tqdm(total=total, desc="mustat prune", unit="epoch", disable=quiet or not main)

        def write():
            rows = [r for seed in config.seeds for s in stems[seed] for r in done.get(s, [])]
            write_table(out / "results.csv", pd.DataFrame(rows, columns=RESULT_COLUMNS))

        for seed in config.seeds:
            data = (first if seed == config.seeds[0] else load(config.dataset, data_dir=config.data_dir, seed=seed)).to(dev)
            dense_path = ckpt / f"{stems[seed][0]}.pt"
            distributed.barrier()  # every rank sees the same files before deciding what to resume
            if dense_path.exists():
                dense = load_checkpoint(dense_path)
                bar.update(train.epochs)
            else:
                dense = dense_phase(config, data, seed=seed, progress=bar)
                if main:
                    save_checkpoint(dense_path, dense)
            done[stems[seed][0]] = [dense["dense_row"]]
            for (crit, est), stem in zip(pairs, stems[seed][1:]):
                prune = config.prune_config(crit, est)
                path = ckpt / f"{stem}.pt"
                distributed.barrier()
                start = load_checkpoint(path) if path.exists() else dict(dense, rows=[])
                bar.update(start["round"] * train.retrain_epochs)
                done[stem] = prune_phase(config, prune, data, start, seed=seed, checkpoint=path, progress=bar,
                                         on_round=on_round)
                if main:
                    write()
                    if save_sparse:
                        _save_model(config, data, load_checkpoint(path)["model"], out / "models" / f"{stem}.safetensors")
        bar.close()
        rows = [r for seed in config.seeds for s in stems[seed] for r in done.get(s, [])]
        results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
        if main:
            write()
            plot(results, out / "accuracy_vs_sparsity.png", title=title(config.dataset, config.model, config.scope,
                                                                        config.seeds),
                 chance=1 / first.n_classes if first.n_classes else None)
        distributed.barrier()
    results.attrs["out"] = str(out)
    return results


def _save_model(config: RunConfig, data: Dataset, state: dict, path: Path) -> None:
    model = _build(config, data, None)
    mustat.load_pruned_state_dict(model, state)
    mustat.save_sparse(model, path)


__all__ = ["Scope", "criterion_scores", "dense_phase", "preflight", "prune_phase", "run"]
