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
    est.fit(FitContext(X, y, loss=loss, optimizer=optimizer, batch_size=64))   # or data=loader
    scores = mustat.score(model, "mu", se=est.se(), weights=est.estimate())

A new estimator is one subclass plus ``@register_estimator("name")``, in one file; what
it needs is declared on the class (see :class:`Estimator`), so the pipeline, the CLI, the
study and the benchmark take it with no other edit. Files outside the package register by
being imported: list them in the environment variable ``MUSTAT_PLUGINS`` (paths or module
names, separated by ``os.pathsep``), or install a package with a ``mustat.plugins`` entry
point (:func:`load_plugins`).
"""

from __future__ import annotations

import abc
import functools
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mustat._checks import check_option
from mustat._params import entries, select
from mustat.batching import batches, check_data, count
from mustat.cost import Cost
from mustat.cost import announce as announce_cost

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


class DegenerateSEWarning(UserWarning):
    """An estimator's standard errors carry no information about the individual weights.

    Emitted after :meth:`Estimator.fit` (:meth:`Estimator.check_degenerate`) when, over the
    live (unpruned) entries of the estimated tensors, either every finite SE is the same number
    (to a relative :data:`DEGENERATE_RTOL`) or more than :data:`DEGENERATE_UNIDENTIFIED` of them
    are unidentified (``se = inf``); and by the curvature estimators when the loss has no
    curvature in output space. ``mu``'s score ``|w| / se`` then ranks by magnitude alone (equal
    SEs) or prunes the unidentified weights first whatever their size. ``estimator`` names the
    estimator and ``diagnostics`` holds the numbers the test used, as for :class:`WindowWarning`.
    """

    def __init__(self, message: str, *, estimator: str = "", diagnostics: dict | None = None):
        super().__init__(message)
        self.estimator = estimator
        self.diagnostics = dict(diagnostics or {})


#: relative spread ``(max - min) / max`` of the finite SEs at or below which they count as all equal
DEGENERATE_RTOL = 1e-6
#: fraction of live weights with ``se = inf`` above which the SEs count as degenerate
DEGENERATE_UNIDENTIFIED = 0.5


def _checked_fit(fit: Callable) -> Callable:
    """``fit`` followed by :meth:`Estimator.check_degenerate` when the outermost ``fit`` returns
    (a subclass's ``fit`` that calls ``super().fit`` is checked once)."""
    if getattr(fit, "_checks_degenerate", False):
        return fit

    @functools.wraps(fit)
    def checked(self, context, *args, **kwargs):
        depth = self.__dict__.get("_fit_depth", 0)
        self.__dict__["_fit_depth"] = depth + 1
        try:
            out = fit(self, context, *args, **kwargs)
        finally:
            self.__dict__["_fit_depth"] = depth
        if depth == 0:
            self.check_degenerate(context, stacklevel=3)
        return out

    checked._checks_degenerate = True
    return checked


def decoupled_decay(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` applies *decoupled* weight decay (AdamW, or
    ``Adam(decoupled_weight_decay=True)``): a shrinkage step outside the gradient, which is
    not an L2 penalty on the loss, so no penalised likelihood has its fixed point."""
    for g in optimizer.param_groups:
        if float(g.get("weight_decay", 0.0)) == 0.0:
            continue
        if g.get("decoupled_weight_decay", False) or isinstance(optimizer, torch.optim.AdamW):
            return True
    return False


def optimizer_kind(optimizer: torch.optim.Optimizer | str) -> str:
    """``"sgd"``, ``"adam"``, ... : the lower-case class name (AdamW is ``"adamw"``)."""
    return optimizer.lower() if isinstance(optimizer, str) else type(optimizer).__name__.lower()


@dataclass(frozen=True)
class FitContext:
    """What training used, handed to :meth:`Estimator.fit`.

    Data come as ``X`` and ``y`` tensors (the fast path) or as ``data``, any re-iterable
    of ``(inputs, targets)`` batches such as a ``DataLoader`` (:mod:`mustat.batching`);
    estimators read them one batch at a time. ``loss(output, target)`` is the *mean* loss
    of a batch (what was minimised, without the penalty). ``weight_decay`` is PyTorch's L2
    coefficient on that mean loss, so the penalised objective is
    ``mean loss + weight_decay / 2 * |theta|^2``; ``None`` reads it from ``optimizer`` (an
    error if its parameter groups disagree, or if its decay is decoupled). ``n``, the
    number of training samples, defaults to ``len(y)`` or the DataLoader's dataset size.
    """

    X: Tensor | None = None
    y: Tensor | None = None
    loss: Loss | None = None
    optimizer: torch.optim.Optimizer | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    n: int | None = None
    data: Iterable | None = None

    def __post_init__(self):
        if (self.X is None) != (self.y is None):
            raise ValueError("FitContext needs X and y together (or neither)")
        if self.X is not None and self.data is not None:
            raise ValueError("FitContext takes X and y, or data, not both")
        if self.X is not None and len(self.X) != len(self.y):
            raise ValueError(f"FitContext: X has {len(self.X)} rows but y has {len(self.y)}")
        if self.data is not None:
            check_data(self.data, "FitContext(data=...)")
        if self.n is None and self.has_data:
            object.__setattr__(self, "n", count(self.source))

    @property
    def has_data(self) -> bool:
        return self.X is not None or self.data is not None

    @property
    def source(self):
        """The data in :mod:`mustat.batching`'s form: ``(X, y)`` or the iterable."""
        return (self.X, self.y) if self.X is not None else self.data

    def batches(self, batch_size: int | None = None):
        """The training data's ``(inputs, targets)`` batches (chunks of ``batch_size`` rows for tensors)."""
        self.need("this estimator", "data")
        return batches(self.source, batch_size)

    def penalty(self) -> float:
        """The L2 coefficient: ``weight_decay`` if given, else the optimizer's, else 0."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        if self.optimizer is None:
            return 0.0
        if decoupled_decay(self.optimizer):
            raise ValueError(
                f"{type(self.optimizer).__name__}'s decoupled weight decay is not an L2 penalty on the loss, so "
                "no penalised likelihood matches its fixed point; use Adam(weight_decay=...) or SGD"
            )
        values = {float(g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups}
        if len(values) > 1:
            raise ValueError(
                f"the optimizer's parameter groups use different weight_decay values {sorted(values)}; "
                "pass FitContext(weight_decay=...) explicitly"
            )
        return values.pop() if values else 0.0

    def need(self, estimator: str, *fields: str) -> None:
        """Raise a ValueError naming the fields ``estimator`` needs and this context lacks
        (``"data"`` means ``X``/``y`` or ``data``)."""
        missing = [f for f in fields if (not self.has_data if f == "data" else getattr(self, f) is None)]
        if missing:
            shown = ["X=..., y=... (or data=...)" if f == "data" else f"{f}=..." for f in missing]
            raise ValueError(f"estimator {estimator!r} needs FitContext({', '.join(shown)}); got none for "
                             f"{', '.join(missing)}")


logger = logging.getLogger("mustat.uncertainty")


def announce(name: str, cost: Cost | None, progress: bool | None) -> bool:
    """Say a long fit's estimated cost before it starts (:func:`mustat.cost.announce`); returns
    whether to show progress bars."""
    return announce_cost(f"estimator {name!r}: this fit will take", cost, progress, logger)


@dataclass(frozen=True)
class TrainingSetup:
    """What an estimator may need to know about a training run before it starts, so that an
    incompatible combination fails before any work (:meth:`Estimator.check`).

    ``optimizer`` is the optimizer's kind (``"sgd"``, ``"adam"``, ...), ``n`` the number of
    training samples, ``batch_size`` the minibatch size, ``window_steps`` the optimizer
    steps in the shortest tracking window, ``sampler`` ``"replacement"`` or ``"shuffle"``
    (``None``: batches from a DataLoader, unknown)."""

    optimizer: str
    n: int
    batch_size: int
    window_steps: int
    sampler: str | None = "replacement"
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False


class Estimator(abc.ABC):
    """Base class of standard-error estimators (see the module notes).

    Subclasses set ``trajectory`` and implement :meth:`se`; a trajectory
    estimator also implements :meth:`update` and its state (:meth:`state_dict`,
    :meth:`load_state_dict`, which the pipeline checkpoints), a post-hoc one :meth:`fit`.
    ``names`` are the tracked tensors: by default the trainable ``weight`` of every
    ``nn.Linear`` and ``nn.Conv{1,2,3}d`` (``params=`` chooses others).

    What an estimator needs is declared, so callers (the pipeline, the CLI, the study)
    can check a combination before any training and never name an estimator:

    * ``needs``: the :class:`FitContext` fields :meth:`fit` reads (``"data"``, ``"loss"``,
      ``"optimizer"``, ``"batch_size"``, ``"n"``);
    * ``optimizers``: the optimizer kinds its theory covers (``None``: any);
    * ``with_replacement``: it assumes minibatches drawn with replacement;
    * ``l2_only``: it refuses decoupled weight decay (AdamW);
    * ``min_window_steps``: the fewest steps a tracking window must hold;
    * ``measures_frozen``: it can measure frozen tensors (``requires_grad=False``); the
      others refuse them at construction (a trajectory does not move them, a refit
      would not fit them);
    * ``default``: it is in :func:`default_estimators`, the default list of the calibration study,
      the benchmark's grids and ``mustat scale`` (``mustat prune``'s is :data:`mustat.config.DEFAULT_SE`);
    * ``variants``: named option sets the calibration study can run (``"pseudo-ema"``);
    * ``constants``: code-level settings that shape its results (they go into run settings
      and cell keys, so changing one recomputes what it shapes);
    * :meth:`options`: options derived from the training (:class:`TrainingSetup`);
    * ``quantity``: ``"sampling"`` (an estimate of the weight's sampling standard deviation,
      for intervals and tests) or ``"saliency"`` (a curvature-based scale for ranking, such as
      ``sqrt([H^-1]_qq)``, which is a sampling SE only for a correct, unpenalised likelihood).
    """

    name: ClassVar[str] = ""
    trajectory: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    optimizers: ClassVar[tuple[str, ...] | None] = None
    with_replacement: ClassVar[bool] = False
    l2_only: ClassVar[bool] = False
    min_window_steps: ClassVar[int] = 0
    measures_frozen: ClassVar[bool] = False
    default: ClassVar[bool] = False
    variants: ClassVar[dict[str, dict]] = {}
    constants: ClassVar[dict[str, Any]] = {}
    quantity: ClassVar[str] = "sampling"

    def __init__(self, model: nn.Module, *, params: Iterable[str] | None = None):
        self.names: list[str] = select(model, params)
        table = entries(model)
        self._entries = [table[n] for n in self.names]
        self._model = model
        frozen = [n for n in self.names if table[n].frozen]
        if frozen and not self.measures_frozen:
            why = "never move during training" if self.trajectory else "are not fitted, so it has nothing to measure"
            raise ValueError(
                f"estimator {self.name!r} cannot measure {frozen}: they are frozen (requires_grad=False) and {why}; "
                "leave them out of params=, or use an estimator that can (curvature)")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "fit" in cls.__dict__:        # every fit, built in or plugin, ends with the degenerate-SE check
            cls.fit = _checked_fit(cls.__dict__["fit"])

    # ---------------------------------------------------------------- declared needs
    @classmethod
    def options(cls, setup: TrainingSetup) -> dict[str, Any]:
        """Constructor options derived from the training (default: none)."""
        return {}

    @classmethod
    def check(cls, setup: TrainingSetup) -> None:
        """Raise a ValueError when this estimator cannot serve ``setup``; warn when its theory is
        off. Called before any training; subclasses extend it."""
        kind = optimizer_kind(setup.optimizer)
        if cls.optimizers is not None and kind not in cls.optimizers:
            raise ValueError(f"estimator {cls.name!r} supports the optimizers {', '.join(cls.optimizers)}, "
                             f"not {kind!r}; choose another --optimizer or another --se")
        if cls.l2_only and setup.decoupled_weight_decay:
            raise ValueError(f"estimator {cls.name!r} needs weight decay as an L2 penalty on the loss; decoupled "
                             "weight decay (AdamW) has no penalised likelihood: use Adam(weight_decay=...) or SGD")
        if cls.trajectory and setup.window_steps < cls.min_window_steps:
            raise ValueError(f"estimator {cls.name!r} needs a tracking window of at least {cls.min_window_steps} "
                             f"optimizer steps, the run gives {setup.window_steps}; track more epochs or use a "
                             "smaller batch size")
        if cls.with_replacement and setup.sampler not in ("replacement", None):
            warnings.warn(f"estimator {cls.name!r} assumes minibatches drawn with replacement; with "
                          f"sampler={setup.sampler!r} it is biased (use --sampler replacement)", stacklevel=3)

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
    @_checked_fit
    def fit(self, context: FitContext) -> Estimator:
        """Finish the estimate with what training used; returns ``self``.

        Every ``fit`` (this one and each subclass's) ends with :meth:`check_degenerate`."""
        return self

    def check_degenerate(self, context: FitContext | None = None, *, stacklevel: int = 2) -> dict[str, Any] | None:
        """Warn (:class:`DegenerateSEWarning`) when the fitted SEs cannot tell the weights apart.

        Over the live (unpruned) entries of every estimated tensor: more than
        :data:`DEGENERATE_UNIDENTIFIED` (half) of them have ``se = inf``, or there are at least two
        finite SEs and ``(max - min) <= DEGENERATE_RTOL * max`` (1e-6) over them. Returns the
        numbers tested (``None`` when the SEs are not available yet, e.g. a trajectory estimator
        with too few recorded steps: reading them reports that). Called by :meth:`fit`;
        ``context`` only makes the message name ``1/sqrt(n * weight_decay)`` when every SE is that.
        """
        try:
            se = self.se()
        except RuntimeError:                  # NotFittedError, or a trajectory too short to read
            return None
        finite, live, inf = [], 0, 0
        for n, e in zip(self.names, self._entries):
            s = se[n].detach()
            m = e.mask()
            s = s.flatten() if m is None else s[m.reshape(s.shape).to(s.device) != 0]
            live += s.numel()
            inf += int(torch.isinf(s).sum())
            finite.append(s[torch.isfinite(s)].double().cpu())
        vals = torch.cat(finite) if finite else torch.zeros(0, dtype=torch.float64)
        if live == 0:
            return None
        lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (math.nan, math.nan)
        diag = dict(live=live, unidentified=inf, finite=len(vals), se_min=lo, se_max=hi)
        equal = len(vals) >= 2 and hi - lo <= DEGENERATE_RTOL * abs(hi)
        unidentified = inf > DEGENERATE_UNIDENTIFIED * live
        if not (equal or unidentified):
            return diag
        why, by_design = [], False
        if unidentified:
            why.append(f"{inf} of {live} live weights ({inf / live:.0%}, more than {DEGENERATE_UNIDENTIFIED:.0%}) are "
                       "unidentified (se = inf: nothing in the data or the penalty pins them down), so "
                       f"mu[{self.name}] prunes them first whatever their magnitude")
        if equal:
            prior = None
            if context is not None and context.n:
                try:
                    prior = context.n * context.penalty()
                except ValueError:
                    prior = None
            if prior and abs(hi * math.sqrt(prior) - 1) <= DEGENERATE_RTOL:
                why.append(f"every finite SE equals {hi:.6g} = 1/sqrt(n*weight_decay) (n={context.n}, "
                           f"weight_decay={context.penalty():g}): the data's curvature is zero at every weight, so "
                           f"mu[{self.name}] is magnitude pruning")
            else:
                by_design = not unidentified
                why.append(f"every finite SE equals {hi:.6g} (to {DEGENERATE_RTOL:g} relative), so mu[{self.name}] is "
                           "magnitude pruning")
        check = ("check that the loss has curvature in the model's outputs (nll_loss needs log_softmax outputs; or use "
                 "cross_entropy on logits), that the data reach these weights (inputs not all zero, units not dead) and "
                 "that the fit data are the training data; or use another estimator")
        advice = ("This is right when every weight has the same information by design (a linear model on "
                  f"standardised inputs); otherwise {check}") if by_design else check[0].upper() + check[1:]
        warnings.warn(DegenerateSEWarning(
            f"estimator {self.name!r}: degenerate standard errors: {'; '.join(why)}. {advice}",
            estimator=self.name, diagnostics=diag), stacklevel=stacklevel)
        return diag

    @abc.abstractmethod
    def se(self) -> dict[str, Tensor]:
        """Standard errors keyed by tensor name, each with its weight's shape."""

    def estimate(self) -> dict[str, Tensor]:
        """The point estimate these standard errors belong with (default: the current weights)."""
        return self._current_weights()

    def diagnostics(self) -> dict[str, Any]:
        """Plain numbers saying how far to trust :meth:`se` (window size, convergence, ...)."""
        return {}

    def cost(self, context: FitContext) -> Cost | None:
        """What :meth:`fit` on ``context`` will cost (:class:`Cost`), estimated from the shapes
        before any work; ``None`` when this estimator does not say (the default). An estimator
        that declares it raises a ValueError offering a cheaper structure when the memory
        exceeds its limit, announces a long fit (:func:`announce`) and shows progress bars."""
        return None

    @property
    def centre(self) -> str:
        """Where :meth:`estimate` (the centre of this estimator's Wald intervals) comes from."""
        return "current weights"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027  (an optional hook)
        pass

    def _identified(self, se: dict[str, Tensor]) -> dict[str, Tensor]:
        """The se = 0 policy of the estimators that measure spread (trajectories, refits): an unpruned
        entry that never moved has no information from the data (no gradient ever reached it), not
        infinite precision, so its SE is ``inf`` (z = 0: M&U prunes it first). The count is
        ``diagnostics()["unidentified"]``. Curvature-based estimators get the same from the penalty."""
        out, count = {}, 0
        for n, e in zip(self.names, self._entries):
            s = se[n]
            m = e.mask()
            flat = s == 0 if m is None else (s == 0) & (m.reshape(s.shape).to(s.device) != 0)
            count += int(flat.sum())
            out[n] = s.masked_fill(flat, float("inf"))
        self._unidentified = count
        return out

    def _current_weights(self) -> dict[str, Tensor]:
        return {n: e.effective().clone() for n, e in zip(self.names, self._entries)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tensors={len(self.names)})"


class NotFittedError(RuntimeError):
    """An estimator was read before :meth:`Estimator.fit` gave it what it needs."""


class CurvatureEstimator(Estimator):
    """Base of the estimators that evaluate a curvature at the trained weights in :meth:`fit`
    (``curvature`` and the marginal family): ``fit`` sets ``_se`` and ``_estimate``, the
    weights it was evaluated at, which are the intervals' centre."""

    _se: dict[str, Tensor] | None = None
    _estimate: dict[str, Tensor] | None = None

    def se(self) -> dict[str, Tensor]:
        if self._se is None:
            raise NotFittedError(f"{self.name} is not fitted: call fit(FitContext(X=..., y=..., loss=...)) after "
                                 "training (or FitContext(data=loader, loss=...))")
        return {k: v.clone() for k, v in self._se.items()}

    @property
    def centre(self) -> str:
        return "weights at the end of training (where the curvature is evaluated)"

    def estimate(self) -> dict[str, Tensor]:
        """The weights at which the curvature was evaluated."""
        if self._estimate is None:
            return self._current_weights()
        return {k: v.clone() for k, v in self._estimate.items()}


ESTIMATORS: dict[str, type[Estimator]] = {}

_FIELDS = ("data", "loss", "optimizer", "batch_size", "n")


def register_estimator(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator: register an :class:`Estimator` subclass under ``name``.

    That one decorator is all a new estimator needs to appear in ``mustat prune --se``,
    the calibration study and the benchmark (its declared needs are checked here)."""

    def deco(cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"register_estimator({name!r}) decorates Estimator subclasses, got {cls!r}")
        if not isinstance(name, str) or not name or "[" in name or "]" in name:
            raise ValueError(f"estimator names are non-empty and have no brackets, got {name!r}")
        if name in ESTIMATORS and ESTIMATORS[name] is not cls:
            raise ValueError(f"an estimator named {name!r} is already registered ({ESTIMATORS[name].__name__})")
        bad = [f for f in cls.needs if f not in _FIELDS]
        if bad:
            raise ValueError(f"{cls.__name__}.needs has {bad}; valid: {', '.join(_FIELDS)}")
        if cls.trajectory and (cls.state_dict is Estimator.state_dict or cls.load_state_dict is Estimator.load_state_dict):
            raise TypeError(f"{cls.__name__} records a trajectory, so it must implement state_dict() and "
                            "load_state_dict(): the pipeline checkpoints it between rounds")
        taken = {v: n for n, c in ESTIMATORS.items() if c is not cls for v in c.variants}
        clash = [v for v in cls.variants if v in ESTIMATORS or v in taken or v == name]
        if clash:
            raise ValueError(f"{cls.__name__}.variants {clash} clash with registered names")
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return deco


def get_estimator(name: str) -> type[Estimator]:
    """The registered estimator class called ``name``; ValueError listing the valid names otherwise."""
    return ESTIMATORS[check_option(name, "se", sorted(ESTIMATORS))]


def default_estimators() -> list[str]:
    """The estimators marked ``default``, in registration order: the calibration study's, the benchmark
    grids' and ``mustat scale``'s default list (``mustat prune`` uses :data:`mustat.config.DEFAULT_SE`)."""
    return [n for n, c in ESTIMATORS.items() if c.default]


def variant(label: str, argname: str = "se") -> tuple[str, dict[str, Any]]:
    """``(registered name, options)`` of a study label: a registered estimator, or a variant one
    declares (``"pseudo-ema"``); ValueError listing every valid label otherwise."""
    if label in ESTIMATORS:
        return label, {}
    for name, cls in ESTIMATORS.items():
        if label in cls.variants:
            return name, dict(cls.variants[label])
    labels = sorted(ESTIMATORS) + sorted(v for c in ESTIMATORS.values() for v in c.variants)
    check_option(label, argname, labels)
    raise AssertionError("unreachable")


def make_estimator(name: str, model: nn.Module, *, setup: TrainingSetup | None = None, **options) -> Estimator:
    """Construct the estimator registered as ``name`` (or a declared variant) for ``model``.

    With ``setup``, the combination is checked first (:meth:`Estimator.check`) and the
    options the estimator derives from the training fill in what ``options`` leaves out."""
    base, preset = variant(name)
    cls = ESTIMATORS[base]
    if setup is not None:
        cls.check(setup)
        options = {**cls.options(setup), **preset, **options}
    else:
        options = {**preset, **options}
    return cls(model, **options)


def load_plugins() -> list[str]:
    """Import the plugins that register estimators or criteria from outside mustat: every
    entry point in the group ``mustat.plugins``, then every path or module name in the
    environment variable ``MUSTAT_PLUGINS`` (``os.pathsep``-separated). Returns what was
    loaded; a plugin that fails to import is an ImportError naming it. Called once when
    :mod:`mustat.uncertainty` is imported, so Dask workers and subprocesses see the same
    registry."""
    import importlib
    import importlib.util
    import os
    from importlib.metadata import entry_points
    from pathlib import Path

    loaded = []
    for ep in entry_points(group="mustat.plugins"):
        ep.load()
        loaded.append(ep.value)
    for item in filter(None, os.environ.get("MUSTAT_PLUGINS", "").split(os.pathsep)):
        path = Path(item)
        try:
            if path.suffix == ".py":
                if not path.is_file():
                    raise FileNotFoundError(f"no such file {path}")
                key = f"mustat_plugin_{abs(hash(str(path.resolve())))}"
                if key not in sys.modules:
                    spec = importlib.util.spec_from_file_location(key, path)
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[key] = module
                    spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except Exception as err:
            raise ImportError(f"MUSTAT_PLUGINS: could not load {item!r}: {type(err).__name__}: {err}") from err
        loaded.append(item)
    return loaded
