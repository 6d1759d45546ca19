import numpy as np
import pytest
from scipy import stats as sps

from validation import metrics as M


def test_se_ratio_and_slope_by_hand():
    ref = np.array([1.0, 2.0, 4.0, 8.0])
    est = np.array([2.0, 4.0, 8.0, 16.0])
    r = M.se_ratio(est, ref)
    assert r == {"se_ratio_median": 2.0, "se_ratio_iqr": 0.0, "se_ratio_gmean": pytest.approx(2.0)}
    assert M.loglog_slope(est, ref) == pytest.approx(1.0)
    assert M.loglog_slope(np.full(4, 3.0), ref) == pytest.approx(0.0)
    assert M.loglog_slope(ref**0.5, ref) == pytest.approx(0.5)
    # ratios 1, 2, 3, 4: median 2.5, IQR 3.25 - 1.75, geometric mean 24^(1/4)
    r = M.se_ratio(np.array([1.0, 4.0, 9.0, 16.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert r["se_ratio_median"] == 2.5 and r["se_ratio_iqr"] == 1.5
    assert r["se_ratio_gmean"] == pytest.approx(24 ** 0.25)


def test_se_ratio_skips_uninformative_references():
    r = M.se_ratio(np.array([2.0, 1.0, np.inf, 3.0]), np.array([1.0, 0.0, 1.0, 1.0]))
    assert r["se_ratio_median"] == 2.5  # ratios 2 and 3; the 0-reference and inf-estimate entries are skipped
    assert np.isnan(M.se_ratio(np.ones(2), np.zeros(2))["se_ratio_median"])


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
