r"""Calibrated pseudo bootstrap: standard errors of the estimate from the
training trajectory, by the stationary theory of constant-rate SGD.

Derivation (per weight, diagonal approximation). Train on the *mean* loss
:math:`L = \frac1N \sum_i \ell_i` with minibatches of size :math:`S` drawn
*with replacement*; the minibatch gradient has variance :math:`c/S`, with
:math:`c` the per-sample gradient variance at the optimum and :math:`h` the
curvature. A preconditioned step :math:`\theta \leftarrow \theta - \eta_e\,p\,g`
has, near the optimum (Mandt, Hoffman & Blei 2017, to first order in
:math:`\eta_e h p`), the stationary iterate variance

.. math:: \Sigma = \frac{\eta_e\, p\, c}{2\, h\, S},

while the sampling variance of the estimate is :math:`v = c / (h^2 N)` (the
sandwich's diagonal). With :math:`m = E[g^2] \approx c/S`, tracked during the
same window, eliminating the unknown :math:`h = \eta_e p m / (2\Sigma)` gives

.. math:: \widehat{se}^2 = \frac{4\, S\, \Sigma^2}{N\, \eta_e^2\, p^2\, m}.

* SGD, heavy-ball momentum :math:`\beta`, dampening :math:`d`: :math:`p = 1`,
  :math:`\eta_e = \eta (1-d)/(1-\beta)` (slow directions see the geometric sum
  of the momentum buffer; Nesterov likewise).
* Adam: :math:`p = 1/(\sqrt{\hat v}+\epsilon)` from the optimizer's own
  bias-corrected second moment; :math:`\eta_e = \eta` (the first moment is an
  average with weights summing to one, not a heavy-ball sum). With
  :math:`\epsilon \to 0`, :math:`p^2 m \approx 1` and
  :math:`\widehat{se} = 2\sqrt{S}\,\Sigma / (\eta\sqrt N)`.
* Weight decay drops out: it adds to :math:`h` in both formulas, provided
  :math:`m` is the *centred* variance of the *data* gradient (``p.grad``,
  which excludes the decay PyTorch's optimizers add). At a penalised optimum
  the data gradient has mean :math:`-\lambda w`, so its uncentred second
  moment would overstate :math:`c/S` by :math:`\lambda^2 w^2`. The target is
  then the penalised sandwich's diagonal (see :func:`mustat.hessian_se` with
  ``weight_decay``). *Decoupled* decay (AdamW) shrinks outside the preconditioner, so
  the drift is :math:`\eta (p h + \lambda)` rather than :math:`\eta p (h + \lambda)` and the
  elimination above fails: it is refused.
* A summed (not mean) loss multiplies every gradient by :math:`S`: pass the
  effective learning rate :math:`\eta S` yourself or use a mean loss.

Assumptions: stationarity over the window (the implied autocorrelation time
:math:`\tau = 2\Sigma/(\eta_e^2 p^2 m)` steps must be well below the window),
with-replacement minibatches (with epoch-wise reshuffling the gradient noise of
an epoch sums to zero and the formula fails), a diagonal-dominant Hessian, and
:math:`\eta_e h p \ll 1`. A weight whose data gradient is identically zero does
not enter the likelihood: it is unidentified and gets ``se = inf`` (z = 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat.uncertainty.base import (
    Estimator,
    FitContext,
    NotFittedError,
    WindowWarning,
    decoupled_decay,
    register_estimator,
)
from mustat.uncertainty.pseudo import GAUGES, PseudoBootstrap


@dataclass(frozen=True)
class StationarityReport:
    """Effective sample size of the window per weight: ``steps / (2 tau)``."""

    n_eff_median: float
    frac_short: float  # fraction of live weights with n_eff < min_n_eff
    min_n_eff: float
    steps: int

    @property
    def ok(self) -> bool:
        """At most 10% of live weights under-sampled; False when no weight is live."""
        return self.frac_short <= 0.1 and self.n_eff_median == self.n_eff_median


def _group(optimizer: torch.optim.Optimizer, param) -> dict:
    for g in optimizer.param_groups:
        if any(q is param for q in g["params"]):
            return g
    raise ValueError("a tracked parameter is not optimised by this optimizer; pass the optimizer that trains the model")


def _components(tracker: PseudoBootstrap, optimizer: torch.optim.Optimizer):
    """Per tracked tensor: (var, m, eta_e, p) on the tensors' device."""
    if not tracker.grad_moment:
        raise ValueError("calibrated_se needs a tracker built with grad_moment=True")
    kind = type(optimizer).__name__
    if kind not in ("SGD", "Adam") or isinstance(optimizer, torch.optim.AdamW):
        raise ValueError(f"calibrated_se supports SGD and Adam, not {kind}")
    if decoupled_decay(optimizer):
        raise ValueError("calibrated_se needs weight decay as an L2 penalty; this optimizer's decay is decoupled "
                         "(AdamW, or Adam(decoupled_weight_decay=True)): its stationary variance is not the "
                         "module notes' formula. Use Adam(weight_decay=...) or SGD")
    var, g2 = tracker.var(), tracker.grad_var()
    out = {}
    for name, e in zip(tracker.names, tracker._entries):
        param = e.leaf
        group = _group(optimizer, param)
        lr = float(group["lr"])
        if kind == "SGD":
            beta, damp = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
            eta = lr * (1 - damp) / (1 - beta) if beta > 0 else lr
            p = torch.ones_like(var[name])
        else:
            state = optimizer.state.get(param, {})
            if "exp_avg_sq" not in state:
                raise ValueError(f"Adam has no state for {name!r} yet: train before calibrating")
            b2 = float(group["betas"][1])
            step = float(state["step"])
            vhat = (state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]) / (1 - b2**step)
            eta = lr
            p = 1.0 / (vhat.sqrt() + float(group["eps"]))
        out[name] = (var[name], g2[name], eta, p)
    return out


def calibrated_se(
    tracker: PseudoBootstrap,
    optimizer: torch.optim.Optimizer,
    *,
    n: int,
    batch_size: int,
    check: bool = True,
    min_n_eff: float = 10.0,
) -> dict[str, Tensor]:
    """Standard errors of the estimate from a pseudo-bootstrap window (see module notes).

    Parameters
    ----------
    tracker
        A :class:`PseudoBootstrap` with ``grad_moment=True`` that recorded the window
        (``every=1``: the gradient variance must see every step).
    optimizer
        The ``torch.optim.SGD`` / ``Adam`` that trained the model (its
        learning rate, momentum and, for Adam, its second-moment state are read).
    n
        Number of training samples ``N``.
    batch_size
        Minibatch size ``S`` (minibatches drawn with replacement, mean loss).
    check
        Warn when the window is too short for stationarity (:func:`stationarity`).
    min_n_eff
        Effective sample size below which a weight counts as under-sampled.

    Returns
    -------
    dict[str, Tensor]
        Standard errors keyed like ``tracker.std()``; usable as ``se`` in
        :func:`mustat.score` (criterion ``"mu"``) and :func:`mustat.wald`.
    """
    check_scalar(n, "n", kind=Integral, low=1)
    check_scalar(batch_size, "batch_size", kind=Integral, low=1)
    comps = _components(tracker, optimizer)
    out = {}
    for (name, (var, m, eta, p)), e in zip(comps.items(), tracker._entries):
        se = (2.0 * var / (eta * p)) * torch.sqrt(batch_size / (n * m))
        se = torch.where(m > 0, se, torch.full_like(se, float("inf")))  # no data gradient: unidentified
        se = torch.where(var > 0, se, torch.where(m > 0, torch.zeros_like(se), se))
        mask = e.mask()
        if mask is not None:  # a pruned weight is known exactly (it is 0), not unidentified
            se = torch.where(mask.to(se.device) != 0, se, torch.zeros_like(se))
        out[name] = se
    if check:
        rep = stationarity(tracker, optimizer, min_n_eff=min_n_eff, _comps=comps)
        if not rep.ok:
            warnings.warn(WindowWarning(
                f"the pseudo-bootstrap window ({rep.steps} steps) looks too short for stationarity: "
                f"{100 * rep.frac_short:.0f}% of weights have an effective sample size below {min_n_eff:g} "
                f"(median {rep.n_eff_median:.3g}); calibrated SEs of slow directions are unreliable. "
                "Track over more epochs or raise the learning rate",
                estimator="calibrated", diagnostics=asdict(rep)), stacklevel=2)
    return out


def stationarity(tracker: PseudoBootstrap, optimizer: torch.optim.Optimizer, *, min_n_eff: float = 10.0,
                 _comps=None) -> StationarityReport:
    """Effective sample size of the window, ``steps / (2 tau)`` with the implied
    autocorrelation time ``tau = 2 var / (eta_e^2 p^2 m)`` of each weight.

    Drift (a window that starts before convergence) inflates ``var`` and hence
    ``tau``, so a too-short or non-stationary window shows as a low effective size.
    With no live weight (every one pruned, frozen or without data gradient) the
    median is NaN and the report is not ``ok``.
    """
    comps = _comps or _components(tracker, optimizer)
    steps = tracker.steps
    n_eff = []
    for var, m, eta, p in comps.values():
        live = (var > 0) & (m > 0)
        tau = 2.0 * var[live] / (eta**2 * p[live] ** 2 * m[live])
        n_eff.append((steps / (2.0 * tau)).flatten().double().cpu())
    n_eff = torch.cat(n_eff) if n_eff else torch.zeros(0)
    if not len(n_eff):
        return StationarityReport(float("nan"), 1.0, min_n_eff, steps)
    return StationarityReport(float(n_eff.median()), float((n_eff < min_n_eff).double().mean()), min_n_eff, steps)


@register_estimator("calibrated")
class Calibrated(Estimator):
    """The pseudo bootstrap's window turned into a standard error by stationary-SGD
    theory (module notes): :func:`calibrated_se` on a tracker with the centred
    gradient variance, paired with the window mean.

    Needs minibatches drawn with replacement, a mean loss, SGD (with or without
    momentum) or Adam, and a window long enough for stationarity, which
    :meth:`fit` checks (a :class:`~mustat.uncertainty.WindowWarning` when not).
    ``fit`` needs ``FitContext(optimizer=..., batch_size=..., n=...)`` (``n`` or ``y``).

    ``gauge="balanced"`` is refused. The formula eliminates the curvature through the
    optimizer's own dynamics, in the coordinates the optimizer runs in. For a fixed rescaling
    ``a' = c a`` it would carry over (the window variance scales by ``c^2``, the gradient
    variance by ``1/c^2``, the preconditioner by ``c^2``), but the balancing scale changes at
    every step, so the balanced trajectory is not preconditioned SGD with any fixed
    preconditioner and the derivation has nothing to stand on. Use ``batch-means`` with
    ``gauge="balanced"``, whose argument holds for any smooth function of the iterates.
    """

    trajectory = True
    needs = ("optimizer", "batch_size", "n")
    optimizers = ("sgd", "adam")
    with_replacement = True
    l2_only = True
    min_window_steps = 2
    default = True

    def __init__(self, model: nn.Module, *, params: Iterable[str] | None = None, min_n_eff: float = 10.0,
                 check: bool = True, gauge: str = "none"):
        if check_option(gauge, "gauge", GAUGES) != "none":
            raise ValueError("calibrated does not support gauge='balanced': its stationary-SGD formula holds in the "
                             "optimizer's coordinates only (class notes); use batch-means or pseudo with "
                             "gauge='balanced'")
        super().__init__(model, params=params)
        self.min_n_eff = float(check_scalar(min_n_eff, "min_n_eff", kind=Real, low=0.0, closed="neither"))
        self.check = bool(check)
        self.tracker = PseudoBootstrap(model, params=self.names, grad_moment=True)
        self._se: dict[str, Tensor] | None = None
        self._report: StationarityReport | None = None

    def update(self) -> None:
        self.tracker.update()

    def reset(self) -> None:
        self.tracker.reset()
        self._se = None

    def new_epoch(self) -> None:
        self.tracker.new_epoch()

    def fit(self, context: FitContext) -> Calibrated:
        context.need(self.name, "optimizer", "batch_size", "n")
        comps = _components(self.tracker, context.optimizer)
        self._report = stationarity(self.tracker, context.optimizer, min_n_eff=self.min_n_eff, _comps=comps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WindowWarning)  # warned once below, from here
            self._se = calibrated_se(self.tracker, context.optimizer, n=context.n, batch_size=context.batch_size,
                                     check=False)
        if self.check and not self._report.ok:
            rep = self._report
            warnings.warn(WindowWarning(
                f"the calibrated window ({rep.steps} steps) looks too short for stationarity: "
                f"{100 * rep.frac_short:.0f}% of live weights have an effective sample size below "
                f"{self.min_n_eff:g} (median {rep.n_eff_median:.3g}); calibrated SEs of slow directions "
                "are unreliable. Track over more epochs or raise the learning rate",
                estimator=self.name, diagnostics=self.diagnostics()), stacklevel=2)
        return self

    def se(self) -> dict[str, Tensor]:
        if self._se is None:
            raise NotFittedError("calibrated is not fitted: after training call "
                                 "fit(FitContext(optimizer=..., batch_size=..., n=...))")
        return self._identified({k: v.clone() for k, v in self._se.items()})

    def estimate(self) -> dict[str, Tensor]:
        """The window mean (averaged SGD)."""
        return self.tracker.mean()

    @property
    def centre(self) -> str:
        return "window mean"

    def diagnostics(self) -> dict[str, Any]:
        out = dict(steps=self.tracker.steps)
        if self._se is not None:
            self.se()
            out["unidentified"] = self._unidentified
        if self._report is not None:
            out.update(n_eff_median=self._report.n_eff_median, frac_short=self._report.frac_short,
                       ok=self._report.ok)
        return out

    def state_dict(self) -> dict[str, Any]:
        return dict(tracker=self.tracker.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self._se = None
