"""Calibration metrics of a standard-error estimator against a reference and,
where the truth is known, against it. Inputs are flat numpy arrays.

Every failure counts. The ratio metrics use one subset: the weights whose
*reference* SE is finite and positive (a reference of 0 or inf says nothing
about that weight; their number is ``n_ref_uninformative``). On that subset an
estimate of ``inf`` (the estimator calls an identified weight unidentified) or
``0`` is a failure: it stays in the median and interquartile range of the ratio
(as inf or 0) and is counted (``frac_est_inf``, ``frac_est_zero``); the
geometric mean and the log-log slope, which cannot take it, leave it out.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import special as sps_special
from scipy import stats as sps

from mustat.pruning import ranked_cut
from mustat.stats import pvalues, zvalues

Z95 = sps.norm.ppf(0.975)
__all__ = ["Z95", "agreement", "informative", "jaccard", "loglog_slope", "prune_set", "pvalues", "se_ratio",
           "spearman", "truth_metrics", "wilson", "zvalues"]


def informative(ref: np.ndarray) -> np.ndarray:
    """Weights whose reference SE says something: finite and positive."""
    return np.isfinite(ref) & (ref > 0)


def _quantiles(x: np.ndarray, qs) -> list[float]:
    """Linear-interpolation quantiles (numpy's default) that keep ``inf`` entries: between two
    equal neighbours the quantile is that value, so inf is not turned into NaN by inf - inf."""
    x = np.sort(x)
    out = []
    for q in qs:
        h = (len(x) - 1) * q
        a, b = x[int(np.floor(h))], x[int(np.ceil(h))]
        out.append(float(a if a == b else a + (b - a) * (h - np.floor(h))))
    return out


def se_ratio(est: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Ratio metrics of ``est / ref`` on the weights with an informative reference
    (module notes): median, IQR (failures included), geometric mean and log-log
    slope (failures left out), and the counts of what was left out or failed."""
    ok = informative(ref)
    e, r = est[ok], ref[ok]
    failed_inf, failed_zero = ~np.isfinite(e), e == 0
    good = ~failed_inf & ~failed_zero
    out = dict(n_weights=int(len(ref)), n_ref_uninformative=int((~ok).sum()), n_est_inf=int(failed_inf.sum()),
               n_est_zero=int(failed_zero.sum()), frac_est_inf=float(failed_inf.mean()) if len(e) else np.nan,
               frac_est_zero=float(failed_zero.mean()) if len(e) else np.nan)
    if not len(e):
        return dict(out, se_ratio_median=np.nan, se_ratio_iqr=np.nan, se_ratio_gmean=np.nan, loglog_slope=np.nan)
    q25, q50, q75 = _quantiles(np.where(failed_inf, np.inf, e / r), (0.25, 0.5, 0.75))
    le, lr = np.log(e[good]), np.log(r[good])
    slope = float(sps.linregress(lr, le).slope) if len(le) >= 3 and np.ptp(lr) > 0 else np.nan
    iqr = float(q75 - q25) if np.isfinite(q75) else np.inf
    return dict(out, se_ratio_median=float(q50), se_ratio_iqr=iqr,
                se_ratio_gmean=float(np.exp(np.mean(le - lr))) if len(le) else np.nan, loglog_slope=slope)


def loglog_slope(est: np.ndarray, ref: np.ndarray) -> float:
    """OLS slope of log(est) on log(ref) (the subset of :func:`se_ratio`): 1 when est tracks
    ref proportionally, 0 when flat."""
    return se_ratio(est, ref)["loglog_slope"]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return np.nan
    return float(sps.spearmanr(a, b).statistic)


def prune_set(abs_z: np.ndarray, sparsity: float) -> set[int]:
    """Indices of the ``round(sparsity * n)`` smallest |z|, ranked exactly as :func:`mustat.prune` ranks."""
    scores = torch.as_tensor(np.nan_to_num(abs_z, posinf=np.inf), dtype=torch.float64)
    keep = ranked_cut(scores, torch.ones(len(scores), dtype=torch.bool), round(sparsity * len(abs_z)))
    return set(torch.nonzero(~keep).flatten().tolist())


def jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def agreement(w: np.ndarray, se: np.ndarray, w_ref: np.ndarray, se_ref: np.ndarray) -> dict[str, float]:
    """Ratio, slope, rank and pruning-overlap metrics of (w, se) against (w_ref, se_ref)."""
    z, z_ref = np.abs(zvalues(w, se)), np.abs(zvalues(w_ref, se_ref))
    out = se_ratio(se, se_ref)
    ok = informative(se_ref)
    out.update(
        spearman_se=spearman(np.nan_to_num(se[ok], posinf=1e300), se_ref[ok]),
        spearman_z=spearman(np.nan_to_num(z, posinf=1e300), np.nan_to_num(z_ref, posinf=1e300)),
        jaccard_50=jaccard(prune_set(z, 0.5), prune_set(z_ref, 0.5)),
        jaccard_90=jaccard(prune_set(z, 0.9), prune_set(z_ref, 0.9)),
        n_zero_se=int((se == 0).sum()),
    )
    return out


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a proportion (statsmodels). It treats the ``n`` trials as
    independent; intervals of one fit's correlated weights are not quite, so read it as a
    lower bound on the uncertainty."""
    if n == 0:
        return np.nan, np.nan
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(successes, n, alpha=0.05, method="wilson")
    return float(lo), float(hi)


def truth_metrics(w: np.ndarray, se: np.ndarray, truth: np.ndarray, dof: float | None = None) -> dict[str, float]:
    """Over repeated datasets, flattened: coverage of 95% Wald intervals (with its Wilson
    interval), type-I error (with its Wilson interval) and the KS statistic of p-values on
    null weights (truth == 0), power on the others. ``dof``: intervals and p-values from
    Student's t (an SE estimated with ``dof`` degrees of freedom), else the normal.
    An infinite SE is counted, not dropped: its interval is the whole line, which says nothing,
    so it never counts as covered; its p-value is 1 (never a rejection)."""
    p = pvalues(zvalues(w, se), dof)
    q = Z95 if dof is None else sps.t.ppf(0.975, dof)
    covered = np.isfinite(se) & (np.abs(w - truth) <= q * se)
    null = truth == 0
    lo, hi = wilson(int(covered.sum()), len(w))
    out = dict(coverage95=float(covered.mean()), coverage95_lo=lo, coverage95_hi=hi, n_truth=int(len(w)),
               n_null=int(null.sum()))
    if null.any():
        ks = sps.kstest(p[null], "uniform")
        rejected = p[null] < 0.05
        lo, hi = wilson(int(rejected.sum()), int(null.sum()))
        out.update(type1_05=float(rejected.mean()), type1_05_lo=lo, type1_05_hi=hi, ks_null=float(ks.statistic),
                   ks_null_pvalue=float(ks.pvalue))
    else:
        out.update(type1_05=np.nan, type1_05_lo=np.nan, type1_05_hi=np.nan, ks_null=np.nan, ks_null_pvalue=np.nan)
    out["power_05"] = float((p[~null] < 0.05).mean()) if (~null).any() else np.nan
    return out


def paired_coverage(w: np.ndarray, se: np.ndarray, w_ref: np.ndarray, se_ref: np.ndarray, truth: np.ndarray,
                    dof: float | None = None) -> dict[str, float]:
    """An estimator's 95% intervals against the exact reference's on the *same* weights and datasets
    (the reference's interval is normal): the two discordant counts, McNemar's exact test of equal
    coverage (statsmodels; a binomial test on the discordant pairs), and the median interval width
    of each. An infinite SE never covers (:func:`truth_metrics`)."""
    from statsmodels.stats.contingency_tables import mcnemar

    q = Z95 if dof is None else sps.t.ppf(0.975, dof)
    mine = np.isfinite(se) & (np.abs(w - truth) <= q * se)
    ref = np.isfinite(se_ref) & (np.abs(w_ref - truth) <= Z95 * se_ref)
    only_mine, only_ref = int((mine & ~ref).sum()), int((~mine & ref).sum())
    table = [[int((mine & ref).sum()), only_mine], [only_ref, int((~mine & ~ref).sum())]]
    pvalue = float(mcnemar(table, exact=True).pvalue) if only_mine + only_ref else 1.0
    return dict(covered_only_est=only_mine, covered_only_ref=only_ref, mcnemar_pvalue=pvalue,
                width95_median=float(np.median(2 * q * se)), ref_width95_median=float(np.median(2 * Z95 * se_ref)))


def clustered_mean(x: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean of ``x`` and its standard error with ``groups`` (datasets) as independent clusters:
    the weights of one dataset are correlated, so the i.i.d. SE (and Wilson's interval) of a
    proportion pooled over them is too small. Groups of equal size: the SD of the group means
    over sqrt(number of groups)."""
    keys, inv = np.unique(groups, return_inverse=True)
    means = np.bincount(inv, weights=x.astype(float)) / np.bincount(inv)
    se = float(means.std(ddof=1) / np.sqrt(len(keys))) if len(keys) > 1 else np.nan
    return float(x.mean()), se


def centre_and_interval(w: np.ndarray, se: np.ndarray, w_opt: np.ndarray, se_opt: np.ndarray, truth: np.ndarray, *,
                        dof: float, groups: np.ndarray) -> dict[str, float]:
    """Which part of an interval ``w ± t(dof) se`` fails: its centre or its width.

    ``w_opt``, ``se_opt``: the exact optimum and the exact SE of the same dataset (one entry per
    weight, ``groups`` naming its dataset). Returns the centre's offset ``(w - w_opt) / se_opt``
    in exact SEs (``bias_z_mean`` with its clustered SE, ``bias_z_sd``; ``bias_z_coef_max``: the
    largest absolute mean over a weight's datasets when every group holds the same weights in the
    same order), the SE ratio's median and the SD of its log beside the chi-square prediction
    ``sqrt(trigamma(dof / 2)) / 2`` (an SE from ``dof + 1`` independent batch means; about
    ``sqrt(1 / (2 dof))``), and four coverages of the
    truth (each with its clustered SE): the estimator's own interval (``cov_est``), the estimator's
    SE around the exact optimum (``cov_se_at_opt``, t(dof)), the exact SE around the estimator's
    centre (``cov_centre_exact_se``, normal) and the exact Wald interval (``cov_exact``, normal).
    If the centre is wrong, ``cov_se_at_opt`` recovers and ``cov_centre_exact_se`` does not."""
    q = sps.t.ppf(0.975, dof)
    z = (w - w_opt) / se_opt
    out = dict(n_intervals=int(len(w)), n_datasets=int(len(np.unique(groups))))
    out["bias_z_mean"], out["bias_z_mean_se"] = clustered_mean(z, groups)
    out["bias_z_sd"] = float(z.std(ddof=1))
    out["bias_z_abs_median"] = float(np.median(np.abs(z)))
    _, inv = np.unique(groups, return_inverse=True)
    per = np.bincount(inv)
    if len(per) > 1 and (per == per[0]).all():
        by_coef = z[np.argsort(inv, kind="stable")].reshape(len(per), per[0]).mean(0)
        out["bias_z_coef_max"] = float(np.abs(by_coef).max())
    ratio = se / se_opt
    out["se_ratio_median"] = float(np.median(ratio))
    out["log_ratio_sd"] = float(np.log(ratio[np.isfinite(ratio) & (ratio > 0)]).std(ddof=1))
    out["log_ratio_sd_chi2"] = float(np.sqrt(sps_special.polygamma(1, dof / 2)) / 2)  # SD of log sqrt(chi2_dof / dof)
    for name, centre, width in (("cov_est", w, q * se), ("cov_se_at_opt", w_opt, q * se),
                                ("cov_centre_exact_se", w, Z95 * se_opt), ("cov_exact", w_opt, Z95 * se_opt)):
        covered = np.isfinite(width) & (np.abs(centre - truth) <= width)
        out[name], out[name + "_se"] = clustered_mean(covered, groups)
    return out
