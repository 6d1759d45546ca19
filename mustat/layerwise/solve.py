"""One layer's one-shot problem: scores, masks and the compensating update from calibration inputs.

A layer ``y = W x`` (``W``: rows x d) with calibration inputs ``x_1..x_n`` is pruned by
least-squares reconstruction of its outputs. With ``H = sum_t x_t x_t^T`` (the Gram matrix,
:class:`Gram`) the error of changing row ``i`` by ``dw`` is ``dw^T H dw``. Every method here is
a score on that problem; lower is pruned first.

- ``magnitude``: ``|w_ij|``.
- ``wanda`` (Sun et al. 2024): ``|w_ij| * ||X_j||_2 = |w_ij| sqrt(H_jj)``, the conditional
  statistic (others held fixed).
- ``sparsegpt`` (Frantar & Alistarh 2023): Optimal Brain Surgeon's ``w_ij^2 / [H_d^-1]_jj``, the
  error left after the other weights of the row are refitted; with the update, the masks are
  chosen block by block from the updated weights, as the paper does.
- ``mu``: the Wald statistic of ``w_ij = 0`` in the layer's regression, ``z^2 = w_ij^2 /
  (sigma_i^2 [H_d^-1]_jj)``, where ``sigma_i^2 = w_i^T H w_i / n`` is the row's mean squared output.
  Within a row it ranks as ``sparsegpt`` does; across rows and layers ``z^2 / n`` is the fraction of
  the row's output energy that removing the weight costs (after the refit), which is invariant to
  rescaling a row: the scale-invariance M&U claims, and the reason to compare its ``layer`` and
  ``global`` scopes. With ``sigma="layer"`` one variance (the mean over rows) serves the whole
  layer (isotropic noise): within a layer it ranks as ``sparsegpt``, and ``z^2 / n`` compares
  layers by the share of their output energy.
- ``mu`` with ``sigma="loss"``: the variance of row ``i`` is ``1 / B_ii``, ``B`` the output factor
  of the model's own loss (K-FAC; :func:`mustat.statistics.output_fisher`): ``z^2 = B_ii w_ij^2 /
  [H_d^-1]_jj`` is the Wald statistic of the loss's Kronecker-factored Fisher ``B (x) H`` with
  ``B``'s cross-row terms dropped, twice the loss increase OBS predicts for removing the weight
  after the row's refit. Rows and, with the ``global`` scope, layers compete in loss units.
- ``mu-sandwich``: the same with the heteroscedastic variance ``sigma_i^2 [H_d^-1 M H_d^-1]_jj``,
  ``M = sum_t v_t x_t x_t^T``, where token ``t``'s noise factor ``v_t = ||W x_t||^2 / mean_t
  ||W x_t||^2`` (the layer's own output energy, shared across rows; ``v_t = 1`` gives ``mu``).

``H_d = H + damping * mean(diag H) * I`` (SparseGPT's 1% by default) keeps the inverse finite
for inputs that are always zero or collinear.

The update (OBS, in SparseGPT's column order): columns are processed left to right; each pruned
weight is set to zero and its error ``w / U_jj`` is pushed to the not-yet-processed columns of
its row through the upper Cholesky factor ``U`` of ``H_d^-1`` (row ``j`` of ``U`` is the first row
of the inverse of ``H_d`` restricted to columns ``j..d``, scaled), in lazy blocks of columns.
Weights already processed are frozen, so it is a greedy approximation of the row's constrained
least-squares refit, not its optimum.

The refit (``refit=True``, any method): after the mask is chosen, each row's least-squares problem
on its kept weights is solved, ``min ||(w' - w) X||^2 + ridge`` over ``w'`` zero off the mask (the
same damped ``H_d``), by conjugate gradients, one recursion per row run together (:func:`mustat.obs.kept_cg`),
preconditioned by ``H_d^-1`` and started from the sweep's weights, to a relative residual of
``refit_tol`` (1e-2 by default). This is ALPS's second stage (Meng et al. 2024) and the exact
solution the sweep approximates: on all-MiniLM-L6-v2 it lowered SparseGPT's mean layer error from
0.053 to 0.035 at 70% and from 0.028 to 0.017 at 2:4 (``docs/oneshot/high_sparsity.md``).

The swaps (``swaps=k``, any method; :func:`swap_refine`): after the mask is chosen and before the
refit, each row's mask is improved by exact 1-swaps (SparseSwaps, Zimmer et al. 2025): prune one
kept weight and unprune one pruned, alive weight of the same row (of the same N:M group), the pair
that lowers the row's error ``delta^T H_d delta`` (``delta = w - w'``) most, evaluated in closed
form for every allowed pair from ``c = H_d delta``, until no pair lowers it or ``k`` swaps are made.
With the refit, the swaps start from the refitted weights, and the refit runs again after them.
Every row keeps its count and every group its N, so the row, layer, global and N:M budgets are
unchanged. The unpruned weight takes its least-squares value given the rest of the row when the
weights are updated (the update or the refit), its original value otherwise (the mask-only
objective SparseSwaps refines). A local search: the result is a mask no single swap improves,
not the row's best mask. The swaps compare weights of one row only, so a row weight (``mu``'s
``1 / sigma_i^2``, ``B_ii``) does not change them. One pass costs ``rows x kept x d`` float64
operations (N:M: ``rows x d x M``), each row making one swap, and a row takes tens of passes at
high sparsity: on GPT-2-char (width 128, one thread) the rows stopped after 6-42 swaps on average
(at most 70), and a layer took 2x SparseGPT's time at 2:4 and 3-17x at 70%
(``docs/oneshot/high_sparsity.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mustat.obs import inverse_cholesky, kept_cg
from mustat.patterns import Pattern, nm_keep
from mustat.statistics import Gram, damped

UNSTRUCTURED = Pattern()
METHODS = ("magnitude", "wanda", "sparsegpt", "mu", "mu-sandwich")
SCOPES = ("row", "layer", "global")
SIGMAS = ("row", "layer", "loss")


def noise_variance(W: Tensor, gram: Gram, sigma: str, fisher: Tensor | None = None) -> Tensor:
    """``sigma^2`` per row: each row's mean squared output ``w_i^T H w_i / n`` (``"row"``), or
    their mean, one variance shared by the layer's outputs (``"layer"``), or ``1 / B_ii`` from the
    model's loss (``"loss"``: ``fisher`` is ``B``'s diagonal, :func:`mustat.statistics.output_fisher`;
    a row the loss does not depend on has an infinite variance, and its weights go first)."""
    if sigma == "loss":
        if fisher is None:
            raise ValueError("sigma='loss' needs the loss's output factor (oneshot(..., loss=...))")
        B = fisher.to(device=W.device, dtype=torch.float64)
        return torch.where(B > 0, 1 / B.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(B, float("inf")))
    W = W.double()
    s2 = torch.einsum("ij,jk,ik->i", W, gram.H, W) / max(gram.n, 1)
    return s2.mean().expand_as(s2) if sigma == "layer" else s2


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den`` is 0 (a row with no output says nothing: pruned first)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def scores(method: str, W: Tensor, gram: Gram | None, damping: float, sigma: str = "row",
           fisher: Tensor | None = None) -> Tensor:
    """The method's score for every weight of ``W`` (rows x d), computed in float64 (a statistic:
    the sandwich's ``H^-1 M H^-1`` loses the ranking in float32); lower is pruned first.
    ``sigma``: the noise scale of ``mu`` and ``mu-sandwich`` (:func:`noise_variance`)."""
    W = W.double()
    if method == "magnitude":
        return W.abs()
    if method == "wanda":
        return W.abs() * gram.diag.clamp_min(0).sqrt()[None, :]
    Hinv, _ = inverse_cholesky(damped(gram.H, damping))
    if method == "sparsegpt":
        return W.pow(2) / Hinv.diagonal()[None, :]
    sigma2 = noise_variance(W, gram, sigma, fisher)
    if method == "mu":
        var = Hinv.diagonal()
    elif method == "mu-sandwich":
        var = torch.einsum("ij,jk,ki->i", Hinv, gram.meat(), Hinv)
    else:
        raise ValueError(f"method={method!r} is not valid; choose one of: {', '.join(METHODS)}")
    return _ratio(W.pow(2), sigma2[:, None] * var[None, :])


def cut(s: Tensor, alive: Tensor, sparsity: float, scope: str, pattern: Pattern,
        count: int | Tensor | None = None) -> Tensor:
    """Keep-mask: the lowest scores pruned, per row, per matrix (``layer``) or per N:M group.
    Weights already pruned stay pruned and count towards the target. ``count``: the number to
    have pruned, dead weights included, per row (``row``: an int or one per row) or in all
    (``layer``) instead of ``round(sparsity * n)``."""
    if pattern.structured:
        return nm_keep(s, pattern, alive)
    s = s.masked_fill(~alive, float("-inf"))
    if scope == "row":
        k = round(sparsity * s.shape[1]) if count is None else count
        dead = (~alive).sum(1)
        if isinstance(k, int) and not bool(dead.gt(k).any()):
            return ~_lowest(s, k)
        order = torch.sort(s, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
        return rank >= torch.maximum(dead, torch.as_tensor(k, device=dead.device))[:, None]
    k = max(round(sparsity * s.numel()) if count is None else int(count), int((~alive).sum()))
    return ~_lowest(s.flatten(), k).view(s.shape)


def _lowest(s: Tensor, k: int) -> Tensor:
    """The ``k`` lowest entries of each row of ``s`` (of ``s`` if 1-d), ties taken in index order:
    the first ``k`` of a stable sort, found by selection (``kthvalue``: linear time, 8x a sort of
    SparseGPT's column block)."""
    n = s.shape[-1]
    if k <= 0:
        return torch.zeros_like(s, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(s, dtype=torch.bool)
    if bool(torch.isnan(s).any()):              # NaN's rank under selection is not a sort's: sort
        order = torch.sort(s, dim=-1, stable=True).indices[..., :k]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)
    t = torch.kthvalue(s, k, dim=-1, keepdim=True).values
    low = s < t
    need = k - low.sum(-1, keepdim=True)
    tied = s == t
    if s.dim() == 1:                        # one long vector (a global cut): no int64 running count of it
        low[tied.nonzero().squeeze(1)[: int(need)]] = True
        return low
    return low | (tied & (tied.cumsum(-1) <= need))


def block_targets(alive: Tensor, sparsity: float, scope: str) -> Callable[[int, int], int | Tensor]:
    """``count(i1, i2)``: how many of columns ``i1:i2`` an adaptive sweep has pruned once it has
    passed them, dead weights included, per row (``row``) or over the rows (``layer``).

    The weights still to cut, ``round(sparsity * n)`` less those already dead (never fewer than
    0: nothing is revived), are spread over the blocks in proportion to their live weights, with
    cumulative rounding so the blocks add up to the target exactly. A layer that arrives partly
    pruned therefore ends at ``max(sparsity, its own)``, not at its share plus its dead weights.
    """
    per_row = scope == "row"

    def cumulative(t: Tensor) -> Tensor:   # counts before column c, c = 0..d (per row, or over the rows)
        t = t.double() if per_row else t.double().sum(0)
        return torch.cat([torch.zeros_like(t[..., :1]), t.cumsum(-1)], -1)

    cum, dead_cum = cumulative(alive), cumulative(~alive)
    n = alive.shape[1] if per_row else alive.numel()
    total = cum[..., -1]
    extra = (round(sparsity * n) - (n - total)).clamp_min(0)
    rate = torch.where(total > 0, extra / total.clamp_min(1), torch.zeros_like(total))

    def count(i1: int, i2: int) -> int | Tensor:
        new = torch.round(rate * cum[..., i2]) - torch.round(rate * cum[..., i1])
        c = (new + dead_cum[..., i2] - dead_cum[..., i1]).long()
        return c if per_row else int(c)

    return count


def obs_sweep(W: Tensor, U: Tensor, keep: Tensor | None, *, alive: Tensor, block_size: int,
              sparsity: float = 0.0, scope: str = "row", pattern: Pattern = UNSTRUCTURED,
              row_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SparseGPT's column sweep (see the module notes). With ``keep`` given the mask is fixed;
    with ``keep=None`` it is chosen from the running weights by ``w^2 / (row_scale_i U_jj^2)``
    (SparseGPT: ``row_scale = 1``; ``mu``: ``sigma_i^2``): per block of columns (``scope``
    ``row``: each row's share, ``layer``: the block's share) or per N:M group."""
    W = W.clone()
    rows, d = W.shape
    adaptive = keep is None
    keep = torch.ones_like(W, dtype=torch.bool) if adaptive else keep.clone()
    diag = U.diagonal()
    scale = torch.ones(rows, dtype=W.dtype, device=W.device) if row_scale is None else row_scale
    target = block_targets(alive, sparsity, scope) if adaptive and not pattern.structured else None

    def saliency(w: Tensor, cols: slice) -> Tensor:
        return _ratio(w.pow(2), scale[:, None] * diag[None, cols].pow(2))

    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        if adaptive and not pattern.structured:
            keep[:, i1:i2] = cut(saliency(W1, slice(i1, i2)), alive[:, i1:i2], sparsity, scope, pattern,
                                 target(i1, i2))
        for i in range(i2 - i1):
            if adaptive and pattern.structured and i % pattern.m == 0:
                g = slice(i1 + i, i1 + i + pattern.m)
                keep[:, g] = nm_keep(saliency(W1[:, i:i + pattern.m], g), pattern, alive[:, g])
            e = W1[:, i].masked_fill(keep[:, i1 + i], 0).div_(U1[i, i])
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1)   # in place: no temporary per column
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return W * keep, keep


def refit(W0: Tensor, W: Tensor, keep: Tensor, alive: Tensor, Hd: Tensor, Hinv: Tensor, *, tol: float,
          max_iter: int = 500) -> Tensor:
    """The exact least-squares refit of every row on its kept weights (module notes): the minimum of
    ``sum_i (w'_i - w0_i)^T H_d (w'_i - w0_i)`` with ``w'`` zero where ``keep`` is off, started from
    ``W``; in ``W``'s precision."""
    H, P = Hd.to(W.dtype), Hinv.to(W.dtype)
    out, _, _ = kept_cg(lambda V: V @ H, lambda R: R @ P, W0, keep, alive & ~keep, tol=tol, max_iter=max_iter,
                        start=W, rows=True)
    return out * keep


UNPRUNE = ("optimal", "original")


def _swap_pairs(w0: Tensor, w: Tensor, C: Tensor, keep: Tensor, free: Tensor, H: Tensor, hd: Tensor,
                pattern: Pattern, unprune: str) -> tuple[Tensor, Tensor, Tensor]:
    """The exact change of each row's error for every allowed 1-swap of rows ``w`` (float64), as
    ``(delta, j, i)``: ``delta[r, k]`` for pruning ``j[r, k]`` and unpruning ``i[r, k]``,
    ``+inf`` where the pair is not allowed (:func:`swap_refine`'s notes). Unstructured, a row's
    pairs are its kept entries (gathered, padded) times all its entries, the pruned-and-alive
    ones allowed; N:M, every pair of each group of M."""
    rows, d = w.shape
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    pen = torch.where(free, 0.0, inf)                 # a pair whose i is not free is never taken
    if pattern.structured:                            # (rows, G, M: j, M: i)
        m, G = pattern.m, d // pattern.m
        cols = torch.arange(d, device=w.device).view(G, m)
        j = cols[None, :, :, None].expand(rows, G, m, m)
        i = cols[None, :, None, :].expand(rows, G, m, m)
        X = H.reshape(G, m, G, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)[None].expand(rows, G, m, m)
        shape_j, shape_i = (rows, G, m, 1), (rows, G, 1, m)
        a, cj, hj = w.view(shape_j), C.view(shape_j), hd.view(1, G, m, 1)
        okj = keep.view(shape_j)
        X = X * a
    else:                                             # (rows, kept j, every i)
        nk = int(keep.sum(1).max())
        jk = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :nk]
        j = jk[:, :, None].expand(rows, nk, d)
        i = torch.arange(d, device=w.device).expand(rows, nk, d)
        shape_j, shape_i = (rows, nk, 1), (rows, 1, d)
        a, cj, hj = w.gather(1, jk)[..., None], C.gather(1, jk)[..., None], hd[jk][..., None]
        okj = keep.gather(1, jk)[..., None]
        X = H[jk].mul_(a)
    A = torch.where(okj, 2 * a * cj + a * a * hj, inf)   # pruning j alone
    ci, hi, pen = C.view(shape_i), hd.view(shape_i[1:]), pen.view(shape_i)
    X = X.add_(ci)                                    # c'_i = c_i + a H_ij: c_i once w_j is cut
    if unprune == "optimal":                          # A - c'_i^2 / H_ii
        X = X.square_().mul_(-1 / hi)
    else:                                             # A + t^2 H_ii - 2 t c'_i, t = w0_i
        t = w0.view(shape_i)
        X = X.mul_(-2 * t).add_(t * t * hi)
    return X.add_(A).add_(pen).reshape(rows, -1), j.reshape(rows, -1), i.reshape(rows, -1)


def swap_deltas(W0: Tensor, W: Tensor, keep: Tensor, alive: Tensor, Hd: Tensor, *,
                pattern: Pattern = UNSTRUCTURED, unprune: str = "optimal") -> Tensor:
    """Every allowed 1-swap's exact change of its row's error, as a dense ``(rows, d, d)`` float64
    tensor: ``[r, j, i]`` for pruning the kept ``j`` and unpruning the pruned ``i`` of row ``r``
    (:func:`swap_refine`'s notes), ``+inf`` where the swap is not allowed. For inspection and
    tests: it holds ``rows * d^2`` numbers."""
    H = Hd.to(torch.float64)
    w0, w = W0.to(torch.float64), W.to(torch.float64)
    delta, j, i = _swap_pairs(w0, w, (w0 - w) @ H, keep, alive & ~keep, H, H.diagonal(), pattern, unprune)
    rows, d = w.shape
    out = torch.full((rows, d * d), float("inf"), dtype=torch.float64, device=w.device)
    valid = torch.isfinite(delta)                     # padded rows of the kept side repeat a pair: skip them
    r = torch.arange(rows, device=w.device)[:, None].expand_as(j)
    out[r[valid], (j * d + i)[valid]] = delta[valid]
    return out.view(rows, d, d)


def swap_refine(W0: Tensor, W: Tensor, keep: Tensor, alive: Tensor, Hd: Tensor, *, max_swaps: int,
                pattern: Pattern = UNSTRUCTURED, unprune: str = "optimal", rtol: float = 1e-9,
                chunk: int = 2**18) -> tuple[Tensor, Tensor, Tensor]:
    r"""Refine a mask by exact 1-swaps: a local improvement of each row's reconstruction error.

    Each row ``r``'s error against the original weights is :math:`E_r = \delta^\top H_d \delta`,
    :math:`\delta = w_0 - w'` (the objective of :func:`solve` and :func:`refit`). A 1-swap prunes a
    kept weight ``j`` and unprunes a pruned, alive weight ``i`` of the same row (of the same group
    of M under an N:M pattern), so every row keeps its count and every group its N: the row,
    layer, global and N:M budgets are untouched. With :math:`c = H_d \delta` and
    :math:`a = w'_j`, pruning ``j`` adds ``a`` to :math:`\delta_j`, and unpruning ``i`` at value
    ``t`` subtracts ``t`` from :math:`\delta_i = w_{0,i}`:

    .. math::

        \Delta_{ji}(t) = 2 a c_j + a^2 H_{jj} - 2 t c'_i + t^2 H_{ii},
        \qquad c'_i = c_i + a H_{ij}.

    ``unprune="optimal"`` sets ``i`` to its exact 1-D optimum given the rest,
    :math:`t = c'_i / H_{ii}`, so :math:`\Delta = 2 a c_j + a^2 H_{jj} - c'^2_i / H_{ii}`;
    ``"original"`` restores :math:`t = w_{0,i}` (SparseSwaps' mask-only move, Zimmer et al. 2025:
    the kept weights stay the original ones when no update was applied). The other kept weights
    are held: this is a local search, not the row's optimum over masks.

    Every allowed swap of a row is evaluated exactly and the best applied while it lowers the
    row's error by more than ``rtol`` of it; :math:`c` then gets the rank-2 update
    :math:`a H_{j\cdot} - t H_{i\cdot}`. Rows are independent and batched (at most ``chunk``
    candidate pairs at a time); a row stops at ``max_swaps`` swaps or at a 1-swap local optimum.
    All of it runs in float64 (the gain is a difference of terms that can be far larger than the
    row's error); the weights come back in ``W``'s dtype.

    Parameters
    ----------
    W0
        The original weights, rows x d (dead entries zero).
    W
        The current weights, zero where ``keep`` is off.
    keep, alive
        Bool masks like ``W``: the current support, and the entries that may be unpruned
        (``alive=False`` stays pruned).
    Hd
        The damped Gram matrix, d x d (:func:`mustat.statistics.damped`); its diagonal is positive.
    max_swaps
        The most swaps per row (each pass makes at most one per row).
    pattern
        An N:M :class:`~mustat.patterns.Pattern` restricts swaps to each group of M.
    unprune
        ``"optimal"`` or ``"original"``: the value an unpruned weight takes (above).
    rtol, chunk
        The relative gain a swap must make; the candidate pairs evaluated at once.

    Returns
    -------
    (weights, keep-mask, swaps made per row)
    """
    if unprune not in UNPRUNE:
        raise ValueError(f"unprune={unprune!r} is not valid; choose one of: {', '.join(UNPRUNE)}")
    H = Hd.to(torch.float64)
    hd = H.diagonal()
    w0, w = W0.to(torch.float64), W.to(torch.float64).clone()
    keep = keep.clone()
    C = (w0 - w) @ H
    rows, d = w.shape
    if rows == 0 or max_swaps <= 0:
        return W, keep, torch.zeros(rows, dtype=torch.long, device=w.device)
    made = torch.zeros(rows, dtype=torch.long, device=w.device)
    active = torch.arange(rows, device=w.device)
    for _ in range(max_swaps):
        per_row = d * (pattern.m if pattern.structured else int(keep[active].sum(1).max()))
        moved = []
        for r in active.split(max(chunk // max(per_row, 1), 1)):
            delta, j, i = _swap_pairs(w0[r], w[r], C[r], keep[r], alive[r] & ~keep[r], H, hd, pattern, unprune)
            if delta.shape[1] == 0:
                continue
            best, k = delta.min(1)
            err = ((w0[r] - w[r]) * C[r]).sum(1)
            ok = best < -rtol * err
            if not bool(ok.any()):
                continue
            r, k = r[ok], k[ok, None]
            j, i = j[ok].gather(1, k)[:, 0], i[ok].gather(1, k)[:, 0]
            a = w[r, j]
            t = (C[r, i] + a * H[i, j]) / hd[i] if unprune == "optimal" else w0[r, i]
            C[r] += a[:, None] * H[j] - t[:, None] * H[i]
            w[r, j], w[r, i] = 0.0, t
            keep[r, j], keep[r, i] = False, True
            made[r] += 1
            moved.append(r)
        if not moved:
            break
        active = torch.cat(moved)
    return w.to(W.dtype), keep, made


def solve(W: Tensor, gram: Gram | None, *, method: str, sparsity: float, scope: str, pattern: Pattern,
          update: bool, damping: float, block_size: int, alive: Tensor, sigma: str = "row",
          refit_tol: float | None = None, fisher: Tensor | None = None, swaps: int = 0) -> tuple[Tensor, Tensor]:
    """Prune one matrix: ``(new weights, keep-mask)``. With the update, ``sparsegpt`` and ``mu``
    choose the mask during the sweep from the updated weights (the paper's adaptive selection); the
    other methods fix it from their scores first. ``swaps``: then refine the mask by up to that
    many exact 1-swaps per row (:func:`swap_refine`; the unpruned weight takes its 1-D optimum, or
    its original value when neither the update nor the refit changes the weights); ``0``: none.
    ``refit_tol``: after the mask is chosen, refit the kept weights exactly (:func:`refit`) to that
    relative residual; ``None``: no refit. With both, the refit runs before the swaps too, so they
    start from the support's least-squares weights (on GPT-2-char at 70%, perplexity 3.65 against
    3.70 with the swaps from the sweep's weights, and in two thirds of the time), and after them.

    Precision: the statistics and the scores are float64; the OBS sweep (its factor ``U`` and the
    running weights) runs in ``W``'s precision, float32 for a float32 (or half-precision) model,
    as SparseGPT's reference does (a float64 factorisation cost 1.2-1.6x the reference's time per
    layer, ``benchmarks/oneshot_reference.py``), and float64 for a float64 model; the swaps are
    evaluated in float64."""
    W = W.to(torch.float64 if W.dtype == torch.float64 else torch.float32) * alive
    if not update and refit_tol is None and not swaps:
        keep = cut(scores(method, W, gram, damping, sigma, fisher), alive, sparsity, scope, pattern)
        return W * keep, keep
    Hd = damped(gram.H, damping)
    Hinv = None
    if not update:
        keep = cut(scores(method, W, gram, damping, sigma, fisher), alive, sparsity, scope, pattern)
        W_new = W * keep
    else:
        Hinv, U = inverse_cholesky(Hd.to(W.dtype))
        if method in ("sparsegpt", "mu"):
            scale = noise_variance(W, gram, sigma, fisher) if method == "mu" else None
            W_new, keep = obs_sweep(W, U, None, alive=alive, block_size=block_size, sparsity=sparsity, scope=scope,
                                    pattern=pattern, row_scale=scale)
        else:
            keep = cut(scores(method, W, gram, damping, sigma, fisher), alive, sparsity, scope, pattern)
            W_new, keep = obs_sweep(W, U, keep, alive=alive, block_size=block_size)
    if refit_tol is not None and Hinv is None:
        Hinv, _ = inverse_cholesky(Hd.to(W.dtype))
    if swaps:
        if refit_tol is not None:          # swap around the support's least-squares weights, not the sweep's
            W_new = refit(W, W_new, keep, alive, Hd, Hinv, tol=refit_tol)
        unprune = "optimal" if update or refit_tol is not None else "original"
        W_new, keep, _ = swap_refine(W, W_new, keep, alive, Hd, max_swaps=swaps, pattern=pattern, unprune=unprune)
    if refit_tol is not None:
        W_new = refit(W, W_new, keep, alive, Hd, Hinv, tol=refit_tol)
    return W_new, keep
