r"""The Optimal Brain Surgeon kernel: the compensating update of a quadratic model when entries are
removed, shared by every pruning path (marginal estimators, one-shot layers, structured refits).

Removing the entries ``Q`` of a weight vector ``w`` whose loss is locally
:math:`\tfrac12 (w' - w)^\top H (w' - w)`, with the entries ``K`` free and the rest held, the
constrained minimum moves the kept entries by :math:`\delta_K = H_{KK}^{-1} H_{KQ} w_Q` (OBS,
Hassibi & Stork 1993; for a layer's least-squares reconstruction ``H = X X^\top`` it is the exact
refit of the kept inputs, as in SparseGPT and the structured refit). Rows that share ``H`` (a
layer's output rows under reconstruction) are solved together.

The curvature comes as a dense matrix (:func:`kept_solve`, by Cholesky) or as an operator, its
product with a tensor of the weights' shape (:func:`kept_cg`, by preconditioned conjugate
gradients: K-FAC's whole-layer update, where the ``out*in`` system is never formed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def cholesky(H: Tensor, what: str, ridge: float = 0.0) -> Tensor:
    """Lower Cholesky factors of a batch of symmetric matrices; a clear error when one is not
    positive definite (no penalty, and the data leave a direction flat). ``ridge``: the smallest
    diagonal term known to be added (the penalty); with one, rounding-sized pivots are genuine."""
    H = 0.5 * (H + H.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(H)
    # an exactly singular matrix can factor with rounding-sized pivots: without a ridge they count as zero
    scale = H.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
    tiny = L.diagonal(dim1=-2, dim2=-1).square() <= H.shape[-1] * torch.finfo(H.dtype).eps * scale
    if bool((info > 0).any()) or (ridge <= 0 and bool(tiny.any())):
        raise ValueError(
            f"{what} is not positive definite: the data leave some directions without curvature and there is "
            "no weight decay to bound them. Pass damping=delta > 0 (curvature + n*delta*I, in weight-decay units), "
            "train with weight decay, or restrict params=[...]")
    return L


def kept_solve(H: Tensor, w: Tensor, keep: Tensor, cut: Tensor, ridge: float = 0.0) -> Tensor:
    """The compensating update: ``w`` with ``w_K + H_KK^-1 H_KQ w_Q`` on the kept entries ``K``
    (``Q``: the entries cut now); entries outside both are left as they are. ``w`` is one vector
    (``(d,)``) or rows sharing ``H`` and the index sets (``(rows, d)``); ``keep`` and ``cut`` are
    boolean vectors of length d."""
    K = torch.nonzero(keep).flatten()
    Q = torch.nonzero(cut).flatten()
    out = w.clone()
    if len(K) == 0 or len(Q) == 0:
        return out
    L = cholesky(H[K][:, K], "the kept weights' curvature block", ridge=ridge)
    rhs = H[K][:, Q] @ w[..., Q].reshape(-1, len(Q)).T                     # (k, rows)
    delta = torch.cholesky_solve(rhs, L).T.reshape(*w.shape[:-1], len(K))
    out[..., K] = w[..., K] + delta
    return out


def inverse_cholesky(Hd: Tensor) -> tuple[Tensor, Tensor]:
    """``(H_d^-1, U)`` with ``U`` upper triangular, ``U^T U = H_d^-1``: the factor SparseGPT's
    column sweep pushes each pruned weight's error through."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info):
        raise ValueError("the damped Gram matrix is not positive definite (rounding in a degenerate layer); "
                         "raise damping, e.g. damping=0.1")
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    return Hinv, U


def kept_cg(H: Callable[[Tensor], Tensor], diag: Tensor | Callable[[Tensor], Tensor], w: Tensor, keep: Tensor,
            cut: Tensor, *, tol: float, max_iter: int, start: Tensor | None = None,
            rows: bool = False) -> tuple[Tensor, int, float]:
    r"""The compensating update of :func:`kept_solve` for a curvature given as an operator:
    :math:`\delta_K = H_{KK}^{-1} H_{KQ} w_Q` by conjugate gradients on the kept entries with a
    Jacobi preconditioner, ``H`` symmetric positive definite on them.

    Parameters
    ----------
    H
        The product of the curvature with a tensor of ``w``'s shape (any shape: a layer's
        rows x inputs, say), returning that shape.
    diag
        The preconditioner: the curvature's diagonal in ``w``'s shape (Jacobi), or a function
        applying an approximate inverse to a residual of ``w``'s shape (symmetric positive
        definite; its output is restricted to the kept entries here).
    w, keep, cut
        The weights and the boolean masks of the entries kept free and cut now (entries in
        neither are held).
    tol, max_iter
        Stop when the residual is below ``tol`` times the right-hand side's norm, or after
        ``max_iter`` iterations.
    start
        Weights to start from (only their kept entries are read: a previous, approximate
        update, say); ``None`` starts from ``w``.
    rows
        ``H`` acts on each row of ``w`` on its own (a layer's rows sharing a Gram, ``V @ H``): run
        one conjugate-gradient recursion per row (its own step and direction), which is CG on each
        row's system; one shared recursion is CG on the block-diagonal whole, whose spectrum is
        the union of the rows' and converges at the pace of the worst row (SmolLM2's layers at
        70%: fewer iterations per row, ``benchmarks/refit_cg.py``). ``False``: one recursion, for
        operators that couple rows (K-FAC's ``G V A``).

    Returns
    -------
    (updated w, iterations, relative residual)
    """
    K = keep.to(w.dtype)
    rhs = K * H(w * cut)
    if callable(diag):
        def apply(r: Tensor) -> Tensor:
            return K * diag(r)
    else:
        precond = diag * K + (1 - K)

        def apply(r: Tensor) -> Tensor:
            return r / precond
    x = torch.zeros_like(w) if start is None else K * (start - w)
    r = rhs - K * H(x) if start is not None else rhs.clone()

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(-1, keepdim=True) if rows else (a * b).sum()

    def ratio(a: Tensor, b: Tensor) -> Tensor:        # a row already solved has p = r = 0: no step, not 0/0
        return a / torch.where(b == 0, 1.0, b)

    z = apply(r)
    p = z.clone()
    rz = dot(r, z)
    norm = float(rhs.norm())
    iters = 0
    while float(r.norm()) > tol * norm and iters < max_iter:
        Hp = K * H(p)
        step = ratio(rz, dot(p, Hp))
        x += step * p
        r -= step * Hp
        z = apply(r)
        rz, rz_old = dot(r, z), rz
        p = z + ratio(rz, rz_old) * p
        iters += 1
    residual = float(r.norm()) / max(norm, 1e-300)
    return torch.where(keep, w + x, w), iters, residual
