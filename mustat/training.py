"""The training loop and the train -> prune -> retrain pipeline.

The whole (small) dataset lives on the device; on CUDA the forward pass runs
under bf16 autocast. Nothing global is seeded: model initialisation runs under
``torch.random.fork_rng`` and batches come from a private ``torch.Generator``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from numbers import Integral, Real
from pathlib import Path

import torch
from torch import nn

import mustat
from mustat._checks import check_option, check_scalar
from mustat._io import atomic_write
from mustat.data import Dataset
from mustat.models import build, loss_fn, predict
from mustat.uncertainty import calibrated_se


class Sampler(str, Enum):
    """How minibatches are drawn."""

    SHUFFLE = "shuffle"
    """Reshuffle each epoch and walk through it (sampling without replacement)."""
    REPLACEMENT = "replacement"
    """Each minibatch drawn uniformly with replacement: the bootstrap in "pseudo bootstrap"."""


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
    """Optimisation settings; ``track_epochs`` is the pseudo-bootstrap window (the
    last ``track_epochs`` epochs of each training phase). ``sampler="replacement"``
    (minibatches drawn with replacement) is what the calibrated SE assumes."""

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
        check_option(self.optimizer, "optimizer", ["sgd", "adam"])
        check_option(self.sampler, "sampler", Sampler)
        check_scalar(self.lr, "lr", kind=Real, low=0.0, closed="neither")
        check_scalar(self.momentum, "momentum", kind=Real, low=0.0, high=1.0, closed="left")
        check_scalar(self.weight_decay, "weight_decay", kind=Real, low=0.0)
        check_scalar(self.batch_size, "batch_size", kind=Integral, low=1)
        check_scalar(self.epochs, "epochs", kind=Integral, low=1)
        check_scalar(self.retrain_epochs, "retrain_epochs", kind=Integral, low=1)
        check_scalar(self.track_epochs, "track_epochs", kind=Integral, low=1)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='auto' or 'cpu'")
    return dev


def _batches(n: int, batch_size: int, sampler: Sampler, generator: torch.Generator):
    if sampler is Sampler.REPLACEMENT:
        for _ in range(-(-n // batch_size)):
            yield torch.randint(n, (batch_size,), generator=generator)
    else:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def train_epochs(model, optimizer, data: Dataset, epochs: int, config: TrainConfig, *, tracker=None,
                 generator: torch.Generator, progress=None, loss=None) -> None:
    """Train ``epochs`` epochs on ``data``'s training split.

    Tracker contract: ``tracker.reset()`` at the start of the last ``config.track_epochs``
    epochs, ``tracker.new_epoch()`` at the start of every epoch (anything with those two
    methods works, e.g. a group of trackers). ``loss(output, target)`` is the mean
    minibatch loss (default: :func:`mustat.models.loss_fn`).
    """
    amp = data.X_train.device.type == "cuda"
    sampler = Sampler(config.sampler)
    was_training = model.training
    model.train()
    for epoch in range(epochs):
        if tracker is not None:
            if epoch == max(epochs - config.track_epochs, 0):
                tracker.reset()
            tracker.new_epoch()
        for idx in _batches(len(data.y_train), config.batch_size, sampler, generator):
            idx = idx.to(data.X_train.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(data.X_train.device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(data.X_train[idx])
            target = data.y_train[idx]
            (loss(out.float(), target) if loss is not None else loss_fn(model, out.float(), target)).backward()
            optimizer.step()
        if progress is not None:
            progress.update(1)
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, X, y) -> tuple[float, float]:
    """(accuracy, mean loss); for regression the accuracy is NaN."""
    was_training = model.training
    model.eval()
    out = model(X).float()
    loss = float(loss_fn(model, out, y))
    acc = float((predict(model, out) == y).float().mean()) if not y.is_floating_point() else float("nan")
    model.train(was_training)
    return acc, loss


@dataclass(frozen=True)
class PruneConfig:
    criterion: str = "mu"
    scope: str = "global"
    schedule: str = "geometric"
    target_sparsity: float = 0.95
    rounds: int = 5


def _row(model, data, *, criterion, scope, seed, rnd, target):
    acc, loss = evaluate(model, data.X_test, data.y_test)
    val_acc, _ = evaluate(model, data.X_val, data.y_val)
    rep = mustat.PruningReport.from_model(model)
    return dict(criterion=criterion, scope=scope, seed=seed, round=rnd, target_sparsity=target,
                sparsity=mustat.sparsity(model), compression_ratio=rep.compression_ratio,
                test_accuracy=acc, test_loss=loss, val_accuracy=val_acc)


def dense_phase(model_name: str, data: Dataset, config: TrainConfig, *, seed: int, progress=None,
                grad_moment: bool = True):
    """Initialise (seeded, without touching the global RNG) and train the dense model.

    ``grad_moment``: also track the gradient moment (needed by calibrated criteria only).

    Returns ``(state, row)``: a checkpoint dict to start every criterion from, and the dense result row.
    """
    n_out = data.n_classes or 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(model_name, data.input_shape, n_out, task=data.task)
    model.to(data.X_train.device)
    opt = config.make_optimizer(model.parameters())
    tracker = mustat.PseudoBootstrap(model, grad_moment=grad_moment)
    tracker.attach(opt)
    gen = torch.Generator().manual_seed(seed)
    train_epochs(model, opt, data, config.epochs, config, tracker=tracker, generator=gen, progress=progress)
    row = _row(model, data, criterion="dense", scope="-", seed=seed, rnd=0, target=0.0)
    state = dict(model=copy.deepcopy(model.state_dict()), optimizer=copy.deepcopy(opt.state_dict()),
                 tracker=tracker.state_dict(), generator=gen.get_state(), round=0, rows=[])
    return state, row


def _scores(model, criterion: str, tracker, opt, data: Dataset, config: TrainConfig, *, seed: int):
    kind = mustat.CRITERIA[criterion].se_kind
    if kind == "calibrated":
        se = calibrated_se(tracker, opt, n=len(data.y_train), batch_size=config.batch_size)
        return mustat.score(model, criterion, se=se, seed=seed, weights=tracker.mean())
    return mustat.score(model, criterion, se=tracker.std() if kind == "pseudo" else None, seed=seed)


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
    model = build(model_name, data.input_shape, n_out, task=data.task).to(data.X_train.device)
    # The optimizer first: installing masks reorders model.parameters() (a parametrized
    # weight moves after its bias), and optimizer state is matched by position.
    opt = config.make_optimizer(model.parameters())
    mustat.load_pruned_state_dict(model, start["model"])
    opt.load_state_dict(start["optimizer"])
    tracker = mustat.PseudoBootstrap(model, grad_moment=start["tracker"].get("grad_moment", False))
    tracker.load_state_dict(start["tracker"])
    tracker.attach(opt)
    gen = torch.Generator()
    gen.set_state(start["generator"])
    rows = list(start["rows"])
    targets = schedule(prune.schedule, prune.target_sparsity, prune.rounds)
    for rnd in range(start["round"] + 1, len(targets) + 1):
        target = targets[rnd - 1]
        scores = _scores(model, prune.criterion, tracker, opt, data, config, seed=seed * 1000 + rnd)
        mustat.prune(model, scores, sparsity=target, scope=prune.scope)
        train_epochs(model, opt, data, config.retrain_epochs, config, tracker=tracker, generator=gen, progress=progress)
        rows.append(_row(model, data, criterion=prune.criterion, scope=prune.scope, seed=seed, rnd=rnd, target=target))
        if checkpoint is not None:
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(), tracker=tracker.state_dict(),
                         generator=gen.get_state(), round=rnd, rows=rows)
            atomic_write(checkpoint, lambda t, s=state: torch.save(s, t))
        if on_round is not None:
            on_round(rows[-1])
    return rows

