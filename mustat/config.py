"""The settings of a train -> prune -> retrain run, with their defaults written once.

:class:`TrainConfig` (optimisation), :class:`PruneConfig` (one criterion's pruning) and
:class:`RunConfig` (everything a run does) validate themselves on construction; the
pipeline (:mod:`mustat.pipeline`), the benchmark and the CLI all build these and pass
them on whole, so a setting is named in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from numbers import Integral, Real

import torch

from mustat._checks import check_option, check_scalar
from mustat.criteria import get_criterion, label, parse_label
from mustat.pruning import Scope
from mustat.training import check_training, make_optimizer, steps_per_epoch
from mustat.uncertainty import ESTIMATORS, TrainingSetup, variant

#: the default comparison (``mustat prune``, ``make run``): criteria, each se-based one run with
#: every estimator in :data:`DEFAULT_SE`
DEFAULT_CRITERIA = ("mu", "magnitude", "random")
#: the default estimators of that comparison: the paper's pseudo bootstrap (its trajectory SD) and
#: the marginal Wald test's K-FAC SE, ``sqrt([H^-1]_qq)``, the marginal criterion the project's
#: studies validated and that prunes well with retraining: equal to laplace-torch's Kronecker
#: posterior, at least as accurate as magnitude at every sparsity >= 90% on MNIST-5k and
#: significantly better on MNIST-1D (docs/REPRODUCTION.md section 3, docs/CALIBRATION.md). The
#: estimators the pruning benchmark found worst (``calibrated``, ``batch-means``) or magnitude in
#: disguise at the default weight decay (``curvature``) stay available by name (``--se``).
DEFAULT_SE = ("pseudo", "kfac")
#: the CLI's per-tensor cap: global ranking may not empty a layer
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
    """The cumulative sparsity after each pruning round (non-decreasing, ending at ``target``)."""
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
        check_training(self)
        check_scalar(self.retrain_epochs, "retrain_epochs", kind=Integral, low=1)
        check_scalar(self.track_epochs, "track_epochs", kind=Integral, low=1)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer, params, lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)

    def window_steps(self, n: int) -> int:
        """Optimizer steps in the shortest tracking window (dense or retraining phase)."""
        return min(self.track_epochs, self.epochs, self.retrain_epochs) * steps_per_epoch(n, self.batch_size)

    def setup(self, n: int) -> TrainingSetup:
        """What an estimator may check about this training (:meth:`mustat.Estimator.check`)."""
        return TrainingSetup(optimizer=self.optimizer, n=n, batch_size=self.batch_size,
                             window_steps=self.window_steps(n), sampler=self.sampler, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run: a criterion (with its estimator when it uses one), the scope and the schedule."""

    criterion: str = "magnitude"
    se: str | None = None
    scope: str = "global"
    schedule: str = "geometric"
    target_sparsity: float = 0.95
    rounds: int = 5
    max_tensor_sparsity: float | None = None

    @property
    def label(self) -> str:
        return label(self.criterion, self.se)

    def targets(self) -> list[float]:
        return schedule(self.schedule, self.target_sparsity, self.rounds)


def _check_update(crit, se: str) -> None:
    """A criterion that updates the kept weights (``obs``) needs an estimator that has the update,
    of the kind that holds the curvature (not a sandwich variant)."""
    if not crit.updates:
        return
    name, opts = variant(se)
    if not callable(getattr(ESTIMATORS[name], "obs_update", None)) or opts.get("kind", "observed") != "observed":
        able = sorted(n for n, c in ESTIMATORS.items() if callable(getattr(c, "obs_update", None)))
        raise ValueError(f"criterion {crit.name!r} ends with the compensating update, which estimator {se!r} does not "
                         f"have (it needs the curvature H, not a sandwich); use one of {', '.join(able)} or their "
                         "non-sandwich variants")


def expand(criteria: Sequence[str], se: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(criterion, estimator)`` pairs: each se-based criterion with every estimator in
    ``se``, the others once. ``"mu[curvature]"`` names one pair directly."""
    if isinstance(criteria, str) or isinstance(se, str):
        raise TypeError("criteria and se must be lists of names, e.g. ['magnitude', 'mu'], not one string")
    if not criteria:
        raise ValueError("criteria is empty; give at least one criterion, e.g. magnitude")
    pairs = []
    for text in criteria:
        name, est = parse_label(text)
        crit = get_criterion(name)
        if est is not None:
            if not crit.requires_se:
                raise ValueError(f"criterion {name!r} uses no standard errors, so {text!r} makes no sense; write {name!r}")
            variant(est, "se")          # a registered name or a variant of one ("kfac-layer")
            _check_update(crit, est)
            pairs.append((name, est))
        elif crit.requires_se:
            if not se:
                raise ValueError(f"criterion {name!r} needs standard errors: give se=[...] from {sorted(ESTIMATORS)}")
            for s in se:
                variant(s, "se")            # a registered name or a variant of one
                _check_update(crit, s)
                pairs.append((name, s))
        else:
            pairs.append((name, None))
    return list(dict.fromkeys(pairs))


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``mustat prune`` run does: data, model, the criteria (each se-based one
    with every estimator in ``se``), how they prune, the seeds, the training and the device.
    ``max_tensor_sparsity`` of ``None`` or ``0`` means no per-tensor cap."""

    dataset: str = "digits"
    model: str = "mlp"
    criteria: tuple[str, ...] = DEFAULT_CRITERIA
    se: tuple[str, ...] = DEFAULT_SE
    scope: str = "global"
    schedule: str = "geometric"
    target_sparsity: float = 0.95
    rounds: int = 5
    max_tensor_sparsity: float | None = None
    seeds: tuple[int, ...] = (0,)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    data_dir: str | None = None

    def __post_init__(self):
        from mustat.data import DATASETS
        from mustat.models import MODELS

        for name in ("criteria", "se", "seeds"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        check_option(self.dataset, "dataset", DATASETS)
        check_option(self.model, "model", MODELS)
        check_option(self.scope, "scope", Scope)
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed")
        for s in self.seeds:
            check_scalar(s, "seed", kind=Integral, low=0)
        if self.max_tensor_sparsity == 0:
            object.__setattr__(self, "max_tensor_sparsity", None)
        if self.max_tensor_sparsity is not None:
            check_scalar(self.max_tensor_sparsity, "max_tensor_sparsity", kind=Real, low=0.0, high=1.0, closed="right")
        self.targets()
        self.pairs()

    def pairs(self) -> list[tuple[str, str | None]]:
        return expand(self.criteria, self.se)

    def targets(self) -> list[float]:
        return schedule(self.schedule, self.target_sparsity, self.rounds)

    def prune_config(self, criterion: str, se: str | None) -> PruneConfig:
        return PruneConfig(criterion, se, self.scope, self.schedule, self.target_sparsity, self.rounds,
                           self.max_tensor_sparsity)

    def estimators(self) -> list[str]:
        """The estimators the run uses, each once."""
        return list(dict.fromkeys(s for _, s in self.pairs() if s is not None))

    def settings(self, device: str) -> dict:
        """Every setting that shapes the results (the run folder's ``params.json``), the code-level
        constants of the estimators it uses included."""
        return dict(dataset=self.dataset, data_dir=str(self.data_dir) if self.data_dir else None, model=self.model,
                    runs=[label(c, s) for c, s in self.pairs()], scope=self.scope, schedule=self.schedule,
                    target_sparsity=self.target_sparsity, rounds=self.rounds,
                    max_tensor_sparsity=self.max_tensor_sparsity, seeds=list(self.seeds), device=device,
                    train=asdict(self.train), targets=self.targets(),
                    estimator_constants=estimator_constants(self.estimators()))


def estimator_constants(names) -> dict:
    """The code-level constants (:attr:`mustat.Estimator.constants`) of the estimators ``names``
    that have any: they shape results, so they belong in a run's settings and a cell's key."""
    classes = {n: ESTIMATORS[variant(n)[0]] for n in names}
    return {n: dict(c.constants) for n, c in classes.items() if c.constants}
