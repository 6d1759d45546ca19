"""The training loop: tensors in, callbacks out.

The caller's random state is never changed: batches come from the caller's ``torch.Generator``,
and :func:`seeded` runs a phase on forked, seeded global generators (for dropout).
Estimators record through the optimizer's step hook (``estimator.attach``);
callbacks see epoch boundaries (:class:`TrackWindow` opens a tracking window).
The prune/retrain orchestration lives in :mod:`mustat.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from mustat import distributed
from mustat._checks import check_option, check_scalar
from mustat.models import loss_fn, predict


class Sampler(str, Enum):
    """How minibatches are drawn."""

    SHUFFLE = "shuffle"
    """Reshuffle each epoch and walk through it (sampling without replacement)."""
    REPLACEMENT = "replacement"
    """Each minibatch drawn uniformly with replacement: the bootstrap in "pseudo bootstrap",
    and what the calibrated and batch-means standard errors assume."""


OPTIMIZERS = ("sgd", "adam", "adadelta")


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
    from them (dropout) are reproducible and resume identically; the caller's RNG state is restored."""
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    sampler: str | Sampler = "replacement",
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    progress=None,
    amp: bool | None = None,
) -> None:
    """Train ``epochs`` epochs of minibatches of ``(X, y)``.

    ``loss(output, target)`` is the mean minibatch loss (default
    :func:`mustat.models.loss_fn`). ``amp``: bf16 autocast of the forward pass
    (default: on for CUDA tensors). The model's train/eval mode is restored.

    Inside a ``torch.distributed`` process group every rank draws the same global
    minibatch from ``generator`` and trains on its shard; gradients are combined
    as the global mean (:mod:`mustat.distributed`).
    """
    check_scalar(epochs, "epochs", kind=Integral, low=0)
    check_scalar(batch_size, "batch_size", kind=Integral, low=1)
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    sampler = check_option(sampler, "sampler", Sampler)
    device = X.device.type
    amp = device == "cuda" if amp is None else bool(amp)
    world = distributed.rank_world()[1]
    was_training = model.training
    model.train()
    try:
        for epoch in range(epochs):
            for cb in callbacks:
                cb.on_epoch_start(epoch, epochs)
            for idx in batches(len(y), batch_size, sampler, generator):
                total = len(idx)
                idx = distributed.shard(idx).to(X.device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                if len(idx):
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                        out = model(X[idx])
                    target = y[idx]
                    value = loss(out.float(), target) if loss is not None else loss_fn(model, out.float(), target)
                    value.backward()
                else:  # a final shuffled batch smaller than the world: this rank contributes nothing
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad = torch.zeros_like(p)
                if world > 1:
                    distributed.all_reduce_gradients(model, len(idx), total)
                optimizer.step()
            for cb in callbacks:
                cb.on_epoch_end(epoch, epochs)
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """(accuracy, mean loss); for regression the accuracy is NaN (read the loss)."""
    was_training = model.training
    model.eval()
    try:
        out = model(X).float()
        loss = float(loss_fn(model, out, y))
        acc = float((predict(model, out) == y).float().mean()) if not y.is_floating_point() else float("nan")
    finally:
        model.train(was_training)
    return acc, loss
