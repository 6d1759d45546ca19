"""GLMs fitted to their exact (penalised) optimum, as references for Wald standard errors.

:func:`fit_glm` fits a :class:`mustat.models.GLM` by Newton's method in numpy float64
(closed-form gradient and Hessian of the mean negative log-likelihood plus PyTorch's
L2 penalty), and refuses data whose maximum-likelihood estimate does not exist: a
logistic design that is completely or quasi-completely separated (checked exactly, by
a linear program, whenever the fit saturates or diverges), or a softmax fit whose linear
predictor diverges. statsmodels refuses the same data (``PerfectSeparationError``).
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.special import expit
from torch import Tensor, nn

from mustat import _masking as M
from mustat._checks import check_scalar
from mustat._functional import clone_model
from mustat.models import GLM, Family


class SeparationError(ValueError):
    """The data are (quasi-)separable: the maximum-likelihood estimate does not exist."""


def _glm_of(model: nn.Module) -> GLM:
    for m in model.modules():
        if isinstance(m, GLM):
            return m
    raise TypeError(f"fit_glm fits mustat.models.GLM models (or models wrapping one), got {type(model).__name__}")


def separated(X: np.ndarray, y: np.ndarray) -> bool:
    r"""Whether 0/1 labels ``y`` are completely or quasi-completely separated by a hyperplane
    through the features ``X`` (intercept included).

    With :math:`s_i = 2y_i - 1` and :math:`\tilde x_i = (x_i, 1)`, the MLE of a logistic
    regression exists iff no direction :math:`b \ne 0` has :math:`s_i \tilde x_i^\top b \ge 0`
    for every sample (Albert & Anderson 1984). The linear program
    :math:`\max \sum_i s_i \tilde x_i^\top b` subject to those constraints and
    :math:`-1 \le b_j \le 1` has optimum 0 exactly when there is none (Konis 2007).
    """
    Xa = np.c_[X, np.ones(len(X))] * (2 * np.asarray(y, float) - 1)[:, None]
    scale = np.abs(Xa).max(0)
    scale[scale == 0] = 1.0
    Xa = Xa / scale  # columns on one scale, so the box and the tolerance mean the same for each
    res = linprog(-Xa.sum(0), A_ub=-Xa, b_ub=np.zeros(len(Xa)), bounds=[(-1, 1)] * Xa.shape[1], method="highs")
    return bool(res.status == 0 and -res.fun > 1e-7 * len(Xa))


def _moments(family: Family, Xa: np.ndarray, Y: np.ndarray, B: np.ndarray, weight_decay: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Gradient ``(p, k)`` and Hessian ``(p k, p k)`` of the penalised mean NLL at ``B``."""
    n, p = Xa.shape
    k = B.shape[1]
    eta = Xa @ B
    if family is Family.SOFTMAX:
        z = np.c_[np.zeros(n), eta]
        P = np.exp(z - z.max(1, keepdims=True))
        P = (P / P.sum(1, keepdims=True))[:, 1:]
        W = np.einsum("na,ab->nab", P, np.eye(k)) - np.einsum("na,nb->nab", P, P)  # blocks P_a (delta_ab - P_b)
        H = np.einsum("ni,nab,nj->iajb", Xa, W, Xa).reshape(p * k, p * k) / n
    else:
        P = expit(eta) if family is Family.LOGISTIC else eta
        w = P * (1 - P) if family is Family.LOGISTIC else np.ones_like(P)
        H = (Xa * w).T @ Xa / n
    return Xa.T @ (P - Y) / n + weight_decay * B, H + weight_decay * np.eye(p * k)


def _newton(family: Family, X: np.ndarray, y: np.ndarray, k: int, weight_decay: float, gtol: float,
            max_iter: int, free: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Penalised MLE ``B (d + 1, k)`` (weights, then intercept), the final max-abs gradient and
    the Hessian's smallest-to-largest eigenvalue ratio there; coefficients where ``free`` (the
    same shape) is False are held at 0."""
    n, d = X.shape
    Xa = np.c_[X, np.ones(n)]
    B = np.zeros((d + 1, k))
    f = free.reshape(-1)
    Y = np.eye(k + 1)[y.astype(int)][:, 1:] if family is Family.SOFTMAX else y.reshape(n, 1).astype(float)
    for _ in range(max_iter + 1):
        G, H = _moments(family, Xa, Y, B, weight_decay)
        Hf = H[np.ix_(f, f)]
        gmax = float(np.abs(G.reshape(-1)[f]).max())
        if gmax <= gtol:
            break
        step = np.zeros(B.size)
        try:
            step[f] = np.linalg.solve(Hf, G.reshape(-1)[f])
        except np.linalg.LinAlgError:
            return B, float("inf"), 0.0
        B = B - step.reshape(B.shape)
        if np.abs(Xa @ B).max() > 1e4:  # probabilities saturated far past float64: diverging
            return B, float("inf"), 0.0
    ev = np.linalg.eigvalsh(Hf)  # near-singular along a separating direction
    return B, gmax, float(ev[0] / ev[-1]) if ev[-1] > 0 else 0.0


def fit_glm(model: nn.Module, X: Tensor, y: Tensor, *, weight_decay: float = 0.0, gtol: float = 1e-10,
            max_iter: int = 100) -> nn.Module:
    """A float64 copy of ``model`` (a :class:`mustat.models.GLM`, or a model wrapping one such as
    ``mustat.models.glm``'s) at the exact minimum of its mean negative log-likelihood plus
    ``weight_decay / 2 * |theta|^2`` (PyTorch's convention; every parameter penalised).

    Newton's method in numpy float64 to a max-abs gradient of ``gtol``; ``model`` is not
    modified. Raises :class:`SeparationError` when the maximum-likelihood estimate does not
    exist (separable data without a penalty: pass ``weight_decay > 0``), and ``RuntimeError``
    when Newton does not reach ``gtol`` in ``max_iter`` steps.
    """
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)
    check_scalar(gtol, "gtol", kind=Real, low=0.0, closed="neither")
    glm = _glm_of(model)
    Xn = X.detach().reshape(len(X), -1).cpu().double().numpy()
    yn = y.detach().cpu().numpy()
    if Xn.shape[1] != glm.linear.in_features:
        raise ValueError(f"X has {Xn.shape[1]} features, the GLM {glm.linear.in_features}")
    remedy = "the maximum-likelihood estimate does not exist; fit with a penalty (weight_decay > 0) or drop features"
    k = glm.linear.out_features
    free = np.ones((glm.linear.in_features + 1, k), bool)
    for row, attr in ((slice(None, -1), "weight"), (-1, "bias")):
        mask = M.find_mask(glm.linear, attr)
        if mask is not None:  # a pruned coefficient is held at 0: the fit without it
            free[row] = (mask != 0).cpu().numpy().T
    B, gmax, conditioning = _newton(glm.family, Xn, yn, k, weight_decay, gtol, max_iter, free)
    # Under separation the separated points' probabilities saturate, so their gradient underflows
    # to "converged" while the coefficients diverge, and the curvature along the separating
    # direction vanishes with them: a diverging or near-singular fit is checked exactly (a linear
    # program, not run for ordinary fits, where it would cost more than the fit itself)
    if weight_decay == 0 and glm.family is not Family.LINEAR and (not np.isfinite(gmax) or conditioning < 1e-8):
        if glm.family is Family.LOGISTIC and separated(Xn, yn):
            raise SeparationError(f"the data are (quasi-)separable: a hyperplane splits the two classes, so {remedy}")
        if glm.family is Family.SOFTMAX:
            raise SeparationError(f"the linear predictor diverges (some classes are separable), so {remedy}")
    if gmax > gtol:
        raise RuntimeError(f"fit_glm did not converge: max |gradient| {gmax:.3g} > gtol={gtol:g} after "
                           f"{max_iter} Newton steps")
    fitted = clone_model(model).to(torch.float64)
    target = _glm_of(fitted)
    with torch.no_grad():
        M.leaf(target.linear, "weight").copy_(torch.from_numpy(B[:-1].T.copy()))
        M.leaf(target.linear, "bias").copy_(torch.from_numpy(B[-1].copy()))
    return fitted
