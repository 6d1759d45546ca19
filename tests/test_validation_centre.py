"""validation.metrics.centre_and_interval: which part of an interval fails, the centre or the SE,
checked on simulated intervals against closed forms (noncentral t, the normal)."""

import numpy as np
import pytest
from scipy import special, stats

from validation.metrics import Z95, centre_and_interval, clustered_mean

DOF = 19


def _intervals(bias: float, G: int = 3000, k: int = 4, seed: int = 0):
    """G datasets of k weights: the exact optimum is N(truth, s^2), the centre sits ``bias`` exact
    SEs off it, and the SE is s * sqrt(chi2_DOF / DOF) (batch means of DOF + 1 independent batches)."""
    rng = np.random.default_rng(seed)
    s = np.tile(rng.uniform(0.5, 2.0, k), G)
    truth = np.tile(rng.normal(size=k), G)
    w_opt = truth + s * rng.standard_normal(G * k)
    se = s * np.sqrt(rng.chisquare(DOF, G * k) / DOF)
    return w_opt + bias * s, se, w_opt, s, truth, np.repeat(np.arange(G), k)


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_a_shifted_centre_is_measured_and_separated_from_the_se(bias):
    *arrays, groups = _intervals(bias)
    out = centre_and_interval(*arrays, dof=DOF, groups=groups)
    n = out["n_intervals"]
    assert n == 12000 and out["n_datasets"] == 3000
    assert out["bias_z_mean"] == pytest.approx(bias, abs=1e-9)          # the shift is exact here
    assert out["bias_z_coef_max"] == pytest.approx(bias, abs=1e-9)
    q = stats.t.ppf(0.975, DOF)
    expected = {"cov_est": stats.nct.cdf(q, DOF, bias) - stats.nct.cdf(-q, DOF, bias),  # (Z + b) / sqrt(chi2/dof)
                "cov_se_at_opt": 0.95,                                               # Student t(DOF) exactly
                "cov_centre_exact_se": stats.norm.cdf(Z95 - bias) - stats.norm.cdf(-Z95 - bias),
                "cov_exact": 0.95}
    for name, p in expected.items():
        tol = 4 * np.sqrt(p * (1 - p) / n)                                  # 4 binomial SEs
        assert abs(out[name] - p) < tol, (name, out[name], p)
        assert out[name + "_se"] == pytest.approx(np.sqrt(p * (1 - p) / n), rel=0.25)
    # the SE's spread is the chi-square's: SD of log sqrt(chi2/dof) = sqrt(trigamma(dof/2)) / 2
    assert out["log_ratio_sd_chi2"] == pytest.approx(np.sqrt(special.polygamma(1, DOF / 2)) / 2)
    assert out["log_ratio_sd"] == pytest.approx(out["log_ratio_sd_chi2"], rel=0.05)
    assert out["se_ratio_median"] == pytest.approx(stats.chi2.median(DOF) ** 0.5 / DOF ** 0.5, abs=0.01)


def test_a_noisy_se_widens_the_log_ratio_beyond_the_chi_square():
    w, se, w_opt, s, truth, g = _intervals(0.0)
    se = se * np.exp(0.3 * np.random.default_rng(1).standard_normal(len(se)))
    out = centre_and_interval(w, se, w_opt, s, truth, dof=DOF, groups=g)
    assert out["log_ratio_sd"] > 1.5 * out["log_ratio_sd_chi2"]
    assert out["cov_est"] < 0.94                                            # extra SE noise under-covers


def test_clustered_mean_uses_groups_as_units():
    x = np.array([1, 1, 1, 0, 0, 0], dtype=float)
    mean, se = clustered_mean(x, np.array([0, 0, 0, 1, 1, 1]))
    assert mean == 0.5 and se == pytest.approx(0.5)                        # two clusters of means 1 and 0
    mean, se = clustered_mean(x, np.arange(6))
    assert se == pytest.approx(x.std(ddof=1) / np.sqrt(6))


def test_window_centre_rows_agree_with_the_study_summary(tmp_path):
    import sys
    from pathlib import Path

    from validation.estimators import Setting
    from validation.study import Grid, run_study

    sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "calibration"))
    try:
        import window
    finally:
        sys.path.pop(0)
    grid = window.centre_grid(replications=3)
    assert len(grid.cells()) == 5 and grid.estimators == ("batch-means",)
    tiny = Grid(designs=("logistic",), settings=(Setting("adam", 0.05, batch_size=64, epochs=3, window=2),),
                estimators=("batch-means",), replications=3, bootstrap_B=2, seed=6)
    summary, cells = run_study(tiny, tmp_path, scheduler="serial", quiet=True)
    d = window.centre_rows(summary, cells)
    assert len(d) == 1 + 8 and set(d.coef) == {"all", *map(str, range(8))}
    pooled = d[d.coef == "all"].iloc[0]
    row = lambda est: summary[(summary.estimator == est) & (summary.reference == "wald")].iloc[0]  # noqa: E731
    # the study's own coverages, computed by truth_metrics, on the same intervals
    assert pooled.cov_est == pytest.approx(row("batch-means").coverage95)
    assert pooled.cov_exact == pytest.approx(row("wald").coverage95)
    assert pooled.se_ratio_median == pytest.approx(row("batch-means").se_ratio_median)
    assert pooled.bias_z_mean == pytest.approx(d[d.coef != "all"].bias_z_mean.mean())
    assert pooled.n_datasets == 3 and pooled.n_intervals == 24


def test_window_newton_step_converges_to_the_exact_mle():
    """docs/calibration/window.py's one-step recentring: iterated, it reaches validation.references'
    Newton MLE (an independent implementation) for every replicate."""
    import sys
    from pathlib import Path

    from validation.designs import get_design
    from validation.references import glm_references

    sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "calibration"))
    try:
        import window
    finally:
        sys.path.pop(0)
    design = get_design("logistic")
    data = [design.sample(r) for r in range(3)]
    X, y = np.stack([a[0] for a in data]), np.stack([a[1] for a in data])
    w, b = np.zeros((3, X.shape[2])), np.zeros(3)
    for _ in range(30):
        w, b = window.newton_step(X, y, w, b)
    refs = glm_references("logistic", X, y)
    np.testing.assert_allclose(w, refs["coef"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(b, refs["intercept"], rtol=0, atol=1e-8)


def test_softplus_robust_spread_is_the_sd_of_a_gaussian_and_ignores_outliers():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "calibration"))
    try:
        import softplus
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    x = 2.0 * rng.standard_normal((40_000, 3))
    # IQR / 1.349 estimates sigma with SE about 1.17 sigma / sqrt(n): 4 SEs is 2.3% at n = 40,000
    np.testing.assert_allclose(softplus.robust_sd(x), 2.0, rtol=0.025)
    x[:800] *= 50                                              # 2% wild fits
    assert (softplus.robust_sd(x) < 2.15).all() and (x.std(0) > 10).all()
