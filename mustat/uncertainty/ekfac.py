r"""The ``ekfac`` estimator: K-FAC with its eigenvalues corrected (EK-FAC; George, Laurent,
Bouthillier, Ballas & Vincent 2018), with the exact diagonal of its damped inverse
(:mod:`mustat.uncertainty.marginal`).

K-FAC (:mod:`mustat.uncertainty.kfac`) approximates a layer's GGN block by :math:`B \otimes A`,
whose eigenbasis is :math:`Q_B \otimes Q_A` and whose eigenvalues are the products
:math:`\beta_k\alpha_l`. EK-FAC keeps the basis and replaces the eigenvalues by the GGN's own
second moments in it,

.. math:: s_{kl} = \frac{n}{m}\sum_{i=1}^m \sum_c \big[Q_B^\top G_{ic}\, Q_A\big]_{kl}^2, \qquad
          G_{ic} = \sum_t b_{itc}\, \tilde a_{it}^\top,

with :math:`G_{ic}` sample :math:`i`'s gradient of the layer along the output-space factor
column :math:`c` (exact, as in K-FAC: no Monte Carlo labels), so :math:`s` is the diagonal of
the exact GGN block in that basis. Among curvatures with this eigenbasis it is the nearest to
the GGN in Frobenius norm, so never farther than K-FAC (George et al., Prop. 1;
``tests/test_ekfac.py`` checks both statements against a dense GGN). The inverse diagonal is
K-FAC's formula with :math:`\beta_k\alpha_l` replaced by :math:`s_{kl}`. Costs a second pass
over the data: the basis must be known before the moments are taken in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mustat.uncertainty.base import FitContext, register_estimator
from mustat.uncertainty.kfac import KFAC

#: float64 entries of one sub-chunk of per-sample layer gradients (m, out, features)
_CHUNK = 1 << 24


@register_estimator("ekfac")
class EKFAC(KFAC):
    """Eigenvalue-corrected Kronecker-factored marginal SEs (module notes); the same layers,
    options and compensating update as ``kfac``."""

    _passes = 2
    variants = {"ekfac-sandwich": {"kind": "sandwich"}, "ekfac-layer": {"obs_block": "layer"}}

    def _extra_memory(self, positions: int, out: int, features: int) -> int:
        # the moments, and with several positions a sub-chunk's per-sample gradients, their two
        # projections and the square
        return out * features + (0 if positions == 1 else 4 * min(_CHUNK, 512 * out * features))

    def _extra_flops(self, n: int, positions: int, out: int, features: int, rank: int, columns: int) -> dict:
        # the second pass's forward and C backward passes are in the caller's "data pass" (_passes = 2);
        # here each column's gradient projected on the basis
        if positions == 1:
            proj = 2 * n * (features * rank + columns * out * out + columns * out * rank)
        else:
            proj = 2 * n * columns * (positions * out * features + out * out * features + out * features * rank)
        return {"second pass": (proj, 0.5)}

    def _eigenvalues(self, context: FitContext, bases: dict) -> dict[str, Tensor]:
        s = {n: torch.zeros(QB.shape[1], QA.shape[1], dtype=torch.float64) for n, (QA, QB, *_) in bases.items()}
        seen = 0
        for size, inputs, columns in self._chunks(context, "eigenvalues"):
            seen += size
            # one position: G_ic = b_ic a_i^T, so its squared projection is an outer product of squares
            proj = {n: (self._with_one(n, a[:, :, 0].to(torch.float64)) @ bases[n][0]).square()
                    for n, a in inputs.items() if a.shape[2] == 1}
            for col in columns:
                for n, g in col.items():
                    if g is None:
                        continue
                    QA, QB = bases[n][:2]
                    if n in proj:
                        s[n] += (g[:, :, 0].to(torch.float64) @ QB).square().T @ proj[n]
                        continue
                    a = inputs[n]
                    step = max(1, _CHUNK // (len(QB) * len(QA)))
                    for j in range(0, size, step):
                        # G_ic = sum_t b_itc [a_it, 1]^T: the product in the pass dtype, the bias
                        # column a sum of b (no column of ones, no copy of the patches)
                        gj = g[j:j + step]
                        G = gj @ a[j:j + step].transpose(1, 2)
                        if self._has_bias[n]:
                            G = torch.cat([G, gj.sum(2, keepdim=True)], 2)
                        s[n] += (QB.T @ G.to(torch.float64) @ QA).square().sum(0)
        return {n: v * (context.n / seen) for n, v in s.items()}

    def _row_block(self, name: str, o: int, k: int) -> Tensor:
        # Q_A diag(sum_k Q_B[o,k]^2 s_k) Q_A^T over the first k inputs: not a Kronecker product
        QA, QB, _, _, _ = self._factors[name]
        QAw = QA[:k]
        return (QAw * (QB[o].square() @ self._eigen[name])) @ QAw.T
