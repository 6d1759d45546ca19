"""Batch-means standard errors: exact arithmetic against numpy, and the long-run
variance of processes whose LRV is known in closed form."""

import warnings

import numpy as np
import pytest
import torch
from conftest import Trajectory

from mustat.uncertainty import BatchMeans, FitContext, WindowWarning


def _feed(est, model, xs):
    for x in xs:
        model.set(x)
        est.update()


def test_matches_numpy_batch_means_exactly():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((75, 3, 4)).cumsum(0) * 0.1 + 1.0  # 10 complete batches of 7, and 5 steps over
    model = Trajectory((3, 4), dtype=torch.float64)
    est = BatchMeans(model, batch_steps=7, min_batches=5)
    _feed(est, model, xs)
    assert est.batches == 10
    means = xs[:70].reshape(10, 7, 3, 4).mean(1)
    lrv = 7 * means.var(0, ddof=1)
    np.testing.assert_allclose(est.lrv()["layers.0.weight"].numpy(), lrv, rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WindowWarning)
        est.fit(FitContext(batch_size=32, n=2000))
    np.testing.assert_allclose(est.se()["layers.0.weight"].numpy(), np.sqrt(lrv * 32 / 2000), rtol=1e-10)
    np.testing.assert_allclose(est.estimate()["layers.0.weight"].numpy(), xs.mean(0), rtol=1e-12)
    tau = lrv / xs.var(0, ddof=1)
    assert est.diagnostics()["tau_median"] == pytest.approx(np.median(tau), rel=1e-10)


def test_state_round_trip_mid_batch_and_reset():
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((40, 2, 2))
    model = Trajectory((2, 2), dtype=torch.float64)
    a = BatchMeans(model, batch_steps=4)
    _feed(a, model, xs[:22])  # 5 batches and 2 steps into the sixth
    b = BatchMeans(model, batch_steps=4)
    b.load_state_dict(a.state_dict())
    _feed(a, model, xs[22:])
    _feed(b, model, xs[22:])
    torch.testing.assert_close(a.lrv(), b.lrv(), rtol=0, atol=0)
    a.reset()
    with pytest.raises(RuntimeError, match="at least 2 complete batches of 4 steps, has 0"):
        a.lrv()
    with pytest.raises(ValueError, match="batch_steps=4, this estimator has batch_steps=5"):
        BatchMeans(model, batch_steps=5).load_state_dict(b.state_dict())


def _ar1(rho, steps, shape, seed):
    """x_t = rho x_{t-1} + e_t, e ~ N(0, 1), started stationary: LRV = 1 / (1 - rho)^2."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) / np.sqrt(1 - rho**2)
    for _ in range(steps):
        x = rho * x + rng.standard_normal(shape)
        yield x


def test_recovers_the_long_run_variance_of_ar1_and_flags_short_batches():
    rho, shape, steps = 0.9, (5, 10), 40_000  # tau = (1 + rho) / (1 - rho) = 19 steps
    truth = 1 / (1 - rho) ** 2
    model = Trajectory(shape, dtype=torch.float64)
    long, short = BatchMeans(model, batch_steps=400), BatchMeans(model, batch_steps=4)
    for x in _ar1(rho, steps, shape, seed=2):
        model.set(x)
        long.update()
        short.update()
    ctx = FitContext(batch_size=1, n=1)
    long.fit(ctx)
    ratio = np.median(long.lrv()["layers.0.weight"].numpy() / truth)
    # K = 100 batches: each LRV has relative SE sqrt(2 / 99) = 0.14; the median of 50 has about
    # 1.25 * 0.14 / sqrt(50) = 0.025. Allow 3 of those plus the batch-means bias tau / (2 b) ~ 0.024.
    assert abs(ratio - 1) < 3 * 0.025 + 0.024, ratio
    assert long.diagnostics()["ok"] and long.diagnostics()["tau_median"] == pytest.approx(19, rel=0.15)
    # batches far shorter than tau: the estimate is badly low, and the diagnostic says so
    with pytest.warns(WindowWarning, match="autocorrelation time above batch_steps"):
        short.fit(ctx)
    assert np.median(short.lrv()["layers.0.weight"].numpy() / truth) < 0.5
    assert not short.diagnostics()["ok"] and short.diagnostics()["frac_short"] == 1.0


def test_bad_input():
    model = Trajectory((2, 2))
    with pytest.raises(ValueError, match="batch_steps must be in"):
        BatchMeans(model, batch_steps=0)
    with pytest.raises(ValueError, match="batch_size=..., n=..."):
        BatchMeans(model, batch_steps=2).fit(FitContext())


def test_sums_are_exact_where_the_level_dwarfs_the_spread():
    """In the weight's dtype the batch sums lost 14% of the long-run variance at |w| / sd ~ 3e4 in
    float32; the float64 sums match numpy's float64 batch means."""
    rng = np.random.default_rng(3)
    e = np.zeros((4000, 2, 3))
    for t in range(1, len(e)):  # AR(1) around 1.0 with sd ~ 3.3e-5
        e[t] = 0.9 * e[t - 1] + 1.4e-5 * rng.standard_normal((2, 3))
    xs = (1.0 + e).astype(np.float32)
    model = Trajectory((2, 3), dtype=torch.float32)
    est = BatchMeans(model, batch_steps=200, min_batches=5)
    _feed(est, model, xs)
    means = xs.astype(np.float64).reshape(20, 200, 2, 3).mean(1)
    ref = 200 * means.var(0, ddof=1)
    np.testing.assert_allclose(est.lrv()["layers.0.weight"].double().numpy(), ref, rtol=1e-4)
