"""Mask refinement by exact 1-swaps (``mustat.layerwise.solve.swap_refine``) against numpy."""

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from mustat.layerwise import oneshot
from mustat.layerwise import solve as S
from mustat.patterns import Pattern, parse_pattern

UNPRUNE = ("optimal", "original")
PATTERNS = ("unstructured", "2:4", "2:8")


def _problem(seed=0, d=8, rows=5, n=60):
    """Correlated inputs (the cross term ``H_ij`` matters) and a damped Gram with a positive diagonal."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) @ (0.5 * np.ones((d, d)) + np.eye(d)) * rng.uniform(0.3, 3.0, d)
    H = X.T @ X
    return rng, H + 0.01 * np.mean(np.diag(H)) * np.eye(d), rng.standard_normal((rows, d))


def _mask(rng, rows, d, nm, kept):
    """A random keep-mask: ``kept`` per row, or N of every group of M; and ``alive`` with a dead
    pruned entry in row 0."""
    keep = np.zeros((rows, d), bool)
    for r in range(rows):
        if nm.structured:
            for g in range(0, d, nm.m):
                keep[r, g + rng.permutation(nm.m)[:nm.n]] = True
        else:
            keep[r, rng.permutation(d)[:kept[r]]] = True
    alive = np.ones((rows, d), bool)
    alive[0, np.flatnonzero(~keep[0])[0]] = False
    return keep, alive


def _err(w0, w, H):
    return (w0 - w) @ H @ (w0 - w)


def _moved(w0, w, H, j, i, unprune):
    """Row ``w`` after pruning ``j`` and unpruning ``i``, computed directly."""
    w = w.copy()
    w[j] = w[i] = 0.0
    # "optimal": the argmin over t of the error with w_i = t and the rest held
    w[i] = H[i] @ (w0 - w) / H[i, i] if unprune == "optimal" else w0[i]
    return w


def _allowed(keep, alive, nm, j, i):
    return keep[j] and not keep[i] and alive[i] and (not nm.structured or j // nm.m == i // nm.m)


def _refine(W0, W, keep, alive, H, nm, unprune, max_swaps=1000):
    t = [torch.from_numpy(x) for x in (W0, W, keep, alive, H)]
    w, k, made = S.swap_refine(*t, max_swaps=max_swaps, pattern=nm, unprune=unprune)
    return w.numpy(), k.numpy(), made.numpy()


@pytest.mark.parametrize("unprune", UNPRUNE)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_swaps_closed_form_change_equals_the_direct_recomputation(pattern, unprune):
    nm = parse_pattern(pattern)
    rng, H, W0 = _problem(seed=1)
    rows, d = W0.shape
    keep, alive = _mask(rng, rows, d, nm, kept=[2, 3, 4, 5, 6])
    W = np.where(keep, W0 + 0.3 * rng.standard_normal(W0.shape), 0.0)   # an updated support
    got = S.swap_deltas(*[torch.from_numpy(x) for x in (W0, W, keep, alive, H)], pattern=nm, unprune=unprune).numpy()
    checked = 0
    for r, j, i in itertools.product(range(rows), range(d), range(d)):
        if not _allowed(keep[r], alive[r], nm, j, i):
            assert got[r, j, i] == np.inf, (r, j, i)
            continue
        direct = _err(W0[r], _moved(W0[r], W[r], H, j, i, unprune), H) - _err(W0[r], W[r], H)
        np.testing.assert_allclose(got[r, j, i], direct, rtol=1e-10, atol=1e-10 * _err(W0[r], 0 * W0[r], H))
        checked += 1
    assert checked > rows


@pytest.mark.parametrize("unprune", UNPRUNE)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_row_error_never_rises_and_the_structure_is_kept(pattern, unprune):
    nm = parse_pattern(pattern)
    for seed in range(4):
        rng, H, W0 = _problem(seed=seed, d=16, rows=6)
        keep, alive = _mask(rng, 6, 16, nm, kept=[2, 5, 8, 8, 11, 14])   # uneven rows: a layer-scope mask
        W = np.where(keep, W0, 0.0)
        w, k, made = _refine(W0, W, keep, alive, H, nm, unprune)
        before = np.array([_err(W0[r], W[r], H) for r in range(6)])
        after = np.array([_err(W0[r], w[r], H) for r in range(6)])
        assert np.all(after <= before * (1 + 1e-12))
        assert np.all(after[made > 0] < before[made > 0])
        np.testing.assert_array_equal(k.sum(1), keep.sum(1))            # each row's count (hence every budget)
        if nm.structured:
            np.testing.assert_array_equal(k.reshape(6, -1, nm.m).sum(2), nm.n)
        assert not np.any(k & ~alive)                                    # the dead stay pruned
        assert np.all(w[~k] == 0)
        if unprune == "original":                                        # mask only: kept weights are the originals
            np.testing.assert_array_equal(w[k], W0[k])


def test_a_swap_that_helps_is_made():
    """Diagonal curvature, the large weights pruned and the small kept: the swaps restore the
    large ones, strictly lowering the error, and stop there."""
    H = np.diag([1.0, 2.0, 1.0, 2.0])
    W0 = np.array([[3.0, 0.1, -2.0, 0.2]])
    keep = np.array([[False, True, False, True]])
    for unprune in UNPRUNE:
        w, k, made = _refine(W0, np.where(keep, W0, 0), keep, np.ones_like(keep), H, Pattern(), unprune)
        np.testing.assert_array_equal(k, [[True, False, True, False]])
        assert made[0] == 2 and _err(W0[0], w[0], H) == pytest.approx(0.1**2 * 2 + 0.2**2 * 2, rel=1e-12)


@pytest.mark.parametrize("unprune", UNPRUNE)
@pytest.mark.parametrize("pattern", ("unstructured", "2:4"))
def test_the_result_is_a_one_swap_local_optimum(pattern, unprune):
    """d = 8 at 50% or 2:4: every single swap of the result, recomputed by brute force, does not
    lower the row's error; and the refinement reaches an error no worse than its start."""
    nm = parse_pattern(pattern)
    rng, H, W0 = _problem(seed=5, d=8, rows=4)
    keep, alive = _mask(rng, 4, 8, nm, kept=[4, 4, 4, 4])
    alive[:] = True
    W = np.where(keep, W0, 0.0)
    w, k, _ = _refine(W0, W, keep, alive, H, nm, unprune)
    for r in range(4):
        e = _err(W0[r], w[r], H)
        assert e <= _err(W0[r], W[r], H) * (1 + 1e-12)
        for j, i in itertools.product(range(8), range(8)):
            if _allowed(k[r], alive[r], nm, j, i):
                assert _err(W0[r], _moved(W0[r], w[r], H, j, i, unprune), H) >= e * (1 - 1e-9), (r, j, i)
        if unprune == "original":   # the mask-only objective's global optimum bounds it from below
            best = min(_err(W0[r], W0[r] * np.isin(np.arange(8), c), H) for c in itertools.combinations(range(8), 4)
                       if not nm.structured or all(sum(x // 4 == g for x in c) == 2 for g in (0, 1)))
            assert e >= best * (1 - 1e-12)


def test_swaps_rows_and_chunks_agree():
    """Rows are independent: refining in chunks of one row gives the same as all at once."""
    rng, H, W0 = _problem(seed=2, d=16, rows=7)
    keep, alive = _mask(rng, 7, 16, Pattern(), kept=[6] * 7)
    t = [torch.from_numpy(x) for x in (W0, np.where(keep, W0, 0), keep, alive, H)]
    a = S.swap_refine(*t, max_swaps=50, unprune="optimal")
    b = S.swap_refine(*t, max_swaps=50, unprune="optimal", chunk=1)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=0, atol=1e-12)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).to(torch.float64)


@pytest.mark.parametrize("kw", [dict(method="sparsegpt", sparsity=0.5), dict(method="wanda", sparsity=0.6),
                                dict(method="mu", update=True, pattern="2:4"), dict(method="magnitude", sparsity=0.5)])
def test_oneshot_swaps_lower_the_first_layers_error_and_keep_the_sparsity(kw):
    """The first layer sees the same inputs either way: with swaps its (damped) reconstruction
    error is no higher, at the same sparsity; with the refit, no higher than the refit's alone
    (refit, swaps, refit: each step lowers it)."""
    X = torch.randn(200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H = X.T @ X
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    dense = _mlp()[0].weight.detach()
    errors, models = [], []
    refit = dict(refit=True, refit_tol=1e-10)
    for extra in (dict(), dict(swaps=50), refit, dict(swaps=50, **refit)):
        model = _mlp()
        report = oneshot(model, [X[:100], X[100:]], progress=False, **kw, **extra)
        D = model[0].weight.detach() - dense
        errors.append(float(((D @ Hd) * D).sum()))
        models.append((report, model))
    assert errors[1] <= errors[0] * (1 + 1e-9) and errors[3] <= errors[2] * (1 + 1e-9)
    assert errors[1] < errors[0]                        # on this problem some swap helps every method
    assert models[1][0].pruning.sparsity == pytest.approx(models[0][0].pruning.sparsity)
    if kw["method"] in ("wanda", "magnitude"):         # no update, no refit: the kept weights are the dense ones
        w = models[1][1][0].weight.detach()
        assert torch.equal(w[w != 0], dense[w != 0])


@pytest.mark.parametrize("swaps, error, match", [
    (-1, ValueError, r"swaps must be 0 \(no refinement\) or a positive number of 1-swaps per row, got -1"),
    (2.5, TypeError, r"swaps must be a whole number of 1-swaps per row \(0: none\), got 2.5"),
    (True, TypeError, "swaps must be a whole number"),
    ("10", TypeError, "swaps must be a whole number"),
])
def test_bad_swaps_are_refused_before_any_work(swaps, error, match):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        oneshot(model, [torch.randn(8, 12, dtype=torch.float64)], method="sparsegpt", sparsity=0.5, swaps=swaps)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_swaps_need_calibration():
    with pytest.raises(ValueError, match="calibration batches are required for method='magnitude' with swaps"):
        oneshot(_mlp(), None, method="magnitude", sparsity=0.5, swaps=5)


def test_unknown_unprune_is_refused():
    z = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unprune='best' is not valid; choose one of: optimal, original"):
        S.swap_refine(z, z, z.bool(), z.bool(), torch.eye(4, dtype=torch.float64), max_swaps=1, unprune="best")
