import numpy as np
import pytest
import scipy.stats as sps

from validation.designs import COEF, SCALES, _glm_design, get_design


def _noise(name, reps=10):
    d = get_design(name)
    out = [d.sample(r) for r in range(reps)]
    X = np.concatenate([a[0] for a in out])
    y = np.concatenate([a[1] for a in out])
    return X, y - 0.2 - X @ np.asarray(COEF), out[0][2]


def test_heteroscedastic_noise_has_the_stated_variance_function():
    X, e, truth = _noise("linear-hetero")
    np.testing.assert_array_equal(truth, COEF)
    z2 = (X[:, 2] / SCALES[2]) ** 2
    # least squares of e^2 on (1, z^2): (0.25, 0.75); e^2 = s^2 chi2_1 has SD sqrt(2) s^2, so with
    # 20,000 draws the slope's SE is below 0.02: 4 SEs
    slope, intercept = np.polyfit(z2, e**2, 1)
    assert abs(slope - 0.75) < 0.08 and abs(intercept - 0.25) < 0.08


def test_t3_noise_is_heavy_tailed_with_unit_variance_scale():
    _, e, _ = _noise("linear-t3")
    assert sps.kstest(e * np.sqrt(3.0), sps.t(3).cdf).pvalue > 1e-3
    assert sps.kstest(e, sps.norm.cdf).pvalue < 1e-6          # not Gaussian


def test_the_omitted_term_leaves_the_least_squares_estimand_at_the_truth():
    d = get_design("linear-omitted")
    fits = []
    for r in range(40):
        X, y, truth = d.sample(r)
        A = np.c_[X, np.ones(len(X))]
        fits.append(np.linalg.lstsq(A, y, rcond=None)[0][:-1])
    fits = np.array(fits)
    se = fits.std(0, ddof=1) / np.sqrt(len(fits))
    assert (np.abs(fits.mean(0) - truth) < 4 * se).all()
    # and the residual variance depends on the sixth feature: the Gaussian model is too narrow
    X, e, _ = _noise("linear-omitted")
    z2 = (X[:, 5] / SCALES[5]) ** 2
    assert np.polyfit(z2, e**2, 1)[0] > 0.2


def test_misspecified_noise_needs_the_linear_family():
    with pytest.raises(ValueError, match="noise='hetero' needs family='linear'"):
        _glm_design("logistic", noise="hetero")
    with pytest.raises(ValueError, match="noise"):
        _glm_design("linear", noise="cauchy")


def test_the_narrow_student_has_fewer_units_and_no_teacher_reference():
    from validation.study import load_grid

    d = get_design("teacher-narrow")
    assert d.model(0)[0].out_features == 4 and d.teacher is None
    X, y, _ = d.sample(0)
    X8, y8, _ = get_design("teacher-regression").sample(0)
    np.testing.assert_array_equal(X, X8)                 # the 8-unit teacher's data
    np.testing.assert_array_equal(y, y8)
    from pathlib import Path

    grid = load_grid(Path(__file__).parent.parent / "docs" / "calibration" / "full" / "narrow.toml")
    assert {c.design for c in grid.cells()} == {"teacher-narrow"} and len(grid.cells()) == 2
