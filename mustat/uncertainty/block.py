"""The ``block`` estimator: marginal standard errors from blocks of the empirical Fisher of
``m`` per-sample gradients, inverted by Woodbury (WoodFisher; Singh & Alistarh 2020), with the
training's penalty (:mod:`mustat.uncertainty.marginal`)."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral

import torch
from torch import Tensor, nn

from mustat._checks import check_scalar
from mustat.batching import batches
from mustat.uncertainty.base import FitContext, register_estimator
from mustat.uncertainty.marginal import (
    Marginal,
    cast_inputs,
    check_block_size,
    per_sample_gradients,
    tensor_blocks,
)


@register_estimator("block")
class Block(Marginal):
    r"""Block-diagonal marginal SEs: each tracked tensor's free entries are cut into contiguous
    blocks of ``block_size`` (``None``: one block per tensor; ``"row"``: one per output row,
    ``weight[o]``), and in each block

    .. math:: H_b = \frac{n}{m}\sum_{i=1}^m g_{i,b} g_{i,b}^\top + n(\lambda + \delta) I,

    the empirical Fisher of ``m`` per-sample data-loss gradients :math:`g_i` (``samples`` rows
    drawn without replacement, seeded by ``seed``; the first ``samples`` rows of a DataLoader),
    scaled to the ``n`` training samples, plus the penalty. The empirical Fisher equals the
    Fisher at the true parameters of a correct model; it is the curvature WoodFisher's published
    results use. Tensors outside ``params`` are held fixed (conditioned on), so only
    correlations inside a block are accounted for. ``kind="sandwich"`` applies the same blocks
    to the per-sample penalised scores of every training sample."""

    variants = {"block-sandwich": {"kind": "sandwich"}}

    def __init__(self, model: nn.Module, *, kind: str = "observed", damping: float = 0.0,
                 params: Iterable[str] | None = None, samples: int = 1024, block_size: int | str | None = 128,
                 seed: int = 0, max_memory: int = 4 << 30):
        super().__init__(model, kind=kind, damping=damping, params=params, max_memory=max_memory)
        self.samples = int(check_scalar(samples, "samples", kind=Integral, low=1))
        self.block_size = check_block_size(block_size)
        self.seed = int(check_scalar(seed, "seed", kind=Integral, low=0))
        self._blocks: dict = {}

    def _cheaper_hint(self) -> str:
        return "lower samples= (memory is samples x tracked weights x 8 bytes), use se='kfac', or raise max_memory"

    def _memory(self, context: FitContext) -> int:
        m = min(self.samples, context.n)
        P = sum(e.effective().numel() for e in self._entries)
        return 3 * 8 * m * P + (64 << 20)     # the gradient rows, their concatenation, the free columns

    def _rows(self, context: FitContext):
        """The ``m`` samples, as ``(inputs, targets)`` chunks."""
        if context.X is not None:
            n = len(context.y)
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:min(self.samples, n)]
            yield from batches((context.X[idx.to(context.X.device)], context.y[idx.to(context.y.device)].cpu()), 256)
            return
        left = self.samples
        for xb, yb in batches(context.source):
            if left <= 0:
                return
            yield xb[:left], yb[:left].cpu()
            left -= len(yb[:left])

    def _build(self, context: FitContext) -> None:
        fm = self._fm
        self._layout = layout = fm.layout(self.names)
        rows: dict[str, list[Tensor]] = {n: [] for n in layout.names}
        m = 0
        for xb, yb in self._rows(context):
            g = per_sample_gradients(fm, list(layout.names), context.loss, cast_inputs(xb, torch.float64), yb)
            for n in layout.names:
                rows[n].append(g[n].reshape(len(yb), -1))
            m += len(yb)
        self._blocks, self._idx = {}, {}
        for n, shape in zip(layout.names, layout.shapes):
            self._blocks[n], self._idx[n] = tensor_blocks(torch.cat(rows[n]), fm.mask(n), shape, context.n / m,
                                                          self._d, self.block_size)
        self._m = m

    def _scatter(self, name: str, flat: Tensor) -> Tensor:
        k = self._layout.names.index(name)
        shape, idx = self._layout.shapes[k], self._idx[name]
        full = flat.new_zeros(*flat.shape[:-1], shape.numel())
        full[..., idx] = flat
        return full.view(*flat.shape[:-1], *shape)

    def _inverse_diagonal(self) -> dict[str, Tensor]:
        return {n: self._scatter(self._fm.name(n), self._blocks[self._fm.name(n)].inverse_diagonal())
                for n in self.names}

    def _solve(self, psi: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n in self._layout.names:
            v = psi[n].reshape(len(psi[n]), -1)[:, self._idx[n]]
            out[n] = self._scatter(n, self._blocks[n].solve(v))
        return out

    def _check_blocks(self) -> None:
        for blocks in self._blocks.values():
            blocks.check_update()

    def _kept_solve(self, name: str, weight: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        n = self._fm.name(name)
        idx = self._idx[n]
        flat = weight.reshape(-1).clone()
        flat[idx] = self._blocks[n].kept_solve(flat[idx], keep.reshape(-1)[idx], cut.reshape(-1)[idx])
        return flat.view_as(weight)

    def diagnostics(self) -> dict:
        return {**super().diagnostics(), "samples": getattr(self, "_m", 0), "block_size": self.block_size}
