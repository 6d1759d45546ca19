"""The pseudo bootstrap (Ko, Oehmcke & Gieseke 2019): per-weight running mean
and variance of the iterates of training."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat._params import entries
from mustat.gauge import chains, factors
from mustat.uncertainty.base import Estimator, register_estimator

#: ``gauge=`` options of the trajectory estimators (:mod:`mustat.gauge`)
GAUGES = ("none", "balanced")


class Window(str, Enum):
    """Which optimizer steps form the pseudo-bootstrap sample."""

    SINCE_RESET = "since_reset"
    """Every recorded step since construction or the last :meth:`PseudoBootstrap.reset`.
    The pruning loop resets after each pruning step, so the variance describes retraining."""
    EPOCH = "epoch"
    """The current epoch: :meth:`PseudoBootstrap.new_epoch` (called by the training loop at
    the start of each epoch) resets, so a read at the end of an epoch sees that whole epoch."""
    EMA = "ema"
    """Exponentially weighted mean and variance with decay ``beta``; never needs a reset."""


class Center(str, Enum):
    """Which point estimate the pseudo-bootstrap SD is paired with."""

    CURRENT = "current"
    """The current weights (the paper's M&U)."""
    MEAN = "mean"
    """The window mean of the iterates (averaged SGD)."""


@register_estimator("pseudo")
class PseudoBootstrap(Estimator):
    r"""Running mean and variance of each weight across optimizer steps.

    Each recorded optimizer step contributes the current value of every tracked
    weight as one *pseudo-bootstrap replicate* (each step saw a random
    mini-batch, as a bootstrap refit sees a random resample). The standard
    deviation of the replicates, :meth:`std` (= :meth:`se`), is the paper's
    uncertainty ``se(w)`` and feeds the M&U score ``|w| / se(w)``.

    Statistics. For the ``"since_reset"`` and ``"epoch"`` windows, after
    :math:`n` recorded replicates :math:`x_1, \dots, x_n`, :meth:`mean` is
    :math:`\bar x` and :meth:`var` the unbiased :math:`\sum (x_i - \bar x)^2 / (n - 1)`,
    both computed with Welford's update, which stays accurate when the spread
    is tiny next to the level (float32 weights near 1 moving by 1e-4). For
    ``"ema"`` with decay :math:`\beta`, started at :math:`m_1 = x_1, v_1 = 0`:

    .. math::
        \delta_n = x_n - m_{n-1},\quad m_n = m_{n-1} + (1-\beta)\,\delta_n,\quad
        v_n = \beta\,\bigl(v_{n-1} + (1-\beta)\,\delta_n^2\bigr),

    the exponentially weighted mean and (biased, weights summing to one)
    variance of Finch (2009). The replicates are strongly autocorrelated and
    their spread is set by the optimizer as much as by the data: the
    ``validation`` package measures how far this is from a sampling standard
    error; it is not one by construction.

    Parameters
    ----------
    model
        The network. It is only read, never modified.
    window
        ``"since_reset"`` (default), ``"epoch"`` or ``"ema"``; see :class:`Window`.
    beta
        Decay of the ``"ema"`` window, in (0, 1); required for it and refused otherwise.
    every
        Record only every ``every``-th call of :meth:`update` (thinning).
    params
        Names of the tensors to track (``"0.weight"``); default: the ``weight`` of
        every ``nn.Linear`` and ``nn.Conv{1,2,3}d``.
    grad_moment
        Also keep the window mean and (centred) variance of the minibatch data
        gradient ``p.grad`` of each tracked tensor (:meth:`grad_mean`,
        :meth:`grad_var`), by the same Welford/EMA update; the calibrated
        estimator needs the variance.
    center
        The estimate :meth:`estimate` returns: ``"current"`` weights (default, the
        paper's M&U) or the window ``"mean"``.
    gauge
        ``"none"`` (default): record the weights as they are. ``"balanced"``: map every
        snapshot to its rescaling orbit's balanced point first (:mod:`mustat.gauge`: per
        hidden unit of ReLU-type layers, the point an L2 penalty's optimum sits at), so the
        SD and the centre describe that gauge instead of the optimizer's wandering along
        the orbit; gradients (``grad_moment``) are mapped with it. The model needs a
        chain of such layers, and the tracked tensors must include one of its tensors.

    Notes
    -----
    The tracked value is the *effective* weight: a weight masked by
    :func:`mustat.prune` is a constant zero with zero variance. The update is
    three fused ``torch._foreach_*`` ops over the weights (and gradients) on
    their own device and dtype, with no host synchronisation. After moving the
    model to another device, call :meth:`reset`.
    """

    trajectory = True
    min_window_steps = 2
    default = True
    variants = {
        "pseudo-every10": dict(every=10),
        "pseudo-ema": dict(window="ema", beta=0.999),
        "pseudo-epoch": dict(window="epoch"),
        "pseudo-balanced": dict(gauge="balanced"),
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        window: str | Window = "since_reset",
        beta: float | None = None,
        every: int = 1,
        params: Iterable[str] | None = None,
        grad_moment: bool = False,
        center: str | Center = "current",
        gauge: str = "none",
    ):
        self.window = check_option(window, "window", Window)
        if self.window is Window.EMA:
            if beta is None:
                raise ValueError("window='ema' needs beta, the decay in (0, 1), e.g. beta=0.99")
            check_scalar(beta, "beta", kind=Real, low=0.0, high=1.0, closed="neither")
        elif beta is not None:
            raise ValueError(f"beta={beta!r} is only used with window='ema', not {self.window.value!r}")
        self.beta = None if beta is None else float(beta)
        self.every = int(check_scalar(every, "every", kind=Integral, low=1))
        self.center = check_option(center, "center", Center)
        self.gauge = check_option(gauge, "gauge", GAUGES)
        super().__init__(model, params=params)
        self._chains = self._gauge_entries = None
        self._warm: dict = {}
        if self.gauge == "balanced":
            self._chains = chains(model)
            table = entries(model)
            self._gauge_entries = {k: table[k] for c in self._chains for n in c.layers
                                   for k in (f"{n}.weight", f"{n}.bias") if k in table}
            if not set(self._gauge_entries) & set(self.names):
                raise ValueError(
                    f"gauge='balanced' has nothing to balance: {type(model).__name__} has no tracked tensor in a "
                    "chain of layers with rescalable hidden units (Linear/conv layers in an nn.Sequential with "
                    f"ReLU-type activations between them; found chains {[c.layers for c in self._chains]}); "
                    "use gauge='none'")
        self.grad_moment = bool(grad_moment)
        if self.grad_moment:
            unsupported = [n for n, e in zip(self.names, self._entries) if e.leaf is None]
            if unsupported:
                raise ValueError(f"grad_moment=True needs plain or masked parameters; {unsupported} are computed "
                                 "by another parametrization")
        # one list for weights and, with grad_moment, gradients after them: a single
        # set of fused ops updates both
        self._mean: list[Tensor] = []
        self._m2: list[Tensor] = []
        self._steps = 0
        self.count = 0

    # ------------------------------------------------------------------ recording
    def _current(self) -> list[Tensor]:
        values, to_mask, masks = [], [], []
        for e in self._entries:
            value, mask = e.source()
            if mask is not None:
                to_mask.append(len(values))
                masks.append(mask)
            values.append(value)
        if masks:
            masked = torch._foreach_mul([values[i] for i in to_mask], [m.to(values[i].dtype) for i, m in zip(to_mask, masks)])
            for i, m in zip(to_mask, masked):
                values[i] = m
        if self._chains is not None:
            self._factors = factors({k: e.effective() for k, e in self._gauge_entries.items()}, self._chains,
                                    warm=self._warm)
            values = [(v * self._factors[n]).to(v.dtype) if n in self._factors else v
                      for n, v in zip(self.names, values)]
        return values

    def _current_weights(self) -> dict[str, Tensor]:
        return {n: v.clone() for n, v in zip(self.names, self._current())}

    @torch.no_grad()
    def update(self) -> None:
        """Record the current weights (call once after each optimizer step)."""
        self._steps += 1
        if self._steps % self.every:
            return
        x = self._current()
        self._record(x + self._grads() if self.grad_moment else x)

    def _record(self, x: list[Tensor]) -> None:
        """One Welford (or EMA) step over the list ``x`` (weights, then gradients)."""
        if self.count == 0:
            if len(self._mean) != len(x) or any(
                m.shape != v.shape or m.device != v.device or m.dtype != v.dtype
                for m, v in zip(self._mean, x)
            ):
                self._mean = [v.clone() for v in x]
                self._m2 = [torch.zeros_like(v) for v in x]
            else:
                torch._foreach_copy_(self._mean, x)
                torch._foreach_zero_(self._m2)
            self.count = 1
            return
        self.count += 1
        delta = torch._foreach_sub(x, self._mean)
        if self.window is Window.EMA:
            a = 1.0 - self.beta
            torch._foreach_add_(self._mean, delta, alpha=a)
            torch._foreach_mul_(self._m2, self.beta)
            torch._foreach_addcmul_(self._m2, delta, delta, value=self.beta * a)
        else:
            # M2 += (x - mean_old)(x - mean_new) = delta^2 (n - 1) / n
            n = self.count
            torch._foreach_add_(self._mean, delta, alpha=1.0 / n)
            torch._foreach_addcmul_(self._m2, delta, delta, value=(n - 1) / n)

    def _grads(self) -> list[Tensor]:
        grads = []
        for name, e in zip(self.names, self._entries):
            g = e.leaf.grad
            if g is None:
                raise RuntimeError(f"grad_moment=True but {name!r} has no .grad: call update() after backward() and step()")
            g = g.detach()
            if self._chains is not None and name in self._factors:  # d/d(c a) = (d/da) / c
                g = (g / self._factors[name]).to(g.dtype)
            grads.append(g)
        return grads

    def reset(self) -> None:
        """Start a new window: forget every recorded step (buffers are reused)."""
        self.count = 0
        self._steps = 0

    def new_epoch(self) -> None:
        """Training-loop contract: call at the start of every epoch.

        Resets for ``window="epoch"``; does nothing for the other windows.
        """
        if self.window is Window.EPOCH:
            self.reset()

    # ------------------------------------------------------------------ reading
    def _need(self, n: int, what: str) -> None:
        if self.count < n:
            if self.count == 0:
                raise RuntimeError(
                    f"PseudoBootstrap has recorded no steps, so it has no {what}: call update() "
                    "after each optimizer step, or attach(optimizer), then train"
                )
            raise RuntimeError(
                f"PseudoBootstrap.{what}() needs at least {n} recorded steps, has {self.count}; "
                "train longer (or lower every=) before reading it"
            )

    def _variances(self, lists: list[Tensor]) -> list[Tensor]:
        if self.window is Window.EMA:
            return [v.clone() for v in lists]
        return torch._foreach_mul(lists, 1.0 / (self.count - 1))

    def _need_grad(self, what: str) -> None:
        if not self.grad_moment:
            raise RuntimeError(f"this tracker was built without grad_moment=True, so it has no {what}")

    def mean(self) -> dict[str, Tensor]:
        """Mean of the recorded weights, keyed by tensor name."""
        self._need(1, "mean")
        return {n: m.clone() for n, m in zip(self.names, self._mean)}

    def var(self) -> dict[str, Tensor]:
        """Variance of the recorded weights (unbiased for Welford windows, see class notes)."""
        self._need(2, "var")
        return dict(zip(self.names, self._variances(self._m2[: len(self.names)])))

    def std(self) -> dict[str, Tensor]:
        """Standard deviation of the recorded weights: the pseudo-bootstrap ``se(w)``."""
        var = self.var()
        return dict(zip(var, torch._foreach_sqrt(list(var.values()))))

    def grad_mean(self) -> dict[str, Tensor]:
        """Window mean of the minibatch data gradient; needs ``grad_moment=True``."""
        self._need_grad("gradient moments")
        self._need(1, "grad_mean")
        return {n: g.clone() for n, g in zip(self.names, self._mean[len(self.names):])}

    def grad_var(self) -> dict[str, Tensor]:
        """Window variance (centred) of the minibatch data gradient; needs ``grad_moment=True``.

        At a penalised optimum the data gradient has mean ``-weight_decay * w``, so
        its uncentred second moment overstates the gradient noise by ``(weight_decay * w)^2``.
        """
        self._need_grad("gradient moments")
        self._need(2, "grad_var")
        return dict(zip(self.names, self._variances(self._m2[len(self.names):])))

    @property
    def steps(self) -> int:
        """Optimizer steps seen in the window (recorded or skipped by ``every``)."""
        return self._steps

    # ------------------------------------------------------------------ estimator protocol
    def se(self) -> dict[str, Tensor]:
        """The pseudo-bootstrap SD, :meth:`std`; ``inf`` where the weight never moved
        (:meth:`~mustat.uncertainty.Estimator._identified`)."""
        return self._identified(self.std())

    def estimate(self) -> dict[str, Tensor]:
        """The current weights, or the window mean with ``center="mean"``."""
        return self.mean() if self.center is Center.MEAN else self._current_weights()

    def diagnostics(self) -> dict[str, Any]:
        out = dict(recorded=self.count, steps=self._steps)
        if self.count >= 2:
            self.se()
            out["unidentified"] = self._unidentified
        return out

    @property
    def centre(self) -> str:
        return "window mean" if self.center is Center.MEAN else "current weights"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, counters and the running moments."""
        k = len(self.names)
        out = {
            "window": self.window.value,
            "beta": self.beta,
            "every": self.every,
            "names": list(self.names),
            "count": self.count,
            "steps": self._steps,
            "mean": {n: m.clone() for n, m in zip(self.names, self._mean[:k])},
            "m2": {n: m.clone() for n, m in zip(self.names, self._m2[:k])},
            "grad_moment": self.grad_moment,
            "gauge": self.gauge,
        }
        if self.grad_moment:
            out["grad_mean"] = {n: m.clone() for n, m in zip(self.names, self._mean[k:])}
            out["grad_m2"] = {n: m.clone() for n, m in zip(self.names, self._m2[k:])}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; settings and tensor names must match this tracker."""
        for key in ("window", "beta", "every", "names", "grad_moment", "gauge"):
            mine = self.window.value if key == "window" else getattr(self, key)
            saved = state.get(key, {"grad_moment": False, "gauge": "none"}.get(key))
            if saved != mine:
                raise ValueError(
                    f"state_dict was saved with {key}={saved!r}, this tracker has "
                    f"{key}={mine!r}; construct the tracker with the same settings"
                )
        if self.grad_moment and state["mean"] and "grad_m2" not in state:
            raise ValueError("state_dict has no centred gradient moment (grad_m2): it was saved by an older "
                             "mustat; start a new window instead of resuming this one")
        current = self._current()
        keys = [("mean", "m2")] + ([("grad_mean", "grad_m2")] if self.grad_moment else [])
        mean, m2 = [], []
        for k_mean, k_m2 in keys:
            for name, ref in zip(self.names, current):
                if name not in state[k_mean]:
                    continue
                if state[k_mean][name].shape != ref.shape:
                    raise ValueError(
                        f"state_dict[{k_mean!r}][{name!r}] has shape {tuple(state[k_mean][name].shape)}, "
                        f"the model's tensor has {tuple(ref.shape)}"
                    )
                mean.append(state[k_mean][name].to(device=ref.device, dtype=ref.dtype).clone())
                m2.append(state[k_m2][name].to(device=ref.device, dtype=ref.dtype).clone())
        if mean and len(mean) != len(self.names) * len(keys):
            raise ValueError("state_dict holds moments for only some of the tracked tensors")
        self._mean, self._m2 = mean, m2
        self.count, self._steps = int(state["count"]), int(state["steps"])

    def __repr__(self) -> str:
        extra = f", beta={self.beta}" if self.beta is not None else ""
        if self.gauge != "none":
            extra += f", gauge={self.gauge!r}"
        return (
            f"PseudoBootstrap(window={self.window.value!r}{extra}, every={self.every}, "
            f"tensors={len(self.names)}, count={self.count})"
        )
