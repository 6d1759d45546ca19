r"""Wald statistics of whole units: the output neurons of ``nn.Linear`` layers, the output
channels of convolutions, and the affine entries of normalisation layers.

A unit :math:`u` of a layer is produced by the weights :math:`w_u` of its row (the
out-channel slice of the weight, flattened over inputs and kernel) and its bias entry.
The Wald statistic of :math:`H_0: w_u = 0` is

.. math:: \chi^2_u = w_u^\top \Sigma_u^{-1} w_u \sim \chi^2_{k_u} \text{ under } H_0,

with :math:`\Sigma_u` the estimator's covariance of :math:`w_u`. Two structures:

* **diagonal** (any estimator, from its standard errors): :math:`\Sigma_u = \mathrm{diag}(se^2)`,
  so :math:`\chi^2_u = \sum_j z_j^2`. This ignores the correlations inside the row, so it is a
  valid :math:`\chi^2_{k}` statistic only when they are small (independent inputs); with
  correlated inputs it is a ranking, not a test.
* **block** (``kfac``): the exact marginal block of the damped Kronecker-factored
  curvature, :math:`\Sigma = (B \otimes A + dI)^{-1}`. With :math:`A = Q_A\,\mathrm{diag}(\alpha)\,Q_A^\top`
  and :math:`B = Q_B\,\mathrm{diag}(\beta)\,Q_B^\top`, the block of row :math:`o` is
  :math:`\Sigma_o = Q_A\,\mathrm{diag}(c_o)\,Q_A^\top` with
  :math:`c_{ol} = \sum_k Q_{B,ok}^2 / (\beta_k \alpha_l + d)`, so
  :math:`\chi^2_o = \sum_l (Q_A^\top \tilde w_o)_l^2 / c_{ol}` (:math:`\tilde w_o` the row with
  its bias). It is exact where K-FAC is (a linear-Gaussian layer) and otherwise assumes
  inputs and output gradients independent.

Pruned (masked) entries are fixed at 0 and are not tested: :math:`w_u` holds the unit's *live*
entries only and :math:`k_u` counts them, so a unit with one live weight gets :math:`z^2` on one
degree of freedom and a fully pruned unit has :math:`k_u = 0` (p = 1). In the block structure
:math:`\Sigma_u` is then the live entries' block of :math:`\Sigma_o` (the covariance the estimator
states for them, so a lone live weight gets the :math:`z` of the estimator's own ``se()``).

Units of different layers have different :math:`k_u`: the p-value makes them comparable as
*tests*, while the statistic itself (twice the second-order loss increase of removing the unit)
compares what removing them costs; :class:`~mustat.structured.WaldImportance` offers both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor, nn

from mustat._params import PRUNABLE_TYPES, entries

UNIT_LAYERS = (*PRUNABLE_TYPES, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)   # weight layers and norms


@dataclass(frozen=True)
class UnitStatistics:
    r"""Per-unit Wald statistics keyed by module name: ``chi2[name]`` and ``dof[name]`` are
    float64 arrays of the layer's output units. ``structure`` is ``"diagonal"`` or ``"block"``.

    Masked (pruned) entries and entries with an infinite SE (unidentified) add nothing and no
    degree of freedom; a nonzero live weight with ``se == 0`` makes its unit's statistic infinite
    (p = 0), as in :func:`mustat.wald`.
    """

    chi2: dict[str, np.ndarray]
    dof: dict[str, np.ndarray]
    structure: str

    def pvalues(self) -> dict[str, np.ndarray]:
        """Upper-tail :math:`\\chi^2_{k}` p-values of each unit (1 where ``k = 0``)."""
        return {n: chi2_sf(self.chi2[n], self.dof[n]) for n in self.chi2}


def chi2_sf(chi2: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """``P(chi2_k > x)``, 1 where ``k == 0``."""
    chi2, dof = np.asarray(chi2, float), np.asarray(dof, float)
    out = np.ones(np.broadcast(chi2, dof).shape)
    ok = dof > 0
    out[ok] = sps.chi2.sf(chi2[ok] if chi2.ndim else chi2, dof[ok])
    return out


def chi2_logsf(chi2: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """``log P(chi2_k > x)`` without underflow (the ranking score is its negative); 0 where ``k == 0``."""
    chi2, dof = np.broadcast_arrays(np.asarray(chi2, float), np.asarray(dof, float))
    out = np.zeros(chi2.shape)
    ok = dof > 0
    out[ok] = sps.chi2.logsf(chi2[ok], dof[ok])
    return out


def _rows(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).reshape(t.shape[0], -1)


def _live(entry, shape) -> Tensor:
    """The unmasked entries of a tensor, laid out as its rows ``shape`` (all True without a mask)."""
    mask = entry.mask()
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    return mask.detach().to("cpu").reshape(shape) != 0


def _block_chi2(z: Tensor, c: Tensor, QA: Tensor, live: Tensor) -> np.ndarray:
    r"""Each row's :math:`w_L^\top \Sigma_{LL}^{-1} w_L` over its live entries :math:`L`, with
    :math:`\Sigma_o = Q_A \mathrm{diag}(c_o) Q_A^\top` and ``z`` the rows in the eigenbasis
    (:math:`Q_A^\top w_o`; masked entries of ``w`` are 0). A row with no masked entry is the full
    quadratic form; otherwise the smaller of the live and the masked sets is solved: with the
    precision :math:`P_o = \Sigma_o^{-1}`, :math:`(\Sigma_{LL})^{-1} = P_{LL} - P_{LM} P_{MM}^{-1} P_{ML}`."""
    full = (z.square() / c).sum(1)
    out = full.clone()
    for o in torch.nonzero(~live.all(1)).flatten().tolist():
        L, Mk = torch.nonzero(live[o]).flatten(), torch.nonzero(~live[o]).flatten()
        if len(L) == 0:
            out[o] = 0.0
        elif len(L) <= len(Mk):
            QL = QA[L]
            w = QL @ z[o]                                   # the live weights themselves
            out[o] = w @ torch.linalg.solve((QL * c[o]) @ QL.T, w)
        else:
            QM = QA[Mk]
            v = (QM / c[o]) @ z[o]                          # P_ML w_L (w_M = 0)
            out[o] = full[o] - v @ torch.linalg.solve((QM / c[o]) @ QM.T, v)
    return out.numpy()


def _diagonal(model: nn.Module, se: Mapping[str, Tensor], weights: Mapping[str, Tensor] | None):
    table = entries(model)
    chi2: dict[str, np.ndarray] = {}
    dof: dict[str, np.ndarray] = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, UNIT_LAYERS):
            continue
        for attr in ("weight", "bias"):
            name = f"{mod_name}.{attr}" if mod_name else attr
            if name not in se or name not in table:
                continue
            w = (weights[name] if weights is not None and name in weights else table[name].effective())
            s = se[name]
            if tuple(s.shape) != tuple(w.shape):
                raise ValueError(f"se[{name!r}] has shape {tuple(s.shape)}, the weight has {tuple(w.shape)}")
            w64, s64 = _rows(w), _rows(torch.as_tensor(s))
            if bool(torch.isnan(s64).any()) or bool((s64 < 0).any()):
                raise ValueError(f"se[{name!r}] has NaN or negative entries; standard errors must be >= 0 "
                                 "(+inf meaning unidentified)")
            ident = torch.isfinite(s64) & _live(table[name], w64.shape)
            z2 = torch.where((w64 == 0) | ~ident, torch.zeros_like(w64), (w64 / s64).square())
            chi2[mod_name] = chi2.get(mod_name, 0.0) + z2.sum(1).numpy()
            dof[mod_name] = dof.get(mod_name, 0.0) + ident.sum(1).to(torch.float64).numpy()
    if not chi2:
        raise ValueError("se covers no weight or bias of a Linear, Conv or normalisation layer; its keys are "
                         f"{sorted(se)[:8]}")
    return chi2, dof


def _kfac_blocks(estimator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    chi2, dof = {}, {}
    weights = dict(zip(estimator.names, estimator._entries))
    for name, (QA, QB, denom, _, _) in estimator._factors.items():
        mod = estimator._layers[name]
        w = _rows(weights[name].effective())
        live = _live(weights[name], w.shape)
        if estimator._bias(mod):
            bias = estimator._bias_entry(mod)
            b = bias.effective().detach().to("cpu", torch.float64).reshape(-1, 1)
            w = torch.cat([w, b], 1)
            live = torch.cat([live, _live(bias, b.shape)], 1)
        c = QB.square() @ denom.reciprocal()              # (out, features): the row blocks' eigenvalues
        layer = name[: -len(".weight")] if name.endswith(".weight") else ""
        chi2[layer] = _block_chi2(w @ QA, c, QA, live)
        dof[layer] = live.sum(1).to(torch.float64).numpy()
    return chi2, dof


def unit_statistics(model: nn.Module, se: Mapping[str, Tensor] | None = None, *, estimator=None,
                    weights: Mapping[str, Tensor] | None = None) -> UnitStatistics:
    """Wald statistics of every output unit of ``model``'s Linear, Conv and normalisation layers.

    Parameters
    ----------
    model
        The network (read only). Its masks (mustat's, ``torch.nn.utils.prune``'s, ``torch.ao``'s)
        say which entries are live: only those are tested and counted as degrees of freedom.
    se
        Standard errors keyed by tensor name (diagonal covariance; any estimator's ``se()``).
    estimator
        A fitted estimator instead of ``se``: a ``kfac`` estimator gives the exact marginal block
        of each row (module notes) of the observed-information kind at the current weights (a
        sandwich ``kfac`` is not a block here); any other gives its diagonal ``se()`` tested at its
        ``estimate()``.
    weights
        Estimates to test instead of the current weights (diagonal structure only).
    """
    if (se is None) == (estimator is None):
        raise ValueError("unit_statistics takes se=... (standard errors) or estimator=... (a fitted estimator), "
                         "exactly one")
    if estimator is not None:
        if getattr(estimator, "_factors", None) is not None and hasattr(estimator, "_layers"):
            if weights is not None:
                raise ValueError("weights=... is for the diagonal structure; the kfac block tests the layers' "
                                 "current weights")
            if getattr(estimator, "kind", "observed") != "observed":
                raise ValueError(f"the kfac block is the inverse curvature; a {estimator.kind!r} kfac has no block "
                                 "here: pass se=estimator.se() for its diagonal")
            chi2, dof = _kfac_blocks(estimator)
            return UnitStatistics(chi2, dof, "block")
        se, weights = estimator.se(), estimator.estimate()
    chi2, dof = _diagonal(model, se, weights)
    return UnitStatistics(chi2, dof, "diagonal")
