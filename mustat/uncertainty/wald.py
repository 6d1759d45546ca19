"""The ``wald`` estimator: exact Wald standard errors from the full (penalised)
Hessian, for networks small enough to form it (see :func:`hessian_se`)."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat.uncertainty.base import Estimator, FitContext, NotFittedError, register_estimator
from mustat.uncertainty.hessian import Kind, hessian_se


@register_estimator("wald")
class Wald(Estimator):
    """Inverse observed information (``kind="observed"``) or the sandwich
    ``H^-1 J H^-1`` (``kind="sandwich"``) at the current parameters, with the
    training's L2 penalty (:func:`hessian_se`). Every parameter (weights and
    biases) enters the covariance; the tracked weights' diagonal is returned.

    Assumes the model sits at a (penalised) minimum; a hidden-layer network
    without weight decay is not identified and its Hessian is singular (an
    error that offers ``damping``). ``max_params`` guards against forming a
    Hessian too large for memory: use ``curvature`` for big networks.
    ``fit`` needs ``FitContext(X=..., y=..., loss=...)`` (or ``data=``).
    """

    needs = ("data", "loss")

    def __init__(self, model: nn.Module, *, kind: str | Kind = "observed", damping: float = 0.0,
                 params: Iterable[str] | None = None, max_params: int = 5000):
        super().__init__(model, params=params)
        self.kind = check_option(kind, "kind", Kind)
        self.damping = float(check_scalar(damping, "damping", kind=Real, low=0.0))
        check_scalar(max_params, "max_params", kind=Integral, low=1)
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if total > max_params:
            raise ValueError(
                f"estimator 'wald' forms the full {total} x {total} Hessian of the model's {total} trainable parameters, "
                f"more than max_params={max_params}; use se='curvature' (diagonal, any size) or raise max_params"
            )
        self._se: dict[str, Tensor] | None = None
        self._estimate: dict[str, Tensor] | None = None

    def fit(self, context: FitContext) -> Wald:
        context.need(self.name, *self.needs)
        loss = context.loss

        def summed(out, target):
            return loss(out, target) * len(target)

        se = hessian_se(self._model, summed, context.source, kind=self.kind, damping=self.damping,
                        weight_decay=context.penalty())
        ref = self._current_weights()
        self._se = {n: se[n].to(device=ref[n].device, dtype=ref[n].dtype) for n in self.names}
        self._estimate = ref
        return self

    def se(self) -> dict[str, Tensor]:
        if self._se is None:
            raise NotFittedError("wald is not fitted: call fit(FitContext(X=..., y=..., loss=...)) after training")
        return {k: v.clone() for k, v in self._se.items()}

    @property
    def centre(self) -> str:
        return "weights where the Hessian is evaluated (fit to the optimum first)"

    def estimate(self) -> dict[str, Tensor]:
        """The weights at which the Hessian was evaluated."""
        if self._estimate is None:
            return self._current_weights()
        return {k: v.clone() for k, v in self._estimate.items()}

    @property
    def quantity(self) -> str:
        return "sampling" if self.kind is Kind.SANDWICH else "saliency"

    def diagnostics(self) -> dict[str, Any]:
        return dict(kind=self.kind.value, damping=self.damping)
