"""Train -> (prune channels -> retrain) x rounds -> measure: the structured counterpart of
:mod:`mustat.pipeline`.

Per seed the dense model is trained once (its trajectory estimators tracking the last
``track_epochs``) and cached; each importance then prunes a copy in ``rounds`` steps whose
MAC targets fall geometrically to ``dense / speedup``, retraining after each with a fresh
optimizer (the architecture changed, so Adam's moments have no place to go). A trajectory
estimator is re-attached for every retraining phase, so each round's standard errors are
those of the architecture being pruned. After every round the latency of the pruned and the
dense model are measured alternately in the same process, at each batch size (one intra-op
thread by default: the other core's load then touches both alike).

The run folder holds ``params.json`` (the settings: a folder is never reused for other ones),
``results.csv`` (one row per seed, importance and round, with the
latencies), ``dense-seed<k>.pt`` (cached dense states) and, with
``save_models=True``, ``models/<label>-seed<k>.pt2`` (``torch.export``: reloads with plain
torch). Rows are written atomically as each importance finishes, so an interrupted run
resumes at the next one.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from numbers import Integral, Real
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from mustat._checks import check_option, check_scalar
from mustat._functional import eval_mode
from mustat._io import write_json
from mustat.config import TrainConfig
from mustat.criteria import parse_label
from mustat.data import Dataset, load
from mustat.models import build, loss_fn
from mustat.runs import read_table, save_checkpoint, write_table
from mustat.structured.groups import NEEDS_GRADIENT
from mustat.structured.macs import count
from mustat.structured.surgery import IMPORTANCES, export, prune_channels
from mustat.structured.timing import paired_latency
from mustat.structured.units import unit_statistics
from mustat.training import evaluate, seeded, train_epochs
from mustat.uncertainty import ESTIMATORS, FitContext, get_estimator, make_estimator

COLUMNS = ["dataset", "model", "label", "importance", "se", "seed", "round", "target_speedup", "macs", "params",
           "flop_speedup", "test_accuracy", "val_accuracy", "latency_b1", "latency_b128", "dense_latency_b1",
           "dense_latency_b128", "speedup_b1", "speedup_b128"]


def check_labels(labels: Sequence[str]) -> list[tuple[str, str | None]]:
    """``"wald[kfac]"`` -> ``("wald", "kfac")``; baselines take no estimator; the Wald test needs one."""
    out = []
    for text in labels:
        name, se = parse_label(text)
        check_option(name, "importance", IMPORTANCES)
        if name.startswith("wald"):
            if se is None:
                raise ValueError(f"importance {text!r} needs an estimator: write wald[NAME] with NAME one of "
                                 f"{', '.join(ESTIMATORS)}")
            check_option(se, "se", ESTIMATORS)
        elif se is not None:
            raise ValueError(f"importance {text!r}: {name!r} is Torch-Pruning's and takes no estimator")
        out.append((name, se))
    if len(set(labels)) != len(labels):
        raise ValueError(f"importances {list(labels)} repeat a label")
    return out


def _estimator(name: str, model: nn.Module, train: TrainConfig, n: int):
    # K-FAC factors Linear and Conv weights only; its biases enter through the factors
    params = ([f"{m}.weight" for m, mod in model.named_modules()
               if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))] if name == "kfac" else None)
    return make_estimator(name, model, setup=train.setup(n), params=params)


def _context(model, data: Dataset, opt, train: TrainConfig) -> FitContext:
    return FitContext(X=data.X_train, y=data.y_train, loss=lambda out, t: loss_fn(model, out, t), optimizer=opt,
                      batch_size=train.batch_size, weight_decay=train.weight_decay)


def _gradients(model: nn.Module, data: Dataset, chunk: int = 512) -> None:
    """Fill ``.grad`` with the mean training-loss gradient (what Taylor importance reads), in eval
    mode: BatchNorm's running statistics stay as they are and dropout draws nothing."""
    model.zero_grad(set_to_none=True)
    n = len(data.y_train)
    with eval_mode(model):
        for s in range(0, n, chunk):
            xb, yb = data.X_train[s:s + chunk], data.y_train[s:s + chunk]
            (loss_fn(model, model(xb), yb) * (len(yb) / n)).backward()


def _latencies(pruned: nn.Module, dense: nn.Module, shape, batches: Sequence[int], threads: int, repeats: int = 2
               ) -> dict[str, float]:
    out = {}
    for b in batches:
        t_d, t_p = paired_latency(dense, pruned, torch.zeros(b, *shape), repeats=repeats, threads=threads,
                                  min_run_time=0.1)
        out[f"latency_b{b}"], out[f"dense_latency_b{b}"] = t_p, t_d
        out[f"speedup_b{b}"] = t_d / t_p
    return out


def _dense(model_name: str, data: Dataset, train: TrainConfig, seed: int, estimators: list[str], path: Path,
           progress) -> tuple[nn.Module, dict]:
    """The trained dense model of ``seed`` and its trajectory estimators' states (cached in ``path``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(model_name, data.input_shape, data.n_classes or 1, task=data.task)
    n = len(data.y_train)
    trackers = {e: _estimator(e, model, train, n) for e in estimators if get_estimator(e).trajectory}
    if path.exists():
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        for k, est in trackers.items():
            est.load_state_dict(state["estimators"][k])
        return model, state
    opt = train.make_optimizer(model.parameters())
    with seeded(model, seed):
        train_epochs(model, opt, (data.X_train, data.y_train), epochs=train.epochs, batch_size=train.batch_size,
                     sampler=train.sampler, generator=torch.Generator().manual_seed(seed),
                     estimators=list(trackers.values()), track_epochs=train.track_epochs, progress=progress)
    state = dict(model=model.state_dict(), estimators={k: t.state_dict() for k, t in trackers.items()},
                 optimizer=opt.state_dict())
    save_checkpoint(path, state)
    return model, state


def _row(model, data, **fields) -> dict:
    acc, _ = evaluate(model, (data.X_test, data.y_test))
    val, _ = evaluate(model, (data.X_val, data.y_val))
    macs, params = count(model, data.X_train[:1])
    return dict(fields, macs=macs, params=params, test_accuracy=acc, val_accuracy=val)


def prune_schedule(model: nn.Module, data: Dataset, importance: str, se: str | None, *, train: TrainConfig,
                   speedup: float, rounds: int, seed: int, dense_state: dict, batches: Sequence[int] = (1, 128),
                   threads: int = 1, round_to: int | None = None, progress=None) -> tuple[nn.Module, list]:
    """Prune a copy of the dense ``model`` to ``speedup`` (in MACs) in ``rounds`` rounds of
    prune -> retrain; returns the pruned model and one row per round, with its latencies against
    the dense model's measured alongside. ``round_to``: every round leaves each group a multiple
    of that many channels (:func:`~mustat.structured.prune_channels`)."""
    dense = model
    model = copy.deepcopy(model)
    n = len(data.y_train)
    example = data.X_train[:1]
    macs0 = count(model, example)[0]
    opt = train.make_optimizer(model.parameters())
    opt.load_state_dict(dense_state["optimizer"])
    est = None
    if se is not None:
        est = _estimator(se, model, train, n)
        if est.trajectory:
            est.load_state_dict(dense_state["estimators"][se])
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    rows = []
    for rnd in range(1, rounds + 1):
        stats = None
        if est is not None:
            est.fit(_context(model, data, opt, train))
            stats = unit_statistics(model, estimator=est)
        if importance in NEEDS_GRADIENT:
            _gradients(model, data)
        target = math.ceil(macs0 / speedup ** (rnd / rounds))
        prune_channels(model, example, importance, target_macs=target, stats=stats, round_to=round_to)
        model.zero_grad(set_to_none=True)
        opt = train.make_optimizer(model.parameters())
        est = _estimator(se, model, train, n) if se is not None else None
        with seeded(model, seed * 1000 + rnd):
            train_epochs(model, opt, (data.X_train, data.y_train), epochs=train.retrain_epochs,
                         batch_size=train.batch_size, sampler=train.sampler, generator=gen,
                         estimators=[est] if est is not None and est.trajectory else [],
                         track_epochs=train.track_epochs, progress=progress)
        rows.append(_row(model, data, round=rnd, target_speedup=speedup ** (rnd / rounds),
                         flop_speedup=macs0 / count(model, example)[0],
                         **_latencies(model, dense, data.input_shape, batches, threads)))
    return model, rows


def _claim(out: Path, settings: dict) -> None:
    """Record the settings in ``out/params.json``; a folder that holds another run's is refused
    (seeds and importances may be added: they are what a rerun resumes)."""
    path = out / "params.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{out} holds a structured run with other settings ({', '.join(diff)}: "
                             f"{ {k: old.get(k) for k in diff} }); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def run(*, dataset: str = "mnist5k", model: str = "lenet5", importances: Sequence[str] = ("wald[kfac]", "magnitude"),
        speedup: float = 2.0, rounds: int = 3, seeds: Sequence[int] = (0,), train: TrainConfig | None = None,
        out: str | Path = "runs/structured", batches: Sequence[int] = (1, 128), threads: int = 1,
        save_models: bool = False, round_to: int | None = None, quiet: bool = False) -> pd.DataFrame:
    """Run the structured schedule for every seed and importance; returns (and writes) the results.

    Every argument is checked before any training (``ValueError`` naming it)."""
    labels = list(importances)
    parsed = check_labels(labels)
    check_scalar(speedup, "speedup", kind=Real, low=1.0, closed="neither")
    check_scalar(rounds, "rounds", kind=Integral, low=1)
    check_scalar(threads, "threads", kind=Integral, low=1)
    if round_to is not None:
        check_scalar(round_to, "round_to", kind=Integral, low=1)
    for s in seeds:
        check_scalar(s, "seeds", kind=Integral, low=0)
    for b in batches:
        check_scalar(b, "batches", kind=Integral, low=1)
    if sorted(batches) != [1, 128]:
        raise ValueError(f"batches={list(batches)}: the results table has latency columns for batch 1 and 128; "
                         "pass (1, 128)")
    train = train or TrainConfig(epochs=15, retrain_epochs=3, track_epochs=3)
    out = Path(out)
    settings = dict(dataset=dataset, model=model, speedup=float(speedup), rounds=int(rounds), threads=int(threads),
                    train=asdict(train))
    if round_to is not None:      # absent when None: folders written before the option still resume
        settings["round_to"] = int(round_to)
    _claim(out, settings)
    table = out / "results.csv"
    done = read_table(table, COLUMNS) if table.exists() else pd.DataFrame(columns=COLUMNS)
    finished = set(zip(done["seed"], done["label"]))
    rows = done.to_dict("records")
    estimators = sorted({se for _, se in parsed if se is not None})
    bar = tqdm(total=len(seeds) * len(labels), desc=f"structured {model}", disable=quiet)
    for seed in seeds:
        data = load(dataset, seed=seed)
        if data.task != "classification":
            raise ValueError(f"dataset={dataset!r} is a regression task; structured runs classify")
        dense = None
        for text, (name, se) in zip(labels, parsed):
            if (seed, text) in finished:
                bar.update()
                continue
            if dense is None:
                dense, state = _dense(model, data, train, seed, estimators, out / f"dense-seed{seed}.pt", None)
                macs, params = count(dense, data.X_train[:1])
                if (seed, "dense") not in finished:
                    rows.append(dict(_row(dense, data, round=0, target_speedup=1.0, flop_speedup=1.0),
                                     dataset=dataset, model=model, label="dense", importance="dense", se="-",
                                     seed=seed))
            pruned, new = prune_schedule(dense, data, name, se, train=train, speedup=speedup, rounds=rounds,
                                         seed=seed, dense_state=state, batches=batches, threads=threads,
                                         round_to=round_to)
            for r in new:
                r.update(dataset=dataset, model=model, label=text, importance=name, se=se or "-", seed=seed)
            rows.extend(new)
            if save_models:
                export(pruned, data.X_train[:1], out / "models" / f"{text}-seed{seed}.pt2")
            write_table(table, pd.DataFrame(rows).reindex(columns=COLUMNS))
            finished.add((seed, text))
            bar.update()
    bar.close()
    result = pd.DataFrame(rows).reindex(columns=COLUMNS)
    write_table(table, result)
    return result
