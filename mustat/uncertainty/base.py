"""The standard-error estimator protocol and its registry.

An estimator gives, for every tracked tensor (named as in
:mod:`mustat._params`: ``"0.weight"``), a standard error with the weight's
shape, the point estimate it belongs with, and diagnostics as data. It either
*records during training* (``trajectory = True``: :meth:`Estimator.update`
after each optimizer step, :meth:`~Estimator.new_epoch` at each epoch start,
:meth:`~Estimator.reset` at the start of a tracking window) or *runs after
training on data* (``trajectory = False``: all the work happens in
:meth:`~Estimator.fit`). Both kinds are finished by ``fit(context)``, which
hands them what training used (data, mean loss, optimizer, batch size, weight
decay), so every estimator is driven the same way::

    est = make_estimator("batch-means", model, batch_steps=500)
    est.attach(optimizer)                          # trajectory estimators only
    ...                                            # train
    est.fit(FitContext(X, y, loss=loss, optimizer=optimizer, batch_size=64))
    scores = mustat.score(model, "mu", se=est.se(), weights=est.estimate())

A new estimator is one subclass plus ``@register_estimator("name")``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mustat._checks import check_option
from mustat._params import resolve, select

Loss = Callable[[Tensor, Tensor], Tensor]


class WindowWarning(UserWarning):
    """A trajectory estimator's window is too short for the theory it relies on.

    ``estimator`` names the estimator and ``diagnostics`` holds its
    :meth:`Estimator.diagnostics`, so a caller can summarise many such warnings
    without parsing their text.
    """

    def __init__(self, message: str, *, estimator: str = "", diagnostics: dict | None = None):
        super().__init__(message)
        self.estimator = estimator
        self.diagnostics = dict(diagnostics or {})


@dataclass(frozen=True)
class FitContext:
    """What training used, handed to :meth:`Estimator.fit`.

    ``loss(output, target)`` is the *mean* loss of a batch (what was minimised,
    without the penalty). ``weight_decay`` is PyTorch's L2 coefficient on that
    mean loss, so the penalised objective is ``mean loss + weight_decay / 2 * |theta|^2``;
    ``None`` reads it from ``optimizer`` (an error if its parameter groups disagree).
    ``n``, the number of training samples, defaults to ``len(y)``.
    """

    X: Tensor | None = None
    y: Tensor | None = None
    loss: Loss | None = None
    optimizer: torch.optim.Optimizer | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    n: int | None = None

    def __post_init__(self):
        if self.n is None and self.y is not None:
            object.__setattr__(self, "n", len(self.y))
        if (self.X is None) != (self.y is None):
            raise ValueError("FitContext needs X and y together (or neither)")
        if self.X is not None and len(self.X) != len(self.y):
            raise ValueError(f"FitContext: X has {len(self.X)} rows but y has {len(self.y)}")

    def penalty(self) -> float:
        """The L2 coefficient: ``weight_decay`` if given, else the optimizer's, else 0."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        if self.optimizer is None:
            return 0.0
        values = {float(g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups}
        if len(values) > 1:
            raise ValueError(
                f"the optimizer's parameter groups use different weight_decay values {sorted(values)}; "
                "pass FitContext(weight_decay=...) explicitly"
            )
        if type(self.optimizer).__name__ == "AdamW" and values != {0.0}:
            raise ValueError(
                "AdamW's decoupled weight decay is not an L2 penalty on the loss, so no penalised "
                "likelihood matches its fixed point; use Adam(weight_decay=...) or SGD"
            )
        return values.pop() if values else 0.0

    def need(self, estimator: str, *fields: str) -> None:
        """Raise a ValueError naming the fields ``estimator`` needs and this context lacks."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"estimator {estimator!r} needs FitContext({', '.join(f'{f}=...' for f in missing)}); "
                f"got None for {', '.join(missing)}"
            )


class Estimator(abc.ABC):
    """Base class of standard-error estimators (see the module notes).

    Subclasses set ``trajectory`` and implement :meth:`se`; a trajectory
    estimator also implements :meth:`update`, a post-hoc one :meth:`fit`.
    ``names`` are the tracked tensors: by default the ``weight`` of every
    ``nn.Linear`` and ``nn.Conv{1,2,3}d`` (``params=`` chooses others).
    """

    name: ClassVar[str] = ""
    trajectory: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, params: Iterable[str] | None = None):
        self.names: list[str] = select(model, params)
        self._targets = [resolve(model, n) for n in self.names]
        self._model = model

    # ---------------------------------------------------------------- training hooks
    def update(self) -> None:  # noqa: B027  (an optional hook)
        """Record the current weights (after each optimizer step)."""

    def reset(self) -> None:  # noqa: B027  (an optional hook)
        """Start a new tracking window."""

    def new_epoch(self) -> None:  # noqa: B027  (an optional hook)
        """Called at the start of every epoch."""

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call :meth:`update` after every ``optimizer.step()``; returns a removable handle."""
        return optimizer.register_step_post_hook(lambda *_: self.update())

    # ---------------------------------------------------------------- results
    def fit(self, context: FitContext) -> Estimator:
        """Finish the estimate with what training used; returns ``self``."""
        return self

    @abc.abstractmethod
    def se(self) -> dict[str, Tensor]:
        """Standard errors keyed by tensor name, each with its weight's shape."""

    def estimate(self) -> dict[str, Tensor]:
        """The point estimate these standard errors belong with (default: the current weights)."""
        return self._current_weights()

    def diagnostics(self) -> dict[str, Any]:
        """Plain numbers saying how far to trust :meth:`se` (window size, convergence, ...)."""
        return {}

    @property
    def centre(self) -> str:
        """Where :meth:`estimate` (the centre of this estimator's Wald intervals) comes from."""
        return "current weights"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027  (an optional hook)
        pass

    def _current_weights(self) -> dict[str, Tensor]:
        return {n: getattr(m, a).detach().clone() for n, (m, a) in zip(self.names, self._targets)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tensors={len(self.names)})"


class NotFittedError(RuntimeError):
    """An estimator was read before :meth:`Estimator.fit` gave it what it needs."""


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator: register an :class:`Estimator` subclass under ``name``."""

    def deco(cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"register_estimator({name!r}) decorates Estimator subclasses, got {cls!r}")
        if name in ESTIMATORS and ESTIMATORS[name] is not cls:
            raise ValueError(f"an estimator named {name!r} is already registered ({ESTIMATORS[name].__name__})")
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return deco


def get_estimator(name: str) -> type[Estimator]:
    """The registered estimator class called ``name``; ValueError listing the valid names otherwise."""
    return ESTIMATORS[check_option(name, "se", sorted(ESTIMATORS))]


def make_estimator(name: str, model: nn.Module, **options) -> Estimator:
    """Construct the estimator registered as ``name`` for ``model`` with ``options``."""
    return get_estimator(name)(model, **options)
