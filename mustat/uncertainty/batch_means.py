r"""Batch-means standard errors: the long-run variance of each weight's own
trajectory, which for stationary SGD is the sandwich covariance's diagonal.

Statistics. Train on the mean loss with minibatches of size :math:`S` drawn
*with replacement* and a constant step :math:`\eta` with any fixed
preconditioner :math:`P` (SGD, momentum, Adam late in training). Near the
optimum :math:`\theta^*` the update is
:math:`\theta_{t+1} - \theta_t = -\eta P\,(H(\theta_t - \theta^*) + \xi_t)`
with gradient noise :math:`\mathrm{Cov}(\xi_t) = C/S` (:math:`C` the
per-sample gradient covariance, :math:`H` the Hessian of the penalised mean
loss). Summing over a window of :math:`T` steps telescopes:

.. math:: H \sum_t (\theta_t - \theta^*) = -\sum_t \xi_t - (\eta P)^{-1}(\theta_T - \theta_0),

so the window mean :math:`\bar\theta` has long-run variance
:math:`\mathrm{LRV} = \lim T\,\mathrm{Var}(\bar\theta) = H^{-1} (C/S) H^{-1}`,
whatever :math:`\eta` and :math:`P`. The sampling covariance of the
(penalised) estimate is the sandwich :math:`H^{-1} C H^{-1} / N`, hence, per
weight,

.. math:: \widehat{se}^2 = \mathrm{LRV} \cdot S / N,

the full sandwich's diagonal, not a diagonal approximation (Chen, Lee, Tong &
Zhang 2020). LRV is estimated by non-overlapping batch means: with :math:`K`
complete batches of :math:`b` steps and batch means :math:`\bar\theta_k`,
:math:`\widehat{\mathrm{LRV}} = b \cdot s^2(\bar\theta_1, \dots, \bar\theta_K)`
(``ddof = 1``). It is consistent when :math:`b` is much longer than the
weight's integrated autocorrelation time :math:`\tau` and :math:`K` grows.
For fixed :math:`K` the studentised :math:`(\bar\theta - \theta^*) / \widehat{se}` is
Student-t with :math:`K - 1` degrees of freedom, not normal (the SE itself is a
:math:`\chi^2_{K-1}` estimate): intervals and p-values should use
:math:`t_{K-1}` (``diagnostics()["dof"]``); with 20 batches the normal 95%
interval covers only 0.935.

Diagnostic, measured from the trajectory itself (not implied by a model):
:math:`\hat\tau = \widehat{\mathrm{LRV}} / \hat\sigma^2`, with
:math:`\hat\sigma^2` the window variance of the iterates (so the window holds
:math:`T / \hat\tau` effectively independent draws). For an AR(1)-like
weight the batch-means variance is low by about :math:`\tau / (2b)`, so a
batch is accepted when :math:`b \ge` ``min_ratio`` :math:`\cdot\,\hat\tau`
(default 5: at most ~10% in variance, ~5% in SE). :math:`\hat\tau` saturates
near :math:`b` when batches are far too short, which this rule flags. The
per-weight SE has relative error about :math:`1/\sqrt{2(K-1)}` from the
number of batches: ``min_batches`` (default 10).

Assumptions: stationarity over the window (start it after convergence),
with-replacement minibatches (epoch-wise reshuffling makes each epoch's noise
sum to zero), a constant learning rate in the window, and a window long next
to the slowest autocorrelation time, which in correlated designs means
thousands of steps (``docs/CALIBRATION.md``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mustat._checks import check_scalar
from mustat.uncertainty.base import (
    Estimator,
    FitContext,
    NotFittedError,
    WindowWarning,
    register_estimator,
)
from mustat.uncertainty.pseudo import PseudoBootstrap


@register_estimator("batch-means")
class BatchMeans(Estimator):
    """Batch-means standard errors of the window mean (module notes).

    Parameters
    ----------
    model
        The network (only read).
    batch_steps
        Steps per batch ``b``; choose it so the window holds at least
        ``min_batches`` batches, each much longer than the slowest weight's
        autocorrelation time (the diagnostic measures this).
    params
        Tensors to track; default every ``nn.Linear``/``nn.Conv*d`` weight.
    min_batches, min_ratio
        The diagnostic's thresholds (module notes).
    gauge
        ``"balanced"`` maps every iterate to its rescaling orbit's balanced point before
        the batch sums (:mod:`mustat.gauge`; ``"none"``, the default, keeps them as they
        are). The telescoping argument above holds for any smooth function of the iterates,
        so the SE is then the sandwich's diagonal in the penalty's gauge (the delta method
        through the balancing map), and the window mean is gauge-fixed too.

    ``fit`` needs ``FitContext(batch_size=S, n=N)`` (``n`` or data). Extra memory:
    six tensors per tracked weight tensor (window mean and variance, the window's first
    iterate, batch sum, batch-means mean and variance); per step one fused subtraction and
    one fused add on top of the pseudo bootstrap's Welford update. The batch sums are of
    deviations from the window's first iterate, in at least float32: a plain sum of
    iterates in the weight's dtype lost 14% of the long-run variance at ``|w| / sd`` of
    3e4 in float32 (bf16 far more); deviations are of the spread's size, so nothing is lost.
    """

    trajectory = True
    needs = ("batch_size", "n")
    with_replacement = True
    min_window_steps = 2
    default = True
    #: the tracking window is split into this many batches
    BATCHES = 20
    constants = {"batches": BATCHES}
    variants = {"batch-means-balanced": dict(gauge="balanced")}

    @classmethod
    def options(cls, setup) -> dict[str, Any]:
        """``batch_steps``: the window split into :attr:`BATCHES` batches."""
        return dict(batch_steps=max(1, setup.window_steps // cls.BATCHES))

    def __init__(self, model: nn.Module, *, batch_steps: int, params: Iterable[str] | None = None,
                 min_batches: int = 10, min_ratio: float = 5.0, gauge: str = "none"):
        super().__init__(model, params=params)
        self.batch_steps = int(check_scalar(batch_steps, "batch_steps", kind=Integral, low=1))
        self.min_batches = int(check_scalar(min_batches, "min_batches", kind=Integral, low=2))
        self.min_ratio = float(check_scalar(min_ratio, "min_ratio", kind=Real, low=0.0, closed="neither"))
        self._window = PseudoBootstrap(model, params=self.names, gauge=gauge)
        self._sum: list[Tensor] = []
        self._anchor: list[Tensor] = []
        self._in_batch = 0
        self._bmean: list[Tensor] = []
        self._bm2: list[Tensor] = []
        self.batches = 0
        self._se: dict[str, Tensor] | None = None
        self._diag: dict[str, Any] = {}

    # ---------------------------------------------------------------- recording
    @torch.no_grad()
    def update(self) -> None:
        w = self._window
        x = w._current()
        w._steps += 1
        w._record(x)
        if self.batches == 0 and self._in_batch == 0:  # a new window: its first iterate is the anchor
            self._anchor = [v.to(_accumulator(v.dtype), copy=True) for v in x]
        # sums of deviations from the anchor: small numbers, so float32 keeps them exact enough where
        # a plain sum of iterates loses the spread to the level (14% of the LRV at |w| / sd ~ 3e4)
        deviation = torch._foreach_sub([v.to(a.dtype) for v, a in zip(x, self._anchor)], self._anchor)
        if self._in_batch == 0:
            self._sum = deviation
        else:
            torch._foreach_add_(self._sum, deviation)
        self._in_batch += 1
        if self._in_batch == self.batch_steps:
            self._close_batch()

    def _close_batch(self) -> None:
        means = torch._foreach_mul(self._sum, 1.0 / self.batch_steps)
        self.batches += 1
        k = self.batches
        if k == 1 or not _same(self._bmean, means):
            self._bmean = [m.clone() for m in means]
            self._bm2 = [torch.zeros_like(m) for m in means]
        else:
            delta = torch._foreach_sub(means, self._bmean)
            torch._foreach_add_(self._bmean, delta, alpha=1.0 / k)
            torch._foreach_addcmul_(self._bm2, delta, delta, value=(k - 1) / k)
        self._in_batch = 0

    def reset(self) -> None:
        """Start a new window: forget every step and batch."""
        self._window.reset()
        self._in_batch = 0
        self.batches = 0
        self._se = None

    # ---------------------------------------------------------------- results
    def lrv(self) -> dict[str, Tensor]:
        """Batch-means long-run variance ``b * s^2(batch means)`` per weight (in the weight's dtype)."""
        if self.batches < 2:
            raise RuntimeError(
                f"batch-means needs at least 2 complete batches of {self.batch_steps} steps, has "
                f"{self.batches} (window of {self._window.steps} steps): train longer or lower batch_steps"
            )
        scale = self.batch_steps / (self.batches - 1)
        ref = self._window._current()
        return {n: (m2 * scale).to(r.dtype) for n, m2, r in zip(self.names, self._bm2, ref)}

    def fit(self, context: FitContext) -> BatchMeans:
        context.need(self.name, "batch_size", "n")
        lrv = self.lrv()
        factor = context.batch_size / context.n
        self._se = {k: (v * factor).sqrt() for k, v in lrv.items()}
        self._diag = self._diagnose(lrv)
        if not self._diag["ok"]:
            d, why = self._diag, []
            if self.batches < self.min_batches:
                why.append(f"only {self.batches} batches (want >= {self.min_batches})")
            if d["frac_short"] > 0.1:
                why.append(f"{100 * d['frac_short']:.0f}% of live weights have an autocorrelation time above "
                           f"batch_steps / {self.min_ratio:g} (median tau {d['tau_median']:.3g} steps)")
            warnings.warn(WindowWarning(
                f"batch-means window too short ({self.batches} batches of {self.batch_steps} steps): "
                f"{'; '.join(why)}. Its SEs are biased low: track over a longer window with longer batches",
                estimator=self.name, diagnostics=d), stacklevel=2)
        return self

    def _diagnose(self, lrv: dict[str, Tensor]) -> dict[str, Any]:
        var = self._window.var()
        taus = []
        for name in self.names:
            live = var[name] > 0
            taus.append((lrv[name][live] / var[name][live]).flatten().double().cpu())
        tau = torch.cat(taus) if taus else torch.zeros(0, dtype=torch.float64)
        short = float((self.batch_steps < self.min_ratio * tau).double().mean()) if len(tau) else 1.0
        median = float(np.median(tau.numpy())) if len(tau) else float("nan")
        return dict(batch_steps=self.batch_steps, batches=self.batches, dof=self.batches - 1, steps=self._window.steps,
                    tau_median=median, batch_over_tau_median=self.batch_steps / median if len(tau) else float("nan"),
                    frac_short=short, ok=bool(len(tau)) and short <= 0.1 and self.batches >= self.min_batches)

    def se(self) -> dict[str, Tensor]:
        if self._se is None:
            raise NotFittedError("batch-means is not fitted: after training call fit(FitContext(batch_size=..., n=...))")
        return self._identified({k: v.clone() for k, v in self._se.items()})

    def estimate(self) -> dict[str, Tensor]:
        """The window mean (averaged SGD)."""
        return self._window.mean()

    @property
    def centre(self) -> str:
        return "window mean"

    def diagnostics(self) -> dict[str, Any]:
        if self._diag:
            self.se()
            return {**self._diag, "unidentified": self._unidentified}
        return dict(batch_steps=self.batch_steps, batches=self.batches, steps=self._window.steps)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return dict(window=self._window.state_dict(), batch_steps=self.batch_steps, batches=self.batches,
                    in_batch=self._in_batch, sum=[t.clone() for t in self._sum],
                    anchor=[t.clone() for t in self._anchor],
                    bmean=[t.clone() for t in self._bmean], bm2=[t.clone() for t in self._bm2])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batch_steps"] != self.batch_steps:
            raise ValueError(f"state_dict was saved with batch_steps={state['batch_steps']}, this estimator has "
                             f"batch_steps={self.batch_steps}")
        if "anchor" not in state:
            raise ValueError("state_dict has no anchor: it was saved by an older mustat, whose batch sums were "
                             "not anchored; start a new window instead of resuming this one")
        self._window.load_state_dict(state["window"])
        ref = self._window._current()
        self._sum, self._anchor, self._bmean, self._bm2 = (
            [t.to(device=r.device, dtype=_accumulator(r.dtype)).clone() for t, r in zip(state[k], ref)]
            for k in ("sum", "anchor", "bmean", "bm2"))
        self.batches, self._in_batch = int(state["batches"]), int(state["in_batch"])
        self._se = None


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float32 sums for float32 and narrower weights (bf16, half), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.device == y.device and x.dtype == y.dtype
                                    for x, y in zip(a, b))
