r"""Marginal second-order standard errors: the diagonal of the *inverse* penalised curvature.

Statistics. With :math:`\ell(\theta) = \sum_i \ell_i(\theta)` the summed loss, :math:`G` its
generalized Gauss-Newton matrix (the expected Fisher information for softmax cross-entropy,
the Bernoulli and Gaussian likelihoods) and weight decay :math:`\lambda` on the mean loss, the
penalised curvature is :math:`H = G + n\lambda I`. The marginal Wald statistic of weight
:math:`q` is

.. math:: z_q = |w_q| / \sqrt{[H^{-1}]_{qq}},

the test of :math:`w_q = 0` with every other weight re-fitted. Its square over two is Optimal
Brain Surgeon's saliency :math:`w_q^2 / (2 [H^{-1}]_{qq})`, the rise of the quadratic model of
the loss when :math:`w_q` is removed and the others compensate (Hassibi & Stork 1993). The
*conditional* statistic :math:`|w_q| \sqrt{H_{qq}}` (``curvature``, Optimal Brain Damage)
holds the others fixed and is larger by :math:`\sqrt{\mathrm{VIF}_q}`. Magnitude pruning is the
limit :math:`H \to n\lambda I`, and a weight the data say nothing about has
:math:`se = 1/\sqrt{n\lambda}`, so it is pruned first.

``kind="observed"`` returns :math:`\sqrt{[H^{-1}]_{qq}}`: the ranking quantity (a
*saliency*; under a correct likelihood without penalty also the sampling SE).
``kind="sandwich"`` returns :math:`\sqrt{[H^{-1} J H^{-1}]_{qq}}` with
:math:`J = \sum_i \psi_i\psi_i^\top` from the per-sample penalised scores
:math:`\psi_i = \nabla\ell_i + \lambda\theta`: the *sampling* SE of the penalised estimate,
robust to misspecification (HC0), for reporting. Both are computed in the same block
structure: the whole model (``fisher``), blocks of each tensor from per-sample gradients
(``block``, ``woodfisher``) or Kronecker factors per layer (``kfac``; ``ekfac`` with corrected
eigenvalues).

``damping`` :math:`\delta` is stated in the units of the penalty: the curvature used is
:math:`G + n(\lambda + \delta) I`, so ``damping=1e-4`` acts like 1e-4 more weight decay.
Pruned (masked) entries are fixed at 0: they are left out of every block and get SE 0.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import grad

from mustat._checks import check_option, check_scalar
from mustat._functional import FunctionalModel, eval_mode, vmap_or_loop
from mustat.batching import batches
from mustat.cost import Cost
from mustat.obs import cholesky, kept_solve
from mustat.statistics import Damping
from mustat.uncertainty.base import (
    CurvatureEstimator,
    FitContext,
    Loss,
    NotFittedError,
    announce,
)

KINDS = ("observed", "sandwich")
_GiB = 1 << 30


def per_sample_gradients(fm: FunctionalModel, names: list[str], loss: Loss, xb: Tensor, yb: Tensor
                         ) -> dict[str, Tensor]:
    """Per-sample gradients of ``loss`` (a batch mean, so one sample's loss) with respect to the
    effective tensors ``names``: ``{name: (m, *shape)}``; masked entries get 0."""
    values = fm.params(names)

    def one(v, x, t):
        return loss(fm(v, x[None]), t[None])

    return vmap_or_loop(grad(one), in_dims=(None, 0, 0))(values, xb, yb)


def cast_inputs(xb: Tensor, dtype: torch.dtype) -> Tensor:
    """A batch's inputs on the CPU, where the marginal estimators compute, floating ones in ``dtype``."""
    return xb.to("cpu", dtype) if xb.is_floating_point() else xb.to("cpu")


class Marginal(CurvatureEstimator):
    """Base of the marginal estimators (module notes): ``fit`` builds the penalised curvature in
    the subclass's block structure, then returns :math:`\\sqrt{[H^{-1}]_{qq}}` (``kind="observed"``,
    a saliency) or :math:`\\sqrt{[H^{-1}JH^{-1}]_{qq}}` (``kind="sandwich"``, a sampling SE).

    Subclasses implement :meth:`_memory` (bytes, checked against ``max_memory`` before any
    allocation; or :meth:`cost`, which also estimates the time), :meth:`_build`,
    :meth:`_inverse_diagonal` (``{name: variance}`` over the tracked tensors), :meth:`_kept_solve` (the compensating update, :meth:`obs_update`) and, when
    ``sandwich`` is true, ``_solve(psi)``: ``H^-1`` applied to a chunk of per-sample vectors
    ``{name: (m, *shape)}`` of :meth:`_block_names`."""

    needs = ("data", "loss")
    cheaper: ClassVar[str] = "curvature"
    sandwich: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, kind: str = "observed", damping: float = 0.0,
                 params: Iterable[str] | None = None, max_memory: int = 4 * _GiB, progress: bool | None = None):
        super().__init__(model, params=params)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None (auto: when the fit is estimated to be long), "
                            f"got {progress!r}")
        self.progress = progress
        self._show = False
        self.kind = check_option(kind, "kind", KINDS if type(self).sandwich else ("observed",))
        self.damping = float(check_scalar(damping, "damping", kind=Real, low=0.0))
        self.max_memory = int(check_scalar(max_memory, "max_memory", kind=Integral, low=1))
        self._penalty = 0.0
        self._d = 0.0
        self._fm: FunctionalModel | None = None

    @property
    def quantity(self) -> str:
        return "saliency" if self.kind == "observed" else "sampling"

    # ------------------------------------------------------------------ structure hooks
    @abc.abstractmethod
    def _memory(self, context: FitContext) -> int: ...

    @abc.abstractmethod
    def _build(self, context: FitContext) -> None: ...

    @abc.abstractmethod
    def _inverse_diagonal(self) -> dict[str, Tensor]: ...

    def _block_names(self) -> list[str]:
        """The tensors inside the blocks (the sandwich needs their scores)."""
        return list(self.names)

    @abc.abstractmethod
    def _kept_solve(self, name: str, weight: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        """One tensor's weights after the compensating update (:meth:`obs_update`)."""

    # ------------------------------------------------------------------ fit and results
    def fit(self, context: FitContext) -> Marginal:
        context.need(self.name, *self.needs)
        self._se = self._estimate = self._fm = None      # a failed refit must not serve the last one
        self._penalty = context.penalty()
        # the ridge of every block: penalty and damping in weight-decay units on the mean loss, so n times
        # them on the summed curvature (absolute: the curvature's own units)
        self.ridge = Damping(context.n * (self._penalty + self.damping), "absolute")
        self._d = self.ridge.value
        cost = self.cost(context)
        if cost.bytes > self.max_memory:
            raise ValueError(
                f"estimator {self.name!r} needs about {cost.bytes / _GiB:.2f} GiB for its curvature on this model, "
                f"more than max_memory={self.max_memory / _GiB:.2f} GiB; {self._cheaper_hint()}")
        self._show = announce(self.name, cost, self.progress)
        # float64 on the CPU whatever the model's dtype and device: Kronecker factors and Woodbury
        # kernels lose several digits in float32, and the blocks are small next to the model
        self._fm = FunctionalModel(self._model, dtype=torch.float64, device="cpu")
        with eval_mode(self._model):
            self._build(context)
            var = self._inverse_diagonal() if self.kind == "observed" else self._sandwich(context)
        ref = self._current_weights()
        se = {}
        for n in self.names:
            v = var[n]
            mask = self._fm.mask(n)
            live = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.reshape(v.shape).cpu() != 0
            if bool((v[live] <= 0).any()) or not bool(torch.isfinite(v[live]).all()):
                raise ValueError(
                    f"estimator {self.name!r}: {int((~(v[live] > 0)).sum())} variances of {n!r} are not positive (the "
                    "inverse lost its digits to cancellation: the curvature is nearly singular); pass damping=delta > 0 "
                    "or use smaller blocks")
            v = torch.where(live, v.clamp_min(0).sqrt(), torch.zeros_like(v))
            se[n] = v.to(device=ref[n].device, dtype=ref[n].dtype)
        self._se, self._estimate = se, ref
        return self

    def cost(self, context: FitContext) -> Cost:
        """The fit's memory from :meth:`_memory` (time not estimated); subclasses that estimate
        it override this (``kfac``, ``ekfac``)."""
        return Cost(bytes=int(self._memory(context)))

    def _cheaper_hint(self) -> str:
        return f"use se={self.cheaper!r}, or raise max_memory"

    def _sandwich(self, context: FitContext) -> dict[str, Tensor]:
        names = self._block_names()
        fm = self._fm
        theta = fm.params(names)
        out = {n: torch.zeros_like(theta[n]) for n in names}
        chunk = max(1, (64 << 20) // (8 * max(1, sum(t.numel() for t in theta.values()))))
        for X, y in batches(context.source):
            for s in range(0, len(y), chunk):
                xb, yb = cast_inputs(X[s:s + chunk], torch.float64), y[s:s + chunk]
                g = per_sample_gradients(fm, names, context.loss, xb, yb)
                psi = {n: g[n] + self._penalty * theta[n] for n in names}
                for n, v in self._solve(psi).items():
                    out[n] += v.square().sum(0)
        return out

    def diagnostics(self) -> dict[str, Any]:
        return dict(kind=self.kind, quantity=self.quantity, weight_decay=self._penalty, damping=self.damping)

    # ------------------------------------------------------------------ OBS update
    def check_update(self, model: nn.Module | None = None) -> None:
        """Raise before anything is changed when :meth:`obs_update` cannot run: not fitted (or
        already used), fitted on another model, a sandwich SE (the update needs ``H``), blocks
        too large, or weights changed since :meth:`fit`."""
        if self._estimate is None or self._fm is None:
            raise NotFittedError(f"{self.name}: the compensating update needs fit() first, at the weights being "
                                 "pruned (each update needs a fresh fit: the curvature moves)")
        if model is not None and model is not self._model:
            raise ValueError(f"update= was fitted on another model than the one being pruned ({self.name})")
        if self.kind != "observed":
            raise ValueError(f"the compensating update needs the curvature H: {self.name} has kind={self.kind!r}; "
                             "use kind='observed'")
        for n, e in zip(self.names, self._entries):
            now = e.effective().detach().cpu()
            mask = e.mask()
            fitted = self._estimate[n].detach().cpu()
            if mask is not None:              # entries masked since fit are 0 now, and that is the prune
                fitted = fitted * (mask.cpu().reshape(fitted.shape) != 0)
            if not torch.equal(now, fitted):
                raise RuntimeError(f"{self.name}: {n!r} changed since fit(); refit the estimator at the weights "
                                   "being pruned")
        self._check_blocks()

    def _check_blocks(self) -> None:  # noqa: B027  (structures with a size limit override it)
        pass

    def obs_update(self) -> dict[str, float]:
        r"""Optimal Brain Surgeon's compensating update after a prune: every weight pruned since
        :meth:`fit` is set to 0 and the weights still kept in its block move to the minimum of
        the quadratic model, :math:`\Delta_K = H_{KK}^{-1} H_{KQ} w_Q` (``K`` kept, ``Q`` newly
        pruned, ``H`` this estimator's block of the penalised curvature). Masks are respected:
        weights pruned before :meth:`fit` stay out. Changes the model's weights in place and
        returns each tensor's relative change ``|Delta| / |w|``; the estimator must be refitted
        before another update or another ``se()`` (the curvature has moved)."""
        self.check_update()
        new_values = {}
        for n, e in zip(self.names, self._entries):
            before = self._fm.mask(n)
            before = torch.ones(self._estimate[n].shape, dtype=torch.bool) if before is None else before.cpu() != 0
            now = e.mask()
            now = torch.ones_like(before) if now is None else now.cpu().reshape(before.shape) != 0
            cut = before & ~now
            w = self._estimate[n].detach().to("cpu", torch.float64).reshape(before.shape)
            new_values[n] = (w, now, None if not bool(cut.any()) else self._kept_solve(n, w, now, cut))
        changes = {}
        for (n, (w, now, new)), e in zip(new_values.items(), self._entries):
            if new is None:
                changes[n] = 0.0
                continue
            leaf, _ = e.source()
            with torch.no_grad():
                leaf.copy_(torch.where(now, new, torch.zeros_like(new)).to(leaf.dtype).reshape(leaf.shape))
            changes[n] = float((new - w)[now].norm() / w.norm().clamp_min(1e-300))
        self._se = self._estimate = self._fm = None
        return changes


class LowRankBlocks:
    r"""Contiguous blocks of one tensor's entries with curvature
    :math:`H_b = c\, U_b^\top U_b + \mathrm{diag}(D_b)` from ``m`` gradient rows ``U``
    (``(m, P)``, float64) and a positive diagonal ``D`` (the penalty :math:`n(\lambda+\delta)`):
    the WoodFisher structure (Singh & Alistarh 2020). A block no larger than ``m`` is formed and
    Cholesky-factored directly; a larger one is inverted by Woodbury,
    :math:`H_b^{-1} = D^{-1} - c\,D^{-1} U_b^\top (I_m + c\, U_b D^{-1} U_b^\top)^{-1} U_b D^{-1}`
    (which needs :math:`D > 0`: ``m`` rows span at most ``m`` directions)."""

    def __init__(self, U: Tensor, c: float, D: Tensor | float, block_size: int | None):
        P = U.shape[1]
        self.U, self.c = U, float(c)
        self.D = torch.as_tensor(D, dtype=U.dtype).expand(P).clone() if not isinstance(D, Tensor) or D.dim() == 0 \
            else D.to(U.dtype)
        self.bs = P if block_size is None else max(1, min(int(block_size), P))
        self.direct = self.bs <= U.shape[0]
        if not self.direct and bool((self.D <= 0).any()):
            raise ValueError(
                f"blocks of {self.bs} weights from {U.shape[0]} gradients are singular without a penalty: train with "
                "weight decay, pass damping=delta > 0, or use smaller blocks (block_size <= samples)")

    def _slices(self):
        """``(start, stop, count)`` runs of equal-size blocks, about 64 MB of work each."""
        P, m, bs = self.U.shape[1], self.U.shape[0], self.bs
        per = bs * bs if self.direct else m * m + m * bs
        step = max(1, (64 << 20) // (8 * per))
        full = P // bs
        for b0 in range(0, full, step):
            b1 = min(full, b0 + step)
            yield b0 * bs, b1 * bs, b1 - b0
        if P % bs:
            yield full * bs, P, 1

    def check_update(self) -> None:
        if self.bs > 4096:
            raise ValueError(f"the compensating update forms each block's {self.bs} x {self.bs} curvature; use "
                             "block_size <= 4096")

    def _factor(self, start: int, stop: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
        Ub = self.U[:, start:stop].reshape(len(self.U), count, -1).transpose(0, 1)   # (count, m, bs)
        Db = self.D[start:stop].reshape(count, -1)                                   # (count, bs)
        if self.direct:
            H = self.c * Ub.transpose(1, 2) @ Ub + torch.diag_embed(Db)
            return Ub, Db, cholesky(H, "a curvature block", ridge=float(self.D.min()))
        K = torch.eye(Ub.shape[1], dtype=Ub.dtype) + self.c * (Ub / Db[:, None]) @ Ub.transpose(1, 2)
        return Ub, Db, cholesky(K, "a Woodbury kernel", ridge=1.0)

    def inverse_diagonal(self) -> Tensor:
        out = []
        for start, stop, count in self._slices():
            Ub, Db, L = self._factor(start, stop, count)
            if self.direct:
                out.append(torch.cholesky_inverse(L).diagonal(dim1=1, dim2=2).reshape(-1))
            else:
                W = torch.linalg.solve_triangular(L, Ub, upper=False)
                out.append((1 / Db - self.c * W.square().sum(1) / Db**2).reshape(-1))
        return torch.cat(out)

    def solve(self, V: Tensor) -> Tensor:
        """``H^-1 v`` for the rows ``v`` of ``V`` (``(k, P)``)."""
        out = torch.empty_like(V)
        for start, stop, count in self._slices():
            Ub, Db, L = self._factor(start, stop, count)
            Vb = V[:, start:stop].reshape(len(V), count, -1).transpose(0, 1)           # (count, k, bs)
            if self.direct:
                sol = torch.cholesky_solve(Vb.transpose(1, 2), L).transpose(1, 2)
            else:
                Y = Vb / Db[:, None]
                inner = torch.cholesky_solve(Ub @ Y.transpose(1, 2), L)               # (count, m, k)
                sol = Y - self.c * (Ub.transpose(1, 2) @ inner).transpose(1, 2) / Db[:, None]
            out[:, start:stop] = sol.transpose(0, 1).reshape(len(V), -1)
        return out

    def kept_solve(self, w: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        """The compensating update of :func:`kept_solve`, block by block."""
        out = w.clone()
        P = self.U.shape[1]
        for start in range(0, P, self.bs):
            sl = slice(start, min(P, start + self.bs))
            if not bool(cut[sl].any()):
                continue
            Ub = self.U[:, sl]
            H = self.c * Ub.T @ Ub + torch.diag(self.D[sl])
            out[sl] = kept_solve(H, w[sl], keep[sl], cut[sl], ridge=float(self.D.min()))
        return out


def check_block_size(block_size) -> int | str | None:
    """``None`` (a block per tensor), ``"row"`` (a block per output row: ``weight[o]``) or a positive int."""
    if block_size is None or block_size == "row":
        return block_size
    if isinstance(block_size, str):
        check_option(block_size, "block_size", ("row",))
    return int(check_scalar(block_size, "block_size", kind=Integral, low=1))


def tensor_blocks(U: Tensor, keep: Tensor | None, shape: torch.Size, c: float, d: float,
                  block_size: int | str | None) -> tuple[LowRankBlocks, Tensor]:
    """The blocks of one tensor from gradient rows ``U`` (``(m, numel)``) and its keep-mask, and
    the flat indices they cover. Contiguous blocks run over the unpruned entries only; row blocks
    (``"row"``) cover every entry of each output row, a pruned one decoupled (zero gradient, a unit
    diagonal: its SE is 0 anyway), so the blocks stay aligned with the rows."""
    numel = U.shape[1]
    keep = torch.ones(numel, dtype=torch.bool) if keep is None else keep.reshape(-1).cpu() != 0
    if block_size == "row":
        # a buffer can hold gradients recorded before the mask: pruned columns are zeroed to decouple them
        D = torch.full((numel,), float(d), dtype=U.dtype) + (~keep).to(U.dtype)
        return LowRankBlocks(U * keep.to(U.dtype), c, D, numel // shape[0]), torch.arange(numel)
    idx = torch.nonzero(keep).flatten()
    return LowRankBlocks(U[:, idx], c, d, block_size), idx

