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
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from numbers import Integral
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from mustat import distributed
from mustat._checks import check_scalar
from mustat._params import entries, select
from mustat.config import PruneConfig, RunConfig, TrainConfig
from mustat.criteria import get_criterion, loss_gradient, score
from mustat.data import Dataset, load
from mustat.models import build, flops, loss_fn
from mustat.pruning import PruningReport, cap_violation, load_pruned_state_dict, sparsity
from mustat.pruning import prune as prune_weights
from mustat.results import RESULT_COLUMNS, plot, title
from mustat.runs import (
    FolderLock,
    claim,
    ensure_folder,
    load_checkpoint,
    save_checkpoint,
    write_table,
)
from mustat.sparse import save_sparse
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
    rep = PruningReport.from_model(model)
    dense_macs, sparse_macs = flops(model, data.input_shape)
    return dict(label=prune.label if prune else "dense", criterion=prune.criterion if prune else "dense",
                se=(prune.se or "-") if prune else "-", scope=prune.scope if prune else "-", seed=int(seed),
                round=int(rnd), target_sparsity=float(target), sparsity=float(sparsity(model)),
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
        return score(model, criterion, se=estimator.se(), weights=estimator.estimate())
    if get_criterion(criterion).requires_grad:
        grads = loss_gradient(model, (data.X_train, data.y_train), lambda out, t: loss_fn(model, out, t))
        return score(model, criterion, grads=grads)
    return score(model, criterion, seed=seed)


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
    load_pruned_state_dict(model, start["model"])
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
        updates = get_criterion(prune.criterion).updates
        prune_weights(model, scores, sparsity=target, scope=prune.scope, max_tensor_sparsity=prune.max_tensor_sparsity,
                      update=est if updates else None)
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


def _data(config: RunConfig, seed: int, device: torch.device, cache: dict) -> Dataset:
    if seed not in cache:
        cache.clear()  # one seed's data at a time
        cache[seed] = load(config.dataset, data_dir=config.data_dir, seed=seed).to(device)
    return cache[seed]


def _dense_task(config: RunConfig, seed: int, path: Path, device: torch.device, cache: dict, progress=None) -> dict:
    """The dense model of ``seed``: from its checkpoint, or trained and checkpointed."""
    if path.exists():
        if progress is not None:
            progress.update(config.train.epochs)
        return load_checkpoint(path)
    dense = dense_phase(config, _data(config, seed, device, cache), seed=seed, progress=progress)
    if distributed.is_main():
        save_checkpoint(path, dense)
    return dense


def _prune_task(config: RunConfig, pair: tuple[str, str | None], seed: int, dense_path: Path, path: Path,
                device: torch.device, cache: dict, progress=None, on_round=None, save_to: Path | None = None
                ) -> list[dict]:
    """One criterion's rounds for ``seed``, resumed from its checkpoint or started from the dense one."""
    prune = config.prune_config(*pair)
    start = load_checkpoint(path) if path.exists() else dict(load_checkpoint(dense_path), rows=[])
    if progress is not None:
        progress.update(start["round"] * config.train.retrain_epochs)
    data = _data(config, seed, device, cache)
    rows = prune_phase(config, prune, data, start, seed=seed, checkpoint=path, progress=progress, on_round=on_round)
    if save_to is not None and distributed.is_main():
        _save_model(config, data, load_checkpoint(path)["model"], save_to)
    return rows


def _worker_init() -> None:
    torch.set_num_threads(1)  # the workers give the parallelism (and tiny models run fastest on one thread)


def _in_worker(task, *args):
    """``task(*args)`` in a worker process, with its warnings returned so the parent re-issues them
    (the CLI summarises the estimators' window checks from the warnings' data)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = task(*args)
    return result, [w.message for w in caught]


def run(config: RunConfig | None = None, *, out: str | Path | None = None, quiet: bool = False,
        save_sparse: bool = False, on_round: Callable[[dict], None] | None = None, workers: int = 1,
        **settings) -> pd.DataFrame:
    """Run the pipeline for every seed and criterion; returns the tidy results
    (``results.attrs["out"]`` is the run folder).

    ``config`` (a :class:`~mustat.config.RunConfig`), or its fields as keywords
    (``run(dataset="digits", criteria=["magnitude"], train=TrainConfig(epochs=5))``), or
    both (keywords override). Every combination is checked before any training
    (:func:`preflight`). ``save_sparse``: also write each run's final pruned model as
    ``models/seed<S>-<label>.safetensors`` (:func:`mustat.save_sparse`).

    ``workers > 1`` trains in that many processes of one torch thread each: the dense models
    first, then every (seed, criterion) as its own task, each resuming from and writing to its
    own checkpoint (``on_round`` is then called as each task finishes). Float32 training
    reproduces at a fixed thread count, so the numbers equal a serial run's at one thread
    (``OMP_NUM_THREADS=1``), not necessarily at the machine's default.

    Raises ``ValueError`` for unknown names or incompatible combinations (naming the
    option), when ``out`` holds a run with other settings (naming them) or is used by
    another run, and for a damaged file in it (naming the file);
    :class:`mustat.training.DivergenceError` when training diverges (nothing of that
    phase is written).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the ranks train data-parallel
    (:mod:`mustat.distributed`); only rank 0 writes, and every rank returns the results.
    """
    check_scalar(workers, "workers", kind=Integral, low=1)
    config = replace(config, **settings) if config is not None else RunConfig(**settings)
    first = load(config.dataset, data_dir=config.data_dir, seed=config.seeds[0])
    preflight(config, first)
    dev = distributed.init_from_env(resolve_device(config.device))
    main = distributed.is_main()
    if workers > 1 and (distributed.rank_world()[1] > 1 or dev.type == "cuda"):
        raise ValueError(f"workers={workers} runs CPU processes side by side; with torchrun or a CUDA device use "
                         "workers=1")
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
            # a folder with any checkpoint or results of its own is finished work, whatever its seeds
            finished = bool(done) or any(ckpt.glob("*.pt")) or (out / "results.csv").exists()
            claim(out, "settings", params, finished=finished, world_size=distributed.rank_world()[1])
        distributed.barrier()

        train = config.train
        total = len(config.seeds) * (train.epochs + len(pairs) * len(config.targets()) * train.retrain_epochs)
        bar = tqdm(total=total, desc="mustat prune", unit="epoch", disable=quiet or not main)

        def ordered() -> list[dict]:
            return [r for seed in config.seeds for s in stems[seed] for r in done.get(s, [])]

        def write() -> None:
            write_table(out / "results.csv", pd.DataFrame(ordered(), columns=RESULT_COLUMNS))

        def model_file(stem: str) -> Path | None:
            return out / "models" / f"{stem}.safetensors" if save_sparse else None

        cache = {config.seeds[0]: first.to(dev)} if workers == 1 else {}
        if workers == 1:
            for seed in config.seeds:
                dense_path = ckpt / f"{stems[seed][0]}.pt"
                distributed.barrier()  # every rank sees the same files before deciding what to resume
                done[stems[seed][0]] = [_dense_task(config, seed, dense_path, dev, cache, bar)["dense_row"]]
                for pair, stem in zip(pairs, stems[seed][1:]):
                    distributed.barrier()
                    done[stem] = _prune_task(config, pair, seed, dense_path, ckpt / f"{stem}.pt", dev, cache, bar,
                                             on_round, model_file(stem))
                    if main:
                        write()
        else:
            _run_parallel(config, stems, ckpt, pairs, done, workers, bar, on_round, write, model_file)
        bar.close()
        results = pd.DataFrame(ordered(), columns=RESULT_COLUMNS)
        if main:
            write()
            plot(results, out / "accuracy_vs_sparsity.png", title=title(config.dataset, config.model, config.scope,
                                                                        config.seeds),
                 chance=1 / first.n_classes if first.n_classes else None)
        distributed.barrier()
    results.attrs["out"] = str(out)
    return results


def _run_parallel(config, stems, ckpt, pairs, done, workers, bar, on_round, write, model_file) -> None:
    """The dense models, then every (seed, criterion), on a pool of ``workers`` processes."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    cpu = torch.device("cpu")
    train = config.train
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
        dense = {pool.submit(_in_worker, _dense_task, config, seed, ckpt / f"{stems[seed][0]}.pt", cpu, {}): seed
                 for seed in config.seeds}
        running: dict = {}
        try:
            while dense or running:
                finished, _ = wait([*dense, *running], return_when=FIRST_COMPLETED)
                for fut in finished:
                    result, caught = fut.result()
                    for message in caught:
                        warnings.warn(message, stacklevel=2)
                    if fut in dense:
                        seed = dense.pop(fut)
                        done[stems[seed][0]] = [result["dense_row"]]
                        bar.update(train.epochs)
                        for pair, stem in zip(pairs, stems[seed][1:]):
                            task = pool.submit(_in_worker, _prune_task, config, pair, seed,
                                               ckpt / f"{stems[seed][0]}.pt", ckpt / f"{stem}.pt", cpu, {}, None, None,
                                               model_file(stem))
                            running[task] = stem
                    else:
                        stem = running.pop(fut)
                        before = len(done.get(stem, []))
                        done[stem] = result
                        bar.update((len(done[stem]) - before) * train.retrain_epochs)
                        for row in done[stem][before:] if on_round is not None else ():
                            on_round(row)
                        write()
        except BaseException:
            for fut in [*dense, *running]:
                fut.cancel()
            raise


def _save_model(config: RunConfig, data: Dataset, state: dict, path: Path) -> None:
    model = _build(config, data, None)
    load_pruned_state_dict(model, state)
    save_sparse(model, path)

