"""Train one model under one setting and read every standard-error estimator
from that single run: pseudo-bootstrap variants and the calibrated estimator."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from mustat._checks import check_option
from mustat.data import Dataset
from mustat.training import Sampler, TrainConfig, train_epochs
from mustat.uncertainty import PseudoBootstrap, calibrated_se, stationarity


@dataclass(frozen=True)
class Setting:
    """One training setting: optimizer, its learning rate (and SGD momentum), weight
    decay, batch size, epochs, the tracking window (last ``window`` epochs) and the sampler."""

    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 40
    window: int = 30
    sampler: str = "replacement"

    def __post_init__(self):
        check_option(self.optimizer, "optimizer", ["sgd", "adam"])
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


#: pseudo-bootstrap variants read from every run: name -> tracker options
PSEUDO_VARIANTS = {
    "pseudo": dict(),
    "pseudo-every10": dict(every=10),
    "pseudo-ema": dict(window="ema", beta=0.999),
    "pseudo-epoch": dict(window="epoch"),
}


class _Group:
    """Several trackers behind the training loop's tracker contract."""

    def __init__(self, trackers):
        self.trackers = list(trackers)

    def reset(self):
        for t in self.trackers:
            t.reset()

    def new_epoch(self):
        for t in self.trackers:
            t.new_epoch()


def train_and_estimate(model: nn.Module, loss, X: Tensor, y: Tensor, setting: Setting, *, seed: int) -> dict[str, dict[str, Tensor]]:
    """Train ``model`` in place; return ``{estimator: {name: se}}`` plus ``"_weights"``
    (the final weights, the estimate the paper's M&U tests), ``"_mean"`` (the window
    mean, the averaged-SGD estimate that goes with the calibrated SE) and ``"_stationarity"``
    (the calibrated window's :class:`~mustat.uncertainty.StationarityReport`)."""
    # every field explicit: a change of the pipeline's defaults must not move a study
    config = TrainConfig(optimizer=setting.optimizer, lr=setting.lr, momentum=setting.momentum,
                         weight_decay=setting.weight_decay, batch_size=setting.batch_size, epochs=setting.epochs, track_epochs=setting.window,
                         sampler=setting.sampler)
    opt = config.make_optimizer(model.parameters())
    trackers = {k: PseudoBootstrap(model, **kw) for k, kw in PSEUDO_VARIANTS.items()}
    trackers["calibrated"] = PseudoBootstrap(model, grad_moment=True)
    for t in trackers.values():
        t.attach(opt)
    data = Dataset("study", X, y, X[:0], y[:0], X[:0], y[:0], "classification", None)
    train_epochs(model, opt, data, setting.epochs, config, tracker=_Group(trackers.values()),
                 generator=torch.Generator().manual_seed(seed), loss=loss)
    out = {k: t.std() for k, t in trackers.items() if k != "calibrated"}
    out["calibrated"] = calibrated_se(trackers["calibrated"], opt, n=len(y), batch_size=setting.batch_size, check=False)
    names = trackers["pseudo"].names
    out["_weights"] = {n: getattr(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]).detach().clone() for n in names}
    out["_mean"] = trackers["calibrated"].mean()
    out["_stationarity"] = stationarity(trackers["calibrated"], opt)
    return out
