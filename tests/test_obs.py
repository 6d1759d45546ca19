"""The OBS kernel against a numpy constrained least squares."""

import numpy as np
import pytest
import torch

from mustat.obs import cholesky, kept_cg, kept_solve


def test_kept_solve_is_the_constrained_minimum_for_one_row_or_many():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 8))
    H = A.T @ A
    W = rng.standard_normal((3, 8))
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
    cut = np.array([0, 0, 1, 0, 1, 0, 0, 0], bool)          # entry 7 neither: held as it is
    free = np.flatnonzero(keep)
    expected = W.copy()
    for r in range(3):
        # minimise (w' - w)^T H (w' - w) over w'_K with w'_Q = 0 and w'_7 = w_7: the normal equations on K
        fixed = W[r].copy()
        fixed[cut] = 0
        fixed[free] = 0
        expected[r, free] = np.linalg.solve(H[np.ix_(free, free)], H[free] @ (W[r] - fixed))
    got = kept_solve(torch.from_numpy(H), torch.from_numpy(W), torch.from_numpy(keep), torch.from_numpy(cut))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    one = kept_solve(torch.from_numpy(H), torch.from_numpy(W[1]), torch.from_numpy(keep), torch.from_numpy(cut))
    np.testing.assert_allclose(one.numpy(), expected[1], rtol=1e-10, atol=1e-12)
    assert (got[:, cut] == torch.from_numpy(W[:, cut])).all()   # the caller zeroes the cut entries


def test_a_singular_block_is_refused_without_a_ridge():
    H = torch.zeros(3, 3, dtype=torch.float64)
    H[0, 0] = 1.0
    with pytest.raises(ValueError, match="not positive definite"):
        cholesky(H, "a block")


def test_kept_cg_is_the_constrained_minimum_of_an_operator():
    """The operator kernel on a curvature that couples every entry of a 3 x 5 matrix (as K-FAC's
    cross-row terms do), each row with its own support and one entry held, against numpy's
    solve of the flattened normal equations."""
    rng = np.random.default_rng(1)
    A = rng.standard_normal((60, 15))
    H = A.T @ A + 0.1 * np.eye(15)
    W = rng.standard_normal((3, 5))
    cut = rng.random((3, 5)) < 0.4
    keep = ~cut
    keep[1, 2] = cut[1, 2] = False                     # held as it is
    K, Q = np.flatnonzero(keep), np.flatnonzero(cut)
    expected = W.reshape(-1).copy()
    expected[K] += np.linalg.solve(H[np.ix_(K, K)], H[np.ix_(K, Q)] @ W.reshape(-1)[Q])
    Ht = torch.from_numpy(H)
    got, iters, residual = kept_cg(lambda V: (Ht @ V.reshape(-1)).reshape(V.shape), Ht.diagonal().reshape(3, 5),
                                   torch.from_numpy(W), torch.from_numpy(keep), torch.from_numpy(cut),
                                   tol=1e-13, max_iter=200)
    np.testing.assert_allclose(got.numpy().reshape(-1), expected, rtol=1e-9, atol=1e-11)
    assert residual <= 1e-13 and 1 <= iters <= len(K) + 5
    # too few iterations: the residual says so
    _, iters, residual = kept_cg(lambda V: (Ht @ V.reshape(-1)).reshape(V.shape), Ht.diagonal().reshape(3, 5),
                                 torch.from_numpy(W), torch.from_numpy(keep), torch.from_numpy(cut),
                                 tol=1e-13, max_iter=1)
    assert iters == 1 and residual > 1e-6


def test_kept_cg_by_rows_solves_each_row_on_its_support():
    """``rows=True`` (a Gram shared by the rows, ``V @ H``): each row's own recursion reaches numpy's
    solve of that row's kept block, each within its support's size of iterations (CG's finite
    termination), and in no more iterations than one recursion over the block-diagonal whole."""
    rng = np.random.default_rng(2)
    d = 12
    X = rng.standard_normal((40, d)) * np.geomspace(1, 30, d)      # scales spread: the rows' spectra differ
    H = X.T @ X + 0.01 * np.eye(d)
    W = rng.standard_normal((4, d))
    keep = rng.random((4, d)) < np.array([[0.2], [0.5], [0.8], [0.95]])
    cut = ~keep
    expected = W.copy()
    for i in range(4):
        K, Q = np.flatnonzero(keep[i]), np.flatnonzero(cut[i])
        expected[i, K] += np.linalg.solve(H[np.ix_(K, K)], H[np.ix_(K, Q)] @ W[i, Q])
    Ht = torch.from_numpy(H)
    args = (lambda V: V @ Ht, torch.from_numpy(np.tile(H.diagonal(), (4, 1))), torch.from_numpy(W),
            torch.from_numpy(keep), torch.from_numpy(cut))
    got, iters, residual = kept_cg(*args, tol=1e-12, max_iter=200, rows=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert residual <= 1e-12 and iters <= int(keep.sum(1).max()) + 3
    shared, shared_iters, _ = kept_cg(*args, tol=1e-12, max_iter=200)
    np.testing.assert_allclose(shared.numpy(), expected, rtol=1e-7, atol=1e-9)
    assert iters <= shared_iters
