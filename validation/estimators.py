"""Train one model under one setting and read every requested standard-error
estimator from that single run, through the registry (:mod:`mustat.uncertainty`)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mustat._checks import check_option
from mustat.training import (
    OPTIMIZERS,
    Sampler,
    TrackWindow,
    make_optimizer,
    steps_per_epoch,
    train_epochs,
)
from mustat.uncertainty import ESTIMATORS, FitContext, WindowWarning, get_estimator, make_estimator


@dataclass(frozen=True)
class Setting:
    """One training setting: optimizer, its learning rate (and SGD momentum), weight
    decay, batch size, epochs, the tracking window (last ``window`` epochs) and the sampler.
    Every field is explicit: a change of the pipeline's defaults must not move a study."""

    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 40
    window: int = 30
    sampler: str = "replacement"

    def __post_init__(self):
        check_option(self.optimizer, "optimizer", OPTIMIZERS)
        check_option(self.sampler, "sampler", Sampler)
        if not 0 < self.window <= self.epochs:
            raise ValueError(f"window must be in [1, epochs={self.epochs}], got {self.window}")

    @property
    def label(self) -> str:
        opt = "sgd+momentum" if self.optimizer == "sgd" and self.momentum else self.optimizer
        wd = f" wd={self.weight_decay:g}" if self.weight_decay else ""
        return f"{opt} lr={self.lr:g}{wd} S={self.batch_size} {self.sampler} {self.window}/{self.epochs}ep"

    def as_dict(self) -> dict:
        return asdict(self)


#: study labels of estimator variants: label -> (registered name, options)
VARIANTS: dict[str, tuple[str, dict]] = {
    "pseudo-every10": ("pseudo", dict(every=10)),
    "pseudo-ema": ("pseudo", dict(window="ema", beta=0.999)),
    "pseudo-epoch": ("pseudo", dict(window="epoch")),
}
#: batch-means splits the window into this many batches
BATCH_MEANS_BATCHES = 20


def resolve(label: str) -> tuple[str, dict]:
    """``(registered name, options)`` of a study label: a variant above or any registered estimator."""
    if label in VARIANTS:
        return VARIANTS[label]
    check_option(label, "estimator", sorted(ESTIMATORS) + sorted(VARIANTS))
    return label, {}


def train_and_estimate(model: nn.Module, loss, X: Tensor, y: Tensor, setting: Setting, *, seed: int,
                       estimators: tuple[str, ...]) -> tuple[dict[str, tuple[dict, dict, dict, str]], dict[str, Tensor]]:
    """Train ``model`` in place and fit every estimator label in ``estimators``.

    Returns ``({label: (estimate, se, diagnostics, centre)}, final_weights)``, ``centre``
    saying where the estimate comes from; a window warning is not raised but kept in the
    diagnostics (``ok``).
    """
    opt = make_optimizer(setting.optimizer, model.parameters(), lr=setting.lr, momentum=setting.momentum,
                         weight_decay=setting.weight_decay)
    window_steps = setting.window * steps_per_epoch(len(y), setting.batch_size)
    ests = {}
    for lab in estimators:
        name, options = resolve(lab)
        if name == "batch-means":
            options = dict(options, batch_steps=max(1, window_steps // BATCH_MEANS_BATCHES))
        ests[lab] = make_estimator(name, model, **options)
    trajectory = [e for e in ests.values() if get_estimator(e.name).trajectory]
    for e in trajectory:
        e.attach(opt)
    train_epochs(model, opt, X, y, epochs=setting.epochs, batch_size=setting.batch_size, sampler=setting.sampler,
                 generator=torch.Generator().manual_seed(seed), loss=loss,
                 callbacks=[TrackWindow(trajectory, setting.window)])
    ctx = FitContext(X=X, y=y, loss=loss, optimizer=opt, batch_size=setting.batch_size,
                     weight_decay=setting.weight_decay)
    out: dict[str, tuple[dict, dict, dict[str, Any], str]] = {}
    for lab, est in ests.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WindowWarning)  # recorded in the diagnostics instead
            est.fit(ctx)
        out[lab] = (est.estimate(), est.se(), est.diagnostics(), est.centre)
    final = {n: getattr(m, a).detach().clone() for n, (m, a) in zip(est.names, est._targets)}
    return out, final
