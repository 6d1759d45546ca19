"""Calibration metrics of a standard-error estimator against a reference and,
where the truth is known, against it. Inputs are flat numpy arrays."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats as sps

from mustat.pruning import ranked_cut
from mustat.stats import pvalues, zvalues

Z95 = sps.norm.ppf(0.975)
__all__ = ["Z95", "agreement", "jaccard", "loglog_slope", "prune_set", "pvalues", "se_ratio", "spearman",
           "truth_metrics", "zvalues"]


def _log_pairs(est: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = (est > 0) & (ref > 0) & np.isfinite(est) & np.isfinite(ref)
    return np.log(est[keep]), np.log(ref[keep])


def se_ratio(est: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Median, interquartile range and geometric mean of ``est / ref``.

    Entries whose reference SE is 0 or non-finite (a weight that never moved in any
    refit, e.g. on a constant input: the reference says nothing) or whose estimate is
    non-finite (unidentified) are left out; with none left the metrics are NaN.
    """
    ok = (ref > 0) & np.isfinite(ref) & np.isfinite(est)
    if not ok.any():
        return dict(se_ratio_median=np.nan, se_ratio_iqr=np.nan, se_ratio_gmean=np.nan)
    r = est[ok] / ref[ok]
    le, lr = _log_pairs(est, ref)
    q25, q50, q75 = np.quantile(r, [0.25, 0.5, 0.75])
    return dict(se_ratio_median=float(q50), se_ratio_iqr=float(q75 - q25),
                se_ratio_gmean=float(np.exp(np.mean(le - lr))) if len(le) else np.nan)


def loglog_slope(est: np.ndarray, ref: np.ndarray) -> float:
    """OLS slope of log(est) on log(ref): 1 when est tracks ref proportionally, 0 when flat."""
    le, lr = _log_pairs(est, ref)
    if len(le) < 3 or np.ptp(lr) == 0:
        return np.nan
    return float(sps.linregress(lr, le).slope)


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
    out.update(
        loglog_slope=loglog_slope(se, se_ref),
        spearman_se=spearman(se, se_ref),
        spearman_z=spearman(np.nan_to_num(z, posinf=1e300), np.nan_to_num(z_ref, posinf=1e300)),
        jaccard_50=jaccard(prune_set(z, 0.5), prune_set(z_ref, 0.5)),
        jaccard_90=jaccard(prune_set(z, 0.9), prune_set(z_ref, 0.9)),
        n_zero_se=int((se == 0).sum()),
    )
    return out


def truth_metrics(w: np.ndarray, se: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Over repeated datasets, flattened: coverage of 95% Wald intervals, type-I error
    and KS statistic of p-values on null weights (truth == 0), power on the others."""
    p = pvalues(zvalues(w, se))
    covered = np.abs(w - truth) <= Z95 * se
    null = truth == 0
    out = dict(coverage95=float(covered.mean()), n_truth=int(len(w)))
    if null.any():
        ks = sps.kstest(p[null], "uniform")
        out.update(type1_05=float((p[null] < 0.05).mean()), ks_null=float(ks.statistic), ks_null_pvalue=float(ks.pvalue))
    else:
        out.update(type1_05=np.nan, ks_null=np.nan, ks_null_pvalue=np.nan)
    out["power_05"] = float((p[~null] < 0.05).mean()) if (~null).any() else np.nan
    return out
