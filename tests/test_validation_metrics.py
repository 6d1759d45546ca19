import numpy as np
import pytest
from scipy import stats as sps

from validation import metrics as M


def test_se_ratio_and_slope_by_hand():
    ref = np.array([1.0, 2.0, 4.0, 8.0])
    est = np.array([2.0, 4.0, 8.0, 16.0])
    r = M.se_ratio(est, ref)
    assert (r["se_ratio_median"], r["se_ratio_iqr"]) == (2.0, 0.0) and r["se_ratio_gmean"] == pytest.approx(2.0)
    assert (r["n_weights"], r["n_ref_uninformative"], r["n_est_inf"], r["n_est_zero"]) == (4, 0, 0, 0)
    assert M.loglog_slope(est, ref) == pytest.approx(1.0)
    assert M.loglog_slope(np.full(4, 3.0), ref) == pytest.approx(0.0)
    assert M.loglog_slope(ref**0.5, ref) == pytest.approx(0.5)
    # ratios 1, 2, 3, 4: median 2.5, IQR 3.25 - 1.75, geometric mean 24^(1/4)
    r = M.se_ratio(np.array([1.0, 4.0, 9.0, 16.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert r["se_ratio_median"] == 2.5 and r["se_ratio_iqr"] == 1.5
    assert r["se_ratio_gmean"] == pytest.approx(24 ** 0.25)


def test_failures_count_and_move_the_median():
    # references 1, 0 (uninformative), 1, 1, 1; estimates 2, 1, inf, 3, 0
    r = M.se_ratio(np.array([2.0, 1.0, np.inf, 3.0, 0.0]), np.array([1.0, 0.0, 1.0, 1.0, 1.0]))
    assert (r["n_weights"], r["n_ref_uninformative"], r["n_est_inf"], r["n_est_zero"]) == (5, 1, 1, 1)
    assert r["frac_est_inf"] == 0.25 and r["frac_est_zero"] == 0.25
    # the median is over the four informative references, failures included: ratios 0, 2, 3, inf
    assert r["se_ratio_median"] == 2.5
    # the geometric mean and the slope cannot take a failure: they use ratios 2 and 3
    assert r["se_ratio_gmean"] == pytest.approx(6 ** 0.5)
    # an estimator that calls every weight unidentified has median ratio inf, not NaN
    assert M.se_ratio(np.full(3, np.inf), np.ones(3))["se_ratio_median"] == np.inf
    assert np.isnan(M.se_ratio(np.ones(2), np.zeros(2))["se_ratio_median"])


def test_wilson_interval_matches_statsmodels_and_brackets_the_rate():
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = M.wilson(950, 1000)
    assert (lo, hi) == pytest.approx(proportion_confint(950, 1000, alpha=0.05, method="wilson"))
    assert lo < 0.95 < hi and hi - lo < 0.03  # 1000 intervals: half-width about 0.0135
    assert np.isnan(M.wilson(0, 0)[0])


def test_t_intervals_with_few_batches():
    rng = np.random.default_rng(0)
    dof, n = 9, 40_000
    truth = np.zeros(n)
    # a weight N(0, 1) with an SE estimated from dof degrees of freedom: se^2 ~ chi2_dof / dof
    w = rng.standard_normal(n)
    se = np.sqrt(rng.chisquare(dof, n) / dof)
    normal, student = M.truth_metrics(w, se, truth), M.truth_metrics(w, se, truth, dof=dof)
    expected = 2 * sps.t.cdf(M.Z95, dof) - 1  # what the normal interval covers: 0.918 at 9 dof
    tol = 4 * np.sqrt(0.95 * 0.05 / n)
    assert normal["coverage95"] == pytest.approx(expected, abs=tol)
    assert student["coverage95"] == pytest.approx(0.95, abs=tol)
    assert student["type1_05"] == pytest.approx(0.05, abs=tol)
    assert student["coverage95_lo"] < student["coverage95"] < student["coverage95_hi"]
    assert student["n_null"] == n


def test_prune_sets_and_jaccard_by_hand():
    z = np.array([0.5, 3.0, 0.1, 2.0, 0.1])
    assert M.prune_set(z, 0.4) == {2, 4}  # round(0.4 * 5) = 2 smallest, ties by position
    assert M.prune_set(z, 0.6) == {0, 2, 4}
    assert M.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    w, se = np.array([1.0, -2.0, 3.0, 0.5]), np.array([1.0, 1.0, 1.0, 1.0])
    a = M.agreement(w, se, w, se * np.array([1, 2, 4, 8]))
    # |z| = 1, 2, 3, .5 -> prune {0, 3}; |z_ref| = 1, 1, .75, .0625 -> prune {2, 3}: J = 1/3
    assert a["jaccard_50"] == pytest.approx(1 / 3)
    assert np.isnan(a["spearman_se"])  # a constant SE carries no rank information


def test_zero_se_conventions():
    z = M.zvalues(np.array([0.0, 1.0, -1.0]), np.array([0.0, 0.0, 2.0]))
    assert z.tolist() == [0.0, np.inf, -0.5]
    assert M.pvalues(z).tolist() == [1.0, 0.0, pytest.approx(2 * sps.norm.sf(0.5))]


def test_truth_metrics_by_hand():
    truth = np.array([0.0, 0.0, 1.0, 1.0])
    w = np.array([0.1, 3.0, 1.5, 4.0])
    se = np.ones(4)
    m = M.truth_metrics(w, se, truth)
    # covered: |w - truth| <= 1.96: yes, no, yes, no
    assert m["coverage95"] == 0.5
    # null p-values: 2 sf(0.1) = 0.92 (not rejected), 2 sf(3) = 0.0027 (rejected)
    assert m["type1_05"] == 0.5
    # non-null: z = 1.5 (p = 0.13, kept) and z = 4 (rejected)
    assert m["power_05"] == 0.5
    # KS of null p-values {2 sf(3), 2 sf(0.1)} against U(0, 1): D = 1/2 - 2 sf(3)
    assert m["ks_null"] == pytest.approx(0.5 - 2 * sps.norm.sf(3.0))
    # an infinite SE is an interval that says nothing: never covered, never a rejection
    inf = M.truth_metrics(w, np.array([np.inf, 1.0, np.inf, 1.0]), truth)
    assert inf["coverage95"] == 0.0 and inf["type1_05"] == 0.5 and inf["power_05"] == 0.5


def test_paired_coverage_by_hand_and_against_scipys_binomial_test():
    rng = np.random.default_rng(0)
    truth = np.zeros(400)
    w_ref = rng.standard_normal(400)
    se_ref = np.ones(400)
    w, se = w_ref + 0.3 * rng.standard_normal(400), np.full(400, 0.8)
    se[:3] = np.inf
    m = M.paired_coverage(w, se, w_ref, se_ref, truth)
    mine = np.isfinite(se) & (np.abs(w) <= 1.959964 * se)
    ref = np.abs(w_ref) <= 1.959964
    b, c = int((mine & ~ref).sum()), int((~mine & ref).sum())
    assert (m["covered_only_est"], m["covered_only_ref"]) == (b, c) and c > b
    assert m["mcnemar_pvalue"] == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert m["width95_median"] == pytest.approx(2 * 1.959964 * 0.8, rel=1e-6)
    assert m["ref_width95_median"] == pytest.approx(2 * 1.959964, rel=1e-6)
    same = M.paired_coverage(w_ref, se_ref, w_ref, se_ref, truth)
    assert same["covered_only_est"] == same["covered_only_ref"] == 0 and same["mcnemar_pvalue"] == 1.0
    t = M.paired_coverage(w, se, w_ref, se_ref, truth, dof=19)
    assert t["width95_median"] == pytest.approx(2 * sps.t.ppf(0.975, 19) * 0.8, rel=1e-12)
