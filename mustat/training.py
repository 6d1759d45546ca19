"""The training loop: batches in (tensors or a DataLoader), estimators and callbacks out.

The caller's random state is never changed: batches come from the caller's ``torch.Generator``
(or the caller's DataLoader), and :func:`seeded` runs a phase on forked, seeded global
generators (for dropout). :func:`train_epochs` is the one routine that trains while
estimators watch: it attaches them to the optimizer's step hook for the call and opens
their tracking window (:class:`TrackWindow`); the pipeline, the calibration study and the
scale experiment all train through it. A diverging run stops with :class:`DivergenceError`.
The prune/retrain orchestration lives in :mod:`mustat.pipeline`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from mustat import distributed
from mustat._checks import check_option, check_scalar
from mustat._functional import eval_mode
from mustat.batching import Data, check_data, is_tensors
from mustat.batching import batches as iter_batches
from mustat.models import loss_fn, predict


class Sampler(str, Enum):
    """How minibatches are drawn."""

    SHUFFLE = "shuffle"
    """Reshuffle each epoch and walk through it (sampling without replacement)."""
    REPLACEMENT = "replacement"
    """Each minibatch drawn uniformly with replacement: the bootstrap in "pseudo bootstrap",
    and what the calibrated and batch-means standard errors assume."""


OPTIMIZERS = ("sgd", "adam", "adadelta")


def check_training(settings) -> None:
    """Check the training fields of a settings object (the pipeline's ``TrainConfig``, the study's
    ``Setting``): ``optimizer``, ``sampler``, ``lr``, ``momentum``, ``weight_decay``, ``batch_size``
    and ``epochs``; each message names the field, the value and what is allowed."""
    check_option(settings.optimizer, "optimizer", OPTIMIZERS)
    check_option(settings.sampler, "sampler", Sampler)
    check_scalar(settings.lr, "lr", kind=Real, low=0.0, closed="neither")
    check_scalar(settings.momentum, "momentum", kind=Real, low=0.0, high=1.0, closed="left")
    check_scalar(settings.weight_decay, "weight_decay", kind=Real, low=0.0)
    check_scalar(settings.batch_size, "batch_size", kind=Integral, low=1)
    check_scalar(settings.epochs, "epochs", kind=Integral, low=1)


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
                   ) -> torch.optim.Optimizer:
    """``"sgd"`` (heavy-ball ``momentum``), ``"adam"`` or ``"adadelta"`` (the optimizer of PyTorch's
    MNIST example, usually with ``lr=1.0``), with L2 ``weight_decay`` on the mean loss. The calibrated
    estimator supports SGD and Adam only."""
    check_option(name, "optimizer", OPTIMIZERS)
    check_scalar(lr, "lr", kind=Real, low=0.0, closed="neither")
    check_scalar(momentum, "momentum", kind=Real, low=0.0, high=1.0, closed="left")
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU. Unavailable devices are a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; available: {', '.join(available)}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} does not exist; available: {', '.join(available)}")
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r} is not supported (mustat needs float64 for its references); "
                         f"available: {', '.join(available)}")
    return dev


@contextmanager
def seeded(model: nn.Module, seed: int):
    """Run a training phase with torch's global generators forked and seeded, so layers that draw
    from them (dropout) are reproducible and resume identically; the caller's RNG state is restored.
    Inside a process group each rank gets its own stream (``seed`` on rank 0), so the ranks'
    dropout masks are independent, as one process's would be across the rows of a batch."""
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    rank = distributed.rank_world()[0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1_000_003 * rank)
        yield


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite loss, or an epoch's mean loss far above the first batch's.
    ``epoch`` is the epoch (from 0) where it was seen."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch

    def __reduce__(self):  # crosses process boundaries intact (parallel workers)
        return type(self), (str(self), self.epoch)


#: an epoch whose mean training loss exceeds this multiple of the first batch's (or of 1) has diverged
DIVERGENCE_FACTOR = 1000.0


class Callback:
    """Hooks the training loop calls; override what you need."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        pass

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        pass


class TrackWindow(Callback):
    """Estimators record the last ``last`` epochs of a phase: ``reset()`` when that
    window opens, ``new_epoch()`` at every epoch start (anything with those two
    methods works)."""

    def __init__(self, estimators: Iterable, last: int):
        self.estimators = list(estimators)
        self.last = int(check_scalar(last, "track_epochs", kind=Integral, low=1))

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        for est in self.estimators:
            if epoch == max(epochs - self.last, 0):
                est.reset()
            est.new_epoch()


def batches(n: int, batch_size: int, sampler: str | Sampler, generator: torch.Generator) -> Iterator[Tensor]:
    """One epoch of minibatch indices: ``ceil(n / batch_size)`` batches."""
    sampler = check_option(sampler, "sampler", Sampler)
    if sampler is Sampler.REPLACEMENT:
        for _ in range(-(-n // batch_size)):
            yield torch.randint(n, (batch_size,), generator=generator)
    else:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


class MinibatchSampler(torch.utils.data.Sampler):
    """The minibatches :func:`train_epochs` draws from tensors, as a DataLoader ``batch_sampler``:
    ``DataLoader(dataset, batch_sampler=MinibatchSampler(len(dataset), 64, "replacement", g))``
    trains exactly as ``(X, y)`` tensors with the same generator do, for data that do not fit
    in memory. (torch's ``RandomSampler`` draws an extra permutation each epoch, so its
    order differs after the first.)"""

    def __init__(self, n: int, batch_size: int, sampler: str | Sampler = "replacement",
                 generator: torch.Generator | None = None):
        self.n = int(check_scalar(n, "n", kind=Integral, low=1))
        self.batch_size = int(check_scalar(batch_size, "batch_size", kind=Integral, low=1))
        self.sampler = check_option(sampler, "sampler", Sampler)
        if generator is None:
            raise ValueError("MinibatchSampler needs generator=torch.Generator().manual_seed(...)")
        self.generator = generator

    def __iter__(self):
        for idx in batches(self.n, self.batch_size, self.sampler, self.generator):
            yield idx.tolist()

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.batch_size)


def _epoch_batches(data: Data, batch_size, sampler, generator) -> Iterator[tuple[Tensor, Tensor, int]]:
    """One epoch's ``(inputs, targets, global batch size)`` for this rank: its shard of each batch."""
    if is_tensors(data):
        X, y = data
        for idx in batches(len(y), batch_size, sampler, generator):
            total = len(idx)
            idx = distributed.shard(idx).to(X.device, non_blocking=True)
            yield X[idx], y[idx], total
    else:
        for xb, yb in iter_batches(data):
            yield distributed.shard(xb), distributed.shard(yb), len(yb)


def _check_distributed(model: nn.Module) -> None:
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm)]
    if plain:
        raise ValueError(f"data-parallel training with BatchNorm layers ({', '.join(plain[:4])}) would normalise each "
                         "rank's shard by its own statistics, so N ranks would not train the model one process "
                         "trains; convert them with torch.nn.SyncBatchNorm.convert_sync_batchnorm or train in one "
                         "process")


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    *,
    epochs: int,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    sampler: str | Sampler = "replacement",
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    estimators: Sequence = (),
    track_epochs: int | None = None,
    callbacks: Sequence[Callback] = (),
    progress=None,
    amp: bool | None = None,
) -> None:
    """Train ``epochs`` epochs, with estimators recording the last ``track_epochs``.

    Parameters
    ----------
    data
        ``(X, y)`` tensors, from which minibatches of ``batch_size`` rows are drawn by
        ``sampler`` (``"replacement"`` or ``"shuffle"``) with the caller's ``generator``;
        or any re-iterable of ``(inputs, targets)`` batches (a ``DataLoader``), read once
        per epoch in its own order (then ``batch_size`` and ``generator`` are not used).
        The two give identical training on identical batches.
    loss
        ``loss(output, target)``, the mean minibatch loss (default
        :func:`mustat.models.loss_fn`).
    estimators
        Estimators to drive: the trajectory ones are attached to ``optimizer`` for the
        call (:meth:`~mustat.uncertainty.Estimator.attach`, removed afterwards) and record
        the last ``track_epochs`` epochs (default: all), :class:`TrackWindow`.
    amp
        bf16 autocast of the forward pass (default: on for CUDA).

    The model's train/eval mode is restored. A non-finite loss, or an epoch whose mean
    loss exceeds :data:`DIVERGENCE_FACTOR` times the first batch's (or times 1, whichever is
    larger), raises :class:`DivergenceError` naming the epoch (checked once per epoch: one
    host sync).

    Inside a ``torch.distributed`` process group every rank draws the same global
    minibatch and trains on its shard; gradients are combined as the global mean
    (:mod:`mustat.distributed`), so N ranks train the model one process trains (up to
    floating-point reduction order, and but for dropout, whose masks are drawn per rank).
    """
    check_scalar(epochs, "epochs", kind=Integral, low=0)
    check_data(data)
    if is_tensors(data):
        check_scalar(batch_size, "batch_size", kind=Integral, low=1)
        if generator is None:
            raise ValueError("training from (X, y) tensors needs generator=torch.Generator().manual_seed(...), "
                             "which draws the minibatches")
        sampler = check_option(sampler, "sampler", Sampler)
    trackers = [e for e in estimators if getattr(e, "trajectory", False)]
    window = epochs if track_epochs is None else track_epochs
    callbacks = ([TrackWindow(trackers, window)] if trackers and epochs else []) + list(callbacks)
    world = distributed.rank_world()[1]
    if world > 1:
        _check_distributed(model)
    first_param = next(model.parameters(), None)
    device = first_param.device.type if first_param is not None else "cpu"
    amp = device == "cuda" if amp is None else bool(amp)
    handles = [e.attach(optimizer) for e in trackers]
    was_training = [(m, m.training) for m in model.modules()]
    model.train()
    first: Tensor | None = None
    try:
        for epoch in range(epochs):
            for cb in callbacks:
                cb.on_epoch_start(epoch, epochs)
            total = torch.zeros((), dtype=torch.float64, device=first_param.device if first_param is not None else None)
            rows = 0
            for xb, yb, global_rows in _epoch_batches(data, batch_size, sampler, generator):
                optimizer.zero_grad(set_to_none=True)
                if len(yb):
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                        out = model(xb)
                    value = loss(out.float(), yb) if loss is not None else loss_fn(model, out.float(), yb)
                    value.backward()
                    total += value.detach().double() * len(yb)
                    rows += len(yb)
                    if first is None:
                        first = value.detach().double()
                # a rank whose shard is empty (a final shuffled batch smaller than the world) contributes nothing
                if world > 1:
                    distributed.all_reduce_gradients(model, len(yb), global_rows)
                optimizer.step()
            _check_divergence(total, rows, first, epoch)
            for cb in callbacks:
                cb.on_epoch_end(epoch, epochs)
            if progress is not None:
                progress.update(1)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training:
            m.training = flag


def _check_divergence(total: Tensor, rows: int, first: Tensor | None, epoch: int) -> None:
    zero = torch.zeros((), dtype=torch.float64, device=total.device)
    stats = torch.stack([total, zero + rows, first if first is not None else zero, zero + (first is not None)])
    if distributed.rank_world()[1] > 1:  # every rank decides on the same global numbers
        stats = distributed.all_reduce_sum(stats)
    loss_sum, count, first_sum, ranks = (float(v) for v in stats.cpu())
    if count == 0:
        return
    mean = loss_sum / count
    if not math.isfinite(mean):
        raise DivergenceError(f"training diverged at epoch {epoch}: the mean training loss is {mean} (non-finite); "
                              "lower the learning rate", epoch)
    first_loss = first_sum / max(ranks, 1.0)
    # relative to the first batch, but never below a loss of 1: a converged model fine-tuned from a
    # tiny loss may legitimately move up by a large factor
    if mean > DIVERGENCE_FACTOR * max(first_loss, 1.0):
        raise DivergenceError(f"training diverged at epoch {epoch}: mean training loss {mean:.3g} is over "
                              f"{DIVERGENCE_FACTOR:g} times the first batch's ({first_loss:.3g}, or 1); lower the "
                              "learning rate", epoch)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int | None = None) -> tuple[float, float]:
    """(accuracy, mean loss) over ``data`` (``(X, y)`` tensors, read in chunks of ``batch_size``
    rows, default one; or an iterable of batches), in eval mode (each module's mode restored).
    For regression the accuracy is NaN (read the loss)."""
    loss_sum, correct, rows = 0.0, 0.0, 0
    regression = False
    with eval_mode(model):
        for xb, yb in iter_batches(data, batch_size):
            out = model(xb).float()
            loss_sum += float(loss_fn(model, out, yb)) * len(yb)
            regression = yb.is_floating_point()
            if not regression:
                correct += float((predict(model, out) == yb).double().sum())
            rows += len(yb)
    if rows == 0:
        raise ValueError("evaluate: the data has no rows")
    return (float("nan") if regression else correct / rows), loss_sum / rows
