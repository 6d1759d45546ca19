"""The ``fisher`` estimator: exact marginal standard errors ``sqrt([H^-1]_qq)`` from the whole
model's penalised Gauss-Newton matrix ``H = G + n (lambda + delta) I`` (or the sandwich), for
networks small enough to form it; the reference the scalable ``block`` and ``kfac`` are
checked against (:mod:`mustat.uncertainty.marginal`)."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral

import torch
from torch import Tensor, nn
from torch.func import jacrev

from mustat._checks import check_scalar
from mustat._functional import vmap_or_loop
from mustat._params import trainable_names
from mustat.batching import batches
from mustat.obs import cholesky, kept_solve
from mustat.uncertainty.base import FitContext, register_estimator
from mustat.uncertainty.curvature import output_factor
from mustat.uncertainty.marginal import Marginal, cast_inputs


@register_estimator("fisher")
class Fisher(Marginal):
    r"""Exact :math:`[H^{-1}]_{qq}` with :math:`H` the summed GGN (expected Fisher) of every
    trainable parameter plus the penalty: the marginal Wald test / OBS saliency. For a
    canonical-link GLM the GGN is the Hessian, so this equals ``wald`` (observed). The GGN is
    positive semi-definite wherever the model is, unlike the Hessian of a hidden-layer network
    away from its minimum. Every trainable tensor (biases too) enters ``H``; frozen ones are
    held fixed. ``max_params`` bounds the matrix (``P x P`` float64)."""

    cheaper = "kfac' or se='block"
    variants = {"fisher-sandwich": {"kind": "sandwich"}}

    def __init__(self, model: nn.Module, *, kind: str = "observed", damping: float = 0.0,
                 params: Iterable[str] | None = None, max_params: int = 5000, max_memory: int = 4 << 30):
        super().__init__(model, kind=kind, damping=damping, params=params, max_memory=max_memory)
        check_scalar(max_params, "max_params", kind=Integral, low=1)
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if total > max_params:
            raise ValueError(
                f"estimator 'fisher' forms the full {total} x {total} curvature of the model's trainable parameters, "
                f"more than max_params={max_params}; use se='kfac' or se='block' (any size) or raise max_params")
        self._all = trainable_names(model)

    def _memory(self, context: FitContext) -> int:
        P = sum(p.numel() for p in self._model.parameters() if p.requires_grad)
        return 8 * 5 * P * P + (64 << 20)     # G, H, its factor and inverse, the identity

    def _block_names(self) -> list[str]:
        return list(self._all)

    def _build(self, context: FitContext) -> None:
        fm = self._fm
        self._layout = layout = fm.layout(self._all)
        theta = layout.flatten(fm.params(self._all))
        P = layout.size()
        G = torch.zeros(P, P, dtype=torch.float64)
        first = next(batches(context.source))
        with torch.no_grad():
            shape = fm({}, cast_inputs(first[0][:1], torch.float64))[0].shape
        C = max(1, int(torch.Size(shape).numel()))
        factor_of = output_factor(context.loss, shape)

        def out(th, x):
            return fm(layout.unflatten(th), x[None]).reshape(-1)

        jac = vmap_or_loop(jacrev(out), in_dims=(None, 0))
        chunk = max(1, (64 << 20) // (8 * C * max(P, 1)))
        seen = 0
        for X, y in batches(context.source):
            for s in range(0, len(y), chunk):
                xb, yb = cast_inputs(X[s:s + chunk], torch.float64), y[s:s + chunk].cpu()
                with torch.no_grad():
                    outs = fm({}, xb).reshape(len(xb), C)
                L = factor_of(outs, yb)                       # (m, C, C): Lambda_i = L_i L_i^T
                V = torch.einsum("mck,mcp->mkp", L, jac(theta, xb)).reshape(-1, P)
                G += V.T @ V
                seen += len(yb)
        # the data may be a sample of the n training rows (FitContext(n=...)): G is scaled to n
        self._H = self.ridge.add_to(G * (context.n / seen))
        Lh = cholesky(self._H, "the penalised Gauss-Newton matrix", ridge=self._d)
        self._Hinv = torch.cholesky_inverse(Lh)

    def _inverse_diagonal(self) -> dict[str, Tensor]:
        full = self._layout.unflatten(self._Hinv.diagonal())
        return {n: full[self._fm.name(n)] for n in self.names}

    def _solve(self, psi: dict[str, Tensor]) -> dict[str, Tensor]:
        m = len(next(iter(psi.values())))
        flat = torch.cat([psi[n].reshape(m, -1)[:, i] for n, i in zip(self._layout.names, self._layout.free)], 1)
        sol = flat @ self._Hinv
        out, start = {}, 0
        for n, shape, idx in zip(self._layout.names, self._layout.shapes, self._layout.free):
            full = sol.new_zeros(m, shape.numel())
            full[:, idx] = sol[:, start:start + len(idx)]
            out[n] = full.view(m, *shape)
            start += len(idx)
        return out

    def _kept_solve(self, name: str, weight: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        # each tensor is updated on its own diagonal block of H: the tensors are pruned and
        # updated one after another, so a joint update would move a tensor twice
        lay = self._layout
        k = lay.names.index(self._fm.name(name))
        start = sum(len(i) for i in lay.free[:k])
        idx = lay.free[k]
        H = self._H[start:start + len(idx), start:start + len(idx)]
        flat = weight.reshape(-1)
        out = flat.clone()
        out[idx] = kept_solve(H, flat[idx], keep.reshape(-1)[idx], cut.reshape(-1)[idx], ridge=self._d)
        return out.view_as(weight)
