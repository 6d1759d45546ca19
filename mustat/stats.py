"""Wald statistics for network weights: a coefficient table like a regression's,
multiple testing, and pruning at a chosen false discovery rate."""

from __future__ import annotations

import html
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Real

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat._params import entries, entry, install_mask, mask_of, select
from mustat.pruning import PruningReport

ADJUST_METHODS = ("bonferroni", "holm", "fdr_bh", "fdr_by", "sidak", "holm-sidak", "hommel")


def zvalues(w, se):
    """Wald ``z = w / se`` with mustat's conventions, for numpy arrays or torch tensors.

    ``w == 0`` (for example a pruned weight) gives 0; ``se == 0`` with ``w != 0``
    (known exactly) gives ``±inf``; ``se == inf`` (unidentified) gives 0.
    """
    if isinstance(w, Tensor):
        return torch.where(w == 0, torch.zeros_like(w), w / se)
    w, se = np.asarray(w, dtype=float), np.asarray(se, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = w / se
    return np.where(w == 0, 0.0, z)


def pvalues(z, dof: float | None = None) -> np.ndarray:
    """Two-sided p-values of Wald ``z`` against N(0, 1): ``2 (1 - Phi(|z|))``; with ``dof``,
    against Student's t with ``dof`` degrees of freedom (an SE estimated from ``dof + 1``
    batch means is chi-square noisy, so ``w / se`` is t-distributed, not normal)."""
    z = np.abs(np.asarray(z, dtype=float))
    return 2 * (sps.norm.sf(z) if dof is None else sps.t.sf(z, dof))


def _check_alpha(alpha: float) -> float:
    return float(check_scalar(alpha, "alpha", kind=Real, low=0.0, high=1.0, closed="neither"))


@dataclass(frozen=True, eq=False)
class WaldResults:
    r"""Wald tests of :math:`H_0: w = 0` for every entry of some tensors.

    Statistics. :math:`z = \hat w / \widehat{se}` is referred to the standard
    normal distribution: the two-sided p-value is :math:`2\,(1 - \Phi(|z|))` and
    the interval :math:`\hat w \pm z_{1-\alpha/2}\,\widehat{se}`. With ``dof`` it is
    referred to Student's :math:`t_{\mathrm{dof}}` instead (p-values and interval
    quantiles), as for an SE estimated from ``dof + 1`` batch means, whose own
    :math:`\chi^2` noise makes the studentised statistic t-distributed. This is valid
    when :math:`\hat w` is asymptotically normal and unbiased around the true
    value and :math:`\widehat{se}` is a consistent standard error (for example
    the inverse observed information at a maximum-likelihood fit of an
    identified model). Whether the pseudo-bootstrap SD is such an SE is what
    the ``validation`` package measures; it is not by construction.

    Conventions: an entry with ``se == 0`` and ``w != 0`` has ``z = ±inf``,
    ``p = 0``; one with ``w == 0`` (for example a pruned weight) or ``se == inf``
    (unidentified: the weight does not enter the likelihood) has ``z = 0``,
    ``p = 1`` and an infinite interval. Pruned entries are excluded from the multiple-testing family.

    Attributes (dicts keyed by tensor name, numpy float64 arrays in the weights'
    shapes): ``params``, ``bse``, ``zvalues``, ``pvalues``; ``pruned`` (bool);
    ``labels`` (str arrays naming each entry, such as feature names; empty when not
    given); ``alpha`` (default level of :meth:`conf_int` and :meth:`summary`); ``dof``
    (None: normal); ``nobs`` and ``llf`` (sample size and log-likelihood, shown in the
    summary's header when given); ``quantity`` (the estimator's: ``"sampling"`` or
    ``"saliency"``; a saliency's z ranks weights but its p-values are not tests, which the
    summary says).
    """

    params: dict[str, np.ndarray]
    bse: dict[str, np.ndarray]
    pruned: dict[str, np.ndarray]
    alpha: float = 0.05
    dof: float | None = None
    labels: dict[str, np.ndarray] | None = None
    nobs: int | None = None
    llf: float | None = None
    quantity: str | None = None

    @property
    def distribution(self) -> str:
        return "N(0, 1)" if self.dof is None else f"t({self.dof:g})"

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def zvalues(self) -> dict[str, np.ndarray]:
        return {k: zvalues(w, self.bse[k]) for k, w in self.params.items()}

    @property
    def pvalues(self) -> dict[str, np.ndarray]:
        return {k: pvalues(z, self.dof) for k, z in self.zvalues.items()}

    def conf_int(self, alpha: float | None = None) -> dict[str, np.ndarray]:
        """``(lower, upper)`` stacked on a last axis of size 2, at level ``1 - alpha`` (normal, or
        Student-t quantiles with ``dof``)."""
        level = 1 - _check_alpha(self.alpha if alpha is None else alpha) / 2
        q = sps.norm.ppf(level) if self.dof is None else sps.t.ppf(level, self.dof)
        return {k: np.stack([w - q * self.bse[k], w + q * self.bse[k]], axis=-1) for k, w in self.params.items()}

    def pvalues_adjusted(self, method: str = "fdr_bh", params: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """p-values adjusted for multiple testing across all entries of ``params`` jointly.

        ``method`` is any of ``statsmodels.stats.multitest.multipletests``' methods
        listed in ``ADJUST_METHODS`` (``"holm"``, ``"fdr_bh"`` (Benjamini–Hochberg),
        ``"bonferroni"``, ...). Pruned entries are not in the family and get 1.
        """
        check_option(method, "method", ADJUST_METHODS)
        names = self._subset(params)
        p = self.pvalues
        flat = np.concatenate([p[k].ravel() for k in names])
        live = ~np.concatenate([self.pruned[k].ravel() for k in names])
        adj = np.ones_like(flat)
        if live.any():
            adj[live] = multipletests(flat[live], method=method)[1]
        out, start = {}, 0
        for k in names:
            n = p[k].size
            out[k] = adj[start : start + n].reshape(p[k].shape)
            start += n
        return out

    def _subset(self, params: Iterable[str] | None) -> list[str]:
        if params is None:
            return self.names
        names = list(params)
        unknown = [n for n in names if n not in self.params]
        if unknown:
            raise ValueError(f"params {unknown} are not in these results; they hold {self.names}")
        return names

    def to_frame(self, alpha: float | None = None) -> pd.DataFrame:
        """Tidy table: one row per entry (param, index as a tuple, label, flat, weight, se, z,
        pvalue, ci_low, ci_high, pruned); ``label`` is the entry's name where ``labels`` gave one,
        else its index."""
        z, p, ci = self.zvalues, self.pvalues, self.conf_int(alpha)
        frames = []
        for k, w in self.params.items():
            idx = list(np.ndindex(w.shape)) if w.ndim else [()]
            names = (self.labels or {}).get(k)
            label = [str(i) for i in idx] if names is None else list(names.ravel())
            frames.append(pd.DataFrame({
                "param": k, "index": idx, "label": label, "flat": np.arange(w.size), "weight": w.ravel(),
                "se": self.bse[k].ravel(), "z": z[k].ravel(), "pvalue": p[k].ravel(),
                "ci_low": ci[k][..., 0].ravel(), "ci_high": ci[k][..., 1].ravel(),
                "pruned": self.pruned[k].ravel(),
            }))
        return pd.concat(frames, ignore_index=True)

    def summary(self, max_rows: int = 12) -> WaldSummary:
        """Per-tensor blocks: every entry for small tensors (``<= max_rows``), a digest for long ones."""
        return WaldSummary(self, max_rows)


class WaldSummary:
    """Text (``str``) and HTML (notebooks) rendering of :class:`WaldResults`."""

    def __init__(self, results: WaldResults, max_rows: int):
        self.results, self.max_rows = results, max_rows
        r = results
        frame = r.to_frame()
        bh = r.pvalues_adjusted("fdr_bh")
        frame["p_bh"] = np.concatenate([bh[k].ravel() for k in r.names])
        self.blocks = []
        for k in r.names:
            f = frame[frame["param"] == k]
            live = f[~f["pruned"]]
            head = {
                "tensor": k, "shape": tuple(r.params[k].shape), "entries": len(f), "pruned": int(f["pruned"].sum()),
                f"p<{r.alpha:g}": int((live["pvalue"] < r.alpha).sum()),
                f"BH<{r.alpha:g}": int((live["p_bh"] < r.alpha).sum()),
                "median |z|": float(np.median(np.abs(live["z"]))) if len(live) else float("nan"),
            }
            cols = ["label", "weight", "se", "z", "pvalue", "ci_low", "ci_high"]
            if len(f) <= self.max_rows:
                body, note = f[cols], ""
            else:
                body = f.iloc[np.argsort(-np.abs(f["z"].to_numpy()), kind="stable")[: self.max_rows // 2]][cols]
                note = f"{self.max_rows // 2} entries with the largest |z| of {len(f)}"
            self.blocks.append((head, body, note))

    def _title(self) -> str:
        r = self.results
        about = "".join([f"; n = {r.nobs}" if r.nobs is not None else "",
                         f"; log-likelihood {r.llf:.4f}" if r.llf is not None else "",
                         "; se is a SALIENCY (curvature scale for ranking): p-values and intervals are not "
                         "sampling statements" if r.quantity == "saliency" else
                         "; se is a sampling SE" if r.quantity == "sampling" else ""])
        return (f"Wald tests of H0: w = 0 (z = w / se, two-sided p from {r.distribution}, "
                f"{100 * (1 - r.alpha):g}% intervals; BH = Benjamini-Hochberg across all entries{about})")

    def __str__(self) -> str:
        out = [self._title(), "=" * 78]
        for head, body, note in self.blocks:
            out.append("  ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in head.items()))
            if note:
                out.append(f"  ({note})")
            out.append(body.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
            out.append("-" * 78)
        return "\n".join(out)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        parts = [f"<p><b>{html.escape(self._title())}</b></p>"]
        for head, body, note in self.blocks:
            parts.append("<p>" + " &middot; ".join(
                f"{html.escape(k)}: <b>{v:.3g}</b>" if isinstance(v, float) else f"{html.escape(k)}: <b>{html.escape(str(v))}</b>"
                for k, v in head.items()) + (f" <i>({html.escape(note)})</i>" if note else "") + "</p>")
            parts.append(body.to_html(index=False, float_format=lambda x: f"{x:.4g}"))
        return "\n".join(parts)


def wald(
    model: nn.Module,
    se: Mapping[str, Tensor],
    *,
    alpha: float = 0.05,
    params: Iterable[str] | None = None,
    weights: Mapping[str, Tensor] | None = None,
    dof: float | None = None,
    labels: Mapping[str, object] | None = None,
    nobs: int | None = None,
    llf: float | None = None,
    quantity: str | None = None,
) -> WaldResults:
    """Wald table for the model's weights given their standard errors.

    Parameters
    ----------
    model
        The network (read only).
    se
        Standard errors keyed by tensor name: from :meth:`PseudoBootstrap.std`,
        :func:`mustat.uncertainty.hessian_se`, a bootstrap, ...
    alpha
        Default level for intervals and summaries, in (0, 1).
    params
        Tensors to include; default: every key of ``se``.
    weights
        Estimates to test instead of the current weights (e.g. the window mean).
    dof
        Degrees of freedom of the reference t-distribution (``None``: normal): pass the
        estimator's ``diagnostics()["dof"]`` for batch means.
    labels
        Names of the entries, by tensor name: anything that broadcasts to the weight's
        shape as strings (feature names for a GLM's ``(1, d)`` weight, say).
    nobs, llf
        Sample size and log-likelihood, shown in the summary's header.
    quantity
        What ``se`` is: ``"sampling"`` or ``"saliency"`` (the estimator's ``quantity``), shown in
        the summary's header; ``None``: not said.

    Raises
    ------
    ValueError
        ``se`` with NaN or negative entries, or shapes that do not match.

    Warns
    -----
    UserWarning
        When some ``se`` are exactly 0 for nonzero, unpruned weights: those get
        ``z = ±inf`` and ``p = 0`` (treated as known exactly), which usually means
        the weight never moved (a dead unit, a constant input), not that it matters.
    """
    alpha = _check_alpha(alpha)
    if dof is not None:
        check_scalar(dof, "dof", kind=Real, low=0.0, closed="neither")
    if not isinstance(se, Mapping) or not se:
        raise ValueError("se must be a non-empty dict of standard errors keyed by tensor name")
    names = list(se) if params is None else select(model, params, "params")
    est, bse, pruned, named = {}, {}, {}, {}
    n_zero = 0
    table = entries(model)
    for name in names:
        if name not in se:
            raise ValueError(f"se has no entry {name!r}; it has {sorted(se)}")
        e = entry(model, name, table)
        w = (weights[name] if weights is not None and name in weights else e.effective()).detach()
        s = se[name].detach() if isinstance(se[name], Tensor) else torch.as_tensor(se[name])
        if s.shape != w.shape:
            raise ValueError(f"se[{name!r}] has shape {tuple(s.shape)}, the weight has {tuple(w.shape)}")
        s64 = s.to("cpu", torch.float64).numpy()
        if np.isnan(s64).any() or (s64 < 0).any():
            raise ValueError(
                f"se[{name!r}] has {int(np.isnan(s64).sum())} NaN and {int((s64 < 0).sum())} "
                "negative entries; standard errors must be >= 0, +inf meaning unidentified "
                "(a failed Hessian inversion? see hessian_se's damping)"
            )
        w64 = w.to("cpu", torch.float64).numpy()
        m = e.mask()
        pruned[name] = np.zeros(w64.shape, bool) if m is None else (m == 0).cpu().numpy()
        if labels is not None and name in labels:
            try:
                named[name] = np.broadcast_to(np.asarray(labels[name], dtype=str), w64.shape)
            except ValueError:
                raise ValueError(f"labels[{name!r}] has shape {np.shape(labels[name])}, which does not broadcast "
                                 f"to the weight's {w64.shape}") from None
        n_zero += int(((s64 == 0) & (w64 != 0) & ~pruned[name]).sum())
        est[name], bse[name] = w64, s64
    if n_zero:
        warnings.warn(
            f"{n_zero} nonzero weights have se == 0: they get z = inf and p = 0. Zero variance "
            "usually means the weight never moved (a dead unit or a constant input), not that it is "
            "significant",
            stacklevel=2,
        )
    if labels is not None and set(labels) - set(names):
        raise ValueError(f"labels has entries {sorted(set(labels) - set(names))} for no tested tensor; tested: {names}")
    if quantity is not None:
        check_option(quantity, "quantity", ("sampling", "saliency"))
    return WaldResults(est, bse, pruned, alpha, None if dof is None else float(dof), named or None,
                       nobs, None if llf is None else float(llf), quantity)


def prune_fdr(
    model: nn.Module,
    results: WaldResults,
    *,
    fdr: float = 0.05,
    method: str = "fdr_bh",
    params: Iterable[str] | None = None,
) -> PruningReport:
    """Prune every weight whose Wald test is not significant at false discovery rate ``fdr``.

    The family is all unpruned entries of ``params`` (default: the model's
    prunable weights that ``results`` covers); weights kept are exactly those
    whose Benjamini–Hochberg-adjusted p-value (``method``) is ``<= fdr``. The
    sparsity is thus chosen by the data: read it from the returned report.
    Pruned weights are never revived.
    """
    check_scalar(fdr, "fdr", kind=Real, low=0.0, high=1.0, closed="neither")
    if params is None:
        names = [n for n in select(model, None) if n in results.params]
        if not names:
            raise ValueError(f"results cover none of the model's prunable weights {select(model, None)}")
    else:
        names = results._subset(params)
    adj = results.pvalues_adjusted(method, names)
    for name in names:
        keep = torch.as_tensor((adj[name] <= fdr) & ~results.pruned[name])
        existing = mask_of(model, name)
        if existing is not None:
            keep &= (existing != 0).cpu()
        install_mask(model, name, keep)
    return PruningReport.from_model(model, names)
