"""Train one model under one setting and read every requested standard-error
estimator from that single run, through the registry (:mod:`mustat.uncertainty`)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn

from mustat._checks import check_scalar
from mustat._params import entries, select
from mustat.training import check_training, make_optimizer, steps_per_epoch, train_epochs
from mustat.uncertainty import FitContext, TrainingSetup, WindowWarning, make_estimator, variant


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
        check_training(self)
        check_scalar(self.window, "window", kind=Integral, low=1)
        if not 0 < self.window <= self.epochs:
            raise ValueError(f"window must be in [1, epochs={self.epochs}], got {self.window}")

    @property
    def label(self) -> str:
        opt = "sgd+momentum" if self.optimizer == "sgd" and self.momentum else self.optimizer
        wd = f" wd={self.weight_decay:g}" if self.weight_decay else ""
        return f"{opt} lr={self.lr:g}{wd} S={self.batch_size} {self.sampler} {self.window}/{self.epochs}ep"

    def as_dict(self) -> dict:
        return asdict(self)


#: a study label's suffix that fits a post-hoc estimator at the window mean of the trajectory
#: (the Polyak average of the last ``window`` epochs) instead of at the last iterate
AT_MEAN = "@mean"
AT_MEAN_CENTRE = "window mean (where the curvature is evaluated)"


def split_at(label: str) -> tuple[str, bool]:
    """``(label without the suffix, whether it had it)`` for :data:`AT_MEAN`."""
    return (label[: -len(AT_MEAN)], True) if label.endswith(AT_MEAN) else (label, False)


def resolve(label: str) -> tuple[str, dict]:
    """``(registered name, options)`` of a study label: any registered estimator, or a variant one
    declares (:func:`mustat.uncertainty.variant`), optionally with the :data:`AT_MEAN` suffix
    (post-hoc estimators only: a trajectory estimator has its own centre)."""
    from mustat.uncertainty import ESTIMATORS

    base, at_mean = split_at(label)
    name, opts = variant(base, "estimator")
    if at_mean and ESTIMATORS[name].trajectory:
        raise ValueError(f"estimator={label!r}: {AT_MEAN!r} fits a post-hoc estimator at the window mean, but "
                         f"{base!r} records the trajectory itself and has its own centre; drop the suffix")
    return name, opts


def _window_mean_tracker(model: nn.Module, setup: TrainingSetup):
    """Batch means over every trainable tensor: its estimate is the window mean of all of them.
    The study's models carry no masks; a masked model's parameters would be its stored originals."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return make_estimator("batch-means", model, setup=setup, params=names)


def _load(model: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in values:
                p.copy_(values[n].to(p.dtype))
    return model


def train_and_estimate(model: nn.Module, loss, X: Tensor, y: Tensor, setting: Setting, *, seed: int,
                       estimators: tuple[str, ...], average: bool = False
                       ) -> tuple[dict[str, tuple[dict, dict, dict, str]], dict[str, Tensor], dict[str, Tensor] | None]:
    """Train ``model`` in place and fit every estimator label in ``estimators``.

    Returns ``({label: (estimate, se, diagnostics, centre)}, final_weights, window_mean)``,
    ``centre`` saying where the estimate comes from; a window warning is not raised but kept in
    the diagnostics (``ok``). A label with the :data:`AT_MEAN` suffix is fitted on a copy of the
    model holding the window mean of every trainable tensor, which is returned as
    ``window_mean`` (also with ``average=True``; ``None`` otherwise).
    """
    opt = make_optimizer(setting.optimizer, model.parameters(), lr=setting.lr, momentum=setting.momentum,
                         weight_decay=setting.weight_decay)
    setup = TrainingSetup(optimizer=setting.optimizer, n=len(y), batch_size=setting.batch_size,
                          window_steps=setting.window * steps_per_epoch(len(y), setting.batch_size),
                          sampler=setting.sampler, weight_decay=setting.weight_decay)
    at_mean = [lab for lab in estimators if split_at(lab)[1]]
    for lab in at_mean:
        resolve(lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the study runs shuffle settings on purpose, to measure them
        ests = {lab: make_estimator(lab, model, setup=setup) for lab in estimators if lab not in at_mean}
        tracker = _window_mean_tracker(model, setup) if at_mean or average else None
    train_epochs(model, opt, (X, y), epochs=setting.epochs, batch_size=setting.batch_size, sampler=setting.sampler,
                 generator=torch.Generator().manual_seed(seed), loss=loss,
                 estimators=list(ests.values()) + ([tracker] if tracker is not None else []),
                 track_epochs=setting.window)
    ctx = FitContext(X=X, y=y, loss=loss, optimizer=opt, batch_size=setting.batch_size,
                     weight_decay=setting.weight_decay)
    out: dict[str, tuple[dict, dict, dict[str, Any], str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WindowWarning)  # recorded in the diagnostics instead
        for lab, est in ests.items():
            est.fit(ctx)
            out[lab] = (est.estimate(), est.se(), est.diagnostics(), est.centre)
        mean = {n: v.detach().clone() for n, v in tracker.fit(ctx).estimate().items()} if tracker else None
    if at_mean:
        # no optimizer: the copy is not the model it steps; the penalty is passed as weight_decay
        at = _load(copy.deepcopy(model), mean)
        ctx_mean = FitContext(X=X, y=y, loss=loss, batch_size=setting.batch_size, weight_decay=setting.weight_decay)
        for lab in at_mean:
            est = make_estimator(split_at(lab)[0], at, setup=setup).fit(ctx_mean)
            out[lab] = (est.estimate(), est.se(), est.diagnostics(), AT_MEAN_CENTRE)
    table = entries(model)
    final = {n: table[n].effective().clone() for n in select(model, None)}
    return out, final, mean


#: post-hoc estimators that are elementwise over a stack (the stack's value is each replicate's)
#: but cheaper on each replicate apart: on a single GLM the library's outer-product rule for
#: ``nn.Linear`` layers applies, whereas the stack's ``(S, R, d)`` input sends ``curvature``
#: through per-sample products over all R outputs (5 s against 0.3 s a quick-study cell)
APART_FOR_SPEED = frozenset({"curvature"})


def per_replicate(label: str) -> bool:
    """Whether the study fits ``label`` on each replicate GLM apart rather than on the stack: the
    marginal estimators form curvature blocks over a whole model (``fisher``) or factor layers
    (``kfac``), which a stack of replicates is not; on one GLM they see exactly one dataset.
    The estimators of :data:`APART_FOR_SPEED` give the same numbers either way, faster apart."""
    from mustat.uncertainty import ESTIMATORS, Marginal

    name = resolve(label)[0]
    cls = ESTIMATORS[name]
    return (issubclass(cls, Marginal) and not cls.trajectory) or name in APART_FOR_SPEED


def fit_replicates(stack: nn.Module, build: Callable[[], nn.Module], loss, X: Tensor, y: Tensor,
                   setting: Setting, labels: tuple[str, ...], window_mean: dict[str, Tensor] | None = None
                   ) -> dict[str, tuple[dict, dict, dict, str]]:
    """Fit each post-hoc ``label`` on every replicate of a trained ``StackedGLM`` (data ``(n, R, d)``),
    one GLM at a time: ``{label: (estimate, se, diagnostics of replicate 0, centre)}`` with the
    stack's ``(R, d)`` shapes under ``"linear.weight"``. Labels with the :data:`AT_MEAN` suffix
    are fitted at ``window_mean`` (the stack's ``linear.weight`` and ``linear.bias``)."""
    out = {}
    for lab in labels:
        base, at_mean = split_at(lab)
        if at_mean and window_mean is None:
            raise ValueError(f"estimator {lab!r} is fitted at the window mean: pass window_mean=")
        W, b = ((window_mean["linear.weight"], window_mean["linear.bias"]) if at_mean
                else (stack.linear.weight.detach(), stack.linear.bias.detach()))
        ests, ses, diag, centre = [], [], {}, ""
        for r in range(W.shape[0]):
            glm = build()
            with torch.no_grad():
                glm.linear.weight.copy_(W[r][None])
                glm.linear.bias.copy_(b[r:r + 1])
            est = make_estimator(base, glm).fit(FitContext(X=X[:, r], y=y[:, r], loss=loss,
                                                           weight_decay=setting.weight_decay))
            ests.append(est.estimate()["linear.weight"][0])
            ses.append(est.se()["linear.weight"][0])
            if r == 0:
                diag, centre = est.diagnostics(), AT_MEAN_CENTRE if at_mean else est.centre
        out[lab] = ({"linear.weight": torch.stack(ests)}, {"linear.weight": torch.stack(ses)}, diag, centre)
    return out
