r"""The ``woodfisher`` estimator: the ``block`` structure fed by the minibatch gradients that
training computes anyway, kept in a ring buffer during the tracking window, so the marginal SE
is estimated *during* training as the paper intends, at the cost of one copy per step.

Statistics. A minibatch gradient of ``B`` samples drawn with replacement has mean
:math:`\bar g` (the full-data gradient) and covariance :math:`\Sigma / B`, with
:math:`\Sigma` the per-sample gradient covariance. From the last ``m`` minibatch gradients
:math:`g_k`, with sample mean :math:`\bar g` and sample covariance :math:`S`, the per-sample
empirical Fisher is :math:`\Sigma + \bar g\bar g^\top \approx B S + \bar g \bar g^\top` (the
minibatch-size correction), and the curvature in each block is

.. math:: H_b = n\,(B S + \bar g \bar g^\top)_b + n(\lambda + \delta) I,

inverted by Woodbury from ``m + 1`` rows (:class:`~mustat.uncertainty.marginal.LowRankBlocks`).
Assumes the window's iterates are close enough that their gradients share one distribution
(a stationary end of training) and minibatches drawn with replacement (shuffled epochs make
:math:`S` smaller by the finite-population factor :math:`1 - B/n`).

``kind="sandwich"`` takes the meat from the same buffer: the per-sample penalised scores
:math:`\psi_i = g_i + \lambda\theta` have second moment :math:`\Sigma + r r^\top` with
:math:`r = \bar g + \lambda\theta` (zero at the penalised optimum), so
:math:`J \approx n(B S + r r^\top)` and the variance is :math:`[H^{-1} J H^{-1}]_{qq}` in the same
blocks, still without a data pass. Its bread is the empirical Fisher, as ``block-sandwich``'s is,
so it is not robust to misspecification the way a Hessian bread is: without penalty and damping
the meat equals the bread and the sandwich equals ``kind="observed"`` exactly; with the
penalty it is about :math:`(J + n\lambda)^{-1} J (J + n\lambda)^{-1}` (the bread has
:math:`\bar g\bar g^\top` where the meat has :math:`r r^\top`), the penalised estimate's smaller
sampling variance. :math:`r` mixes the window's mean gradient with the weights at the fit; the
error is about :math:`\lambda(\theta - \bar\theta)`."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn

from mustat._checks import check_scalar
from mustat.uncertainty.base import FitContext, NotFittedError, register_estimator
from mustat.uncertainty.marginal import Marginal, check_block_size, tensor_blocks


@register_estimator("woodfisher")
class WoodFisher(Marginal):
    """Block-diagonal marginal SEs from the last ``gradients`` minibatch gradients of training
    (module notes), blocks of ``block_size`` entries (``None``: one per tensor; ``"row"``: one
    per output row). ``fit`` needs
    ``FitContext(n=..., batch_size=...)`` and the penalty (``weight_decay=`` or the optimizer);
    no data pass, for either kind. The buffer is ``gradients x tracked weights`` float32, checked
    against ``max_memory`` when it is made."""

    trajectory = True
    needs = ("n", "batch_size")
    with_replacement = True
    l2_only = True
    variants = {"woodfisher-row": {"block_size": "row"}, "woodfisher-sandwich": {"kind": "sandwich"},
                "woodfisher-row-sandwich": {"kind": "sandwich", "block_size": "row"},
                "woodfisher-damped": {"damping": 1e-4}}

    def __init__(self, model: nn.Module, *, kind: str = "observed", damping: float = 0.0,
                 params: Iterable[str] | None = None, gradients: int = 64, block_size: int | str | None = 128,
                 max_memory: int = 4 << 30):
        super().__init__(model, kind=kind, damping=damping, params=params, max_memory=max_memory)
        self.gradients = int(check_scalar(gradients, "gradients", kind=Integral, low=2))
        self.block_size = check_block_size(block_size)
        for n, e in zip(self.names, self._entries):
            if e.leaf is None:
                raise ValueError(f"estimator 'woodfisher' reads each tensor's gradient, but {n!r} is computed by a "
                                 "parametrization mustat cannot see through; use se='block'")
        need = 4 * self.gradients * sum(e.leaf.numel() for e in self._entries)
        if need > self.max_memory:
            raise ValueError(f"estimator 'woodfisher' keeps {self.gradients} gradients of every tracked weight, about "
                             f"{need / (1 << 30):.2f} GiB, more than max_memory={self.max_memory / (1 << 30):.2f} GiB; "
                             "lower gradients=, or raise max_memory")
        self._buf = {n: torch.zeros(self.gradients, e.leaf.numel(), dtype=torch.float32, device=e.leaf.device)
                     for n, e in zip(self.names, self._entries)}
        self._count = 0

    def update(self) -> None:
        row = self._count % self.gradients
        with torch.no_grad():
            for n, e in zip(self.names, self._entries):
                g = e.leaf.grad
                if g is None:
                    self._buf[n][row].zero_()
                else:
                    self._buf[n][row].copy_(g.reshape(-1))
        self._count += 1

    def reset(self) -> None:
        self._count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": {n: b.clone() for n, b in self._buf.items()}, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, b in state["buffer"].items():
            self._buf[n].copy_(b)
        self._count = int(state["count"])

    def _memory(self, context: FitContext) -> int:
        m = min(self._count, self.gradients) + 1
        # the float64 rows; the sandwich adds its meat's rows and their solve
        copies = 3 if self.kind == "sandwich" else 1
        return 8 * copies * m * sum(b.shape[1] for b in self._buf.values()) + (64 << 20)

    def _build(self, context: FitContext) -> None:
        m = min(self._count, self.gradients)
        if m < 2:
            raise NotFittedError(f"woodfisher has {m} gradient(s); attach it to the optimizer and train for at least "
                                 "2 steps before fit()")
        B = context.batch_size
        self._blocks, self._free, self._meat = {}, {}, {}
        theta = self._fm.params(self.names) if self.kind == "sandwich" else {}
        for n in self.names:
            G = self._buf[n][:m].to("cpu", torch.float64)
            mean = G.mean(0)
            spread = (G - mean) * (B / (m - 1)) ** 0.5
            U = torch.cat([spread, mean[None]])
            shape = self._entries[self.names.index(n)].leaf.shape
            self._blocks[n], self._free[n] = tensor_blocks(U, self._fm.mask(n), shape, context.n, self._d,
                                                           self.block_size)
            if self.kind == "sandwich":   # its meat, n V^T V: the same spread and the mean *penalised* score
                self._meat[n] = torch.cat([spread, (mean + self._penalty * theta[n].reshape(-1))[None]])
        self._m = m

    def _sandwich(self, context: FitContext) -> dict[str, Tensor]:
        out = {}
        for n in self.names:
            V = self._meat[n]
            if self.block_size == "row":      # as tensor_blocks does for U: pruned columns decoupled
                mask = self._fm.mask(n)
                if mask is not None:
                    V = V * (mask.reshape(-1).cpu() != 0).to(V.dtype)
            sol = self._blocks[n].solve(V[:, self._free[n]])
            out[n] = self._scatter(n, context.n * sol.square().sum(0))
        return out

    def _scatter(self, name: str, flat: Tensor) -> Tensor:
        shape = self._buf[name].shape[1]
        full = flat.new_zeros(shape)
        full[self._free[name]] = flat
        return full.view(self._entries[self.names.index(name)].leaf.shape)

    def _inverse_diagonal(self) -> dict[str, Tensor]:
        return {n: self._scatter(n, self._blocks[n].inverse_diagonal()) for n in self.names}

    def _check_blocks(self) -> None:
        for blocks in self._blocks.values():
            blocks.check_update()

    def _kept_solve(self, name: str, weight: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        idx = self._free[name]
        flat = weight.reshape(-1).clone()
        flat[idx] = self._blocks[name].kept_solve(flat[idx], keep.reshape(-1)[idx], cut.reshape(-1)[idx])
        return flat.view_as(weight)

    def diagnostics(self) -> dict[str, Any]:
        return {**super().diagnostics(), "gradients": min(self._count, self.gradients), "block_size": self.block_size}
