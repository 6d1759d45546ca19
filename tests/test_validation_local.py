"""The local estimand (validation.local): the truth's own sampling error, coverage scoring, the
population optimum of a basin against scipy, and the near-teacher starts."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from validation import local as L


def _teacher(d=3, h=3, seed=0):
    torch.manual_seed(seed)
    t = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 1)).double()
    with torch.no_grad():
        t[0].weight.mul_(2.0)
        t[2].weight.copy_(t[2].weight.sign())
    return t


def _mse(o, t):
    return 0.5 * (o.squeeze(-1) - t).square().mean()


def test_expected_coverage_is_the_normal_formula():
    assert L.expected_coverage(2000, 10**12) == pytest.approx(0.95, abs=1e-6)
    assert L.expected_coverage(100, 100) == pytest.approx(2 * stats.norm.cdf(1.959964 / math.sqrt(2)) - 1, abs=1e-6)
    # a Monte-Carlo check of the 20x design's 0.944
    rng = np.random.default_rng(0)
    est, truth = rng.standard_normal(400_000), rng.standard_normal(400_000) / math.sqrt(20)
    assert np.mean(np.abs(est - truth) <= 1.959964) == pytest.approx(L.expected_coverage(2000, 40_000), abs=2e-3)
    with pytest.raises(ValueError, match="n_pop"):
        L.expected_coverage(10, 0)


def test_score_counts_coverage_bias_and_missing_ses():
    rng = np.random.default_rng(1)
    R, q = 2000, 5
    se = np.exp(rng.standard_normal((R, q)))
    truth = rng.standard_normal(q)
    centre = truth + se * rng.standard_normal((R, q))
    row = L.score(centre, se, truth)
    assert row["intervals"] == R * q and abs(row["coverage"] - 0.95) < 0.01
    assert abs(row["z_sd"] - 1) < 0.03 and row["bias_se"] < 0.06 and row["no_se"] == 0
    # a centre one SE off: coverage drops to P(|Z + 1| < 1.96) = 0.83, the bias reads 1
    off = L.score(centre + se, se, truth)
    assert off["coverage"] == pytest.approx(stats.norm.cdf(0.96) - stats.norm.cdf(-2.96), abs=0.01)
    assert off["bias_se"] == pytest.approx(1.0, abs=0.06)
    # a missing SE is never covered and is counted
    se2 = se.copy()
    se2[:, 0] = np.nan
    miss = L.score(centre, se2, truth)
    assert miss["no_se"] == pytest.approx(0.2) and miss["coverage"] <= 0.8
    with pytest.raises(ValueError, match=r"centre and se must both be \(R, q\)"):
        L.score(centre[:, 0], se[:, 0], truth[0])


def _soft_np(theta, X, y, lam, d, h, beta):
    W1, b1, W2, b2 = theta[:h * d].reshape(h, d), theta[h * d:h * d + h], theta[h * d + h:h * d + 2 * h], theta[-1]
    a = X @ W1.T + b1
    z = np.logaddexp(0, beta * a) / beta
    r = z @ W2 + b2 - y
    s = 1 / (1 + np.exp(-beta * a))
    ga = (r[:, None] * W2[None, :]) * s / len(y)
    grad = np.r_[(ga.T @ X).ravel(), ga.sum(0), z.T @ r / len(y), r.mean()] + lam * theta
    return 0.5 * np.mean(r ** 2) + 0.5 * lam * theta @ theta, grad


def test_local_optima_are_scipys_minima_of_each_fresh_sample():
    from scipy.optimize import minimize

    teacher = _teacher()
    lam, beta, n_pop = 1e-2, 100.0, 3000
    theta_t = torch.cat([p.detach().flatten() for p in teacher.parameters()])
    starts = theta_t + 0.05 * torch.randn(2, len(theta_t), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta, info = L.local_optima(teacher, _mse, starts, weight_decay=lam, n_pop=n_pop, seed=10, betas=(beta,), group=1)
    assert theta.shape == (2, 16) and bool(info["minimum"].all()) and float(info["grad_max"].max()) < 1e-10
    for r in range(2):
        X, y = L.teacher_sample(teacher, n_pop, 10 + r)      # the sample the truth was fitted on
        res = minimize(_soft_np, starts[r].numpy(), args=(X.numpy(), y.numpy(), lam, 3, 3, beta), jac=True,
                       method="L-BFGS-B", options=dict(ftol=1e-15, gtol=1e-12, maxiter=10_000))
        np.testing.assert_allclose(theta[r].numpy(), res.x, atol=1e-5)
    # the ReLU path keeps Newton's own diagnostics
    relu, info2 = L.local_optima(teacher, _mse, starts[:1], weight_decay=lam, n_pop=500, seed=3, max_iter=20)
    assert set(info2) == {"grad_max", "min_eig", "minimum", "steps", "drift"} and relu.shape == (1, 16)
    with pytest.raises(ValueError, match=r"starts must have shape \(R, p=16\)"):
        L.local_optima(teacher, _mse, starts[:, :3], weight_decay=lam, n_pop=100, seed=0)
    with pytest.raises(ValueError, match="weight_decay"):
        L.local_optima(teacher, _mse, starts, weight_decay=0.0, n_pop=100, seed=0)


def test_teacher_sample_is_the_teachers_regression():
    teacher = _teacher()
    X, y = L.teacher_sample(teacher, 20_000, 4)
    with torch.no_grad():
        noise = y - teacher(X)[:, 0]
    assert X.dtype == torch.float64 and abs(float(noise.std()) - 1) < 0.02 and abs(float(noise.mean())) < 0.02
    X2, y2 = L.teacher_sample(teacher, 20_000, 4)
    assert torch.equal(X, X2) and torch.equal(y, y2)


def test_perturbed_teacher_is_seeded_and_small():
    teacher = _teacher()
    a, b, c = (L.perturbed_teacher(teacher, 0.05, s) for s in (1, 1, 2))
    fa, fb, fc, ft = (torch.cat([p.detach().double().flatten() for p in m.parameters()]) for m in (a, b, c, teacher))
    assert torch.equal(fa, fb) and not torch.equal(fa, fc)
    assert next(a.parameters()).dtype == torch.float32
    assert 0.02 < float((fa - ft).std()) < 0.08
    assert torch.equal(torch.cat([p.detach().flatten() for p in teacher.parameters()]), ft)   # the teacher untouched
    with pytest.raises(ValueError, match="scale"):
        L.perturbed_teacher(teacher, -1.0, 0)
