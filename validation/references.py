r"""Reference standard errors a calibration study scores estimators against.

**GLMs** (no hidden layer), vectorised over replicate datasets in numpy float64,
independent of the torch code they check: the penalised maximum-likelihood fit
by Newton's method, with PyTorch's convention (L2 coefficient :math:`\lambda` on
the *mean* loss, every parameter penalised, intercept included), then per
weight the observed-information SE :math:`\sqrt{[H^{-1}]_{jj}}`, the sandwich SE
:math:`\sqrt{[H^{-1}JH^{-1}]_{jj}}` (HC0, the sampling SE of the penalised
estimate) and :math:`1/\sqrt{\mathrm{VIF}_j} = 1/\sqrt{H_{jj}[H^{-1}]_{jj}}`, the
factor by which any per-weight (diagonal) SE falls short. Here
:math:`H = \sum_i x_i x_i^\top w_i + n\lambda I` and :math:`J = \sum_i \psi_i\psi_i^\top`,
:math:`\psi_i = x_i (\mu_i - y_i) + \lambda\beta` (summed-loss scale; the
Gaussian family has unit noise variance, as the designs simulate).

**One-hidden-layer networks**, three references that do not share an assumption:

1. the exact penalised Wald SEs (observed information and sandwich) at the
   penalised optimum the trained network sits near, reached by damped Newton
   (:func:`validation.newton.newton_fits`) with a gradient check;
2. the converged penalised bootstrap: ``B`` Newton refits on resamples,
   warm-started at that optimum (Monte-Carlo relative error
   :math:`1/\sqrt{2(B-1)}`);
3. gauge-fixed teacher replicates (designs with a teacher): fresh datasets from
   the teacher, each fitted to its penalised optimum from the teacher's weights,
   hidden units matched to the teacher's (Hungarian matching on
   :math:`(w_{in}, b, w_{out})`), the SD across replicates as the truth. The
   ReLU rescaling :math:`(c\,w_{in}, c\,b, w_{out}/c)` leaves the loss unchanged
   and is fixed by the penalty itself: at a penalised optimum every unit is
   *balanced*, :math:`\|w_{in}\|^2 + b^2 = \|w_{out}\|^2`, and the Wald and
   bootstrap SEs are SEs in that gauge, so the replicates are checked for
   balance (``balance_max``) rather than rescaled to another one.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mustat.uncertainty import hessian_se
from validation.newton import NewtonFits, flat_parameters, load_flat, newton_fits


# ------------------------------------------------------------------------------------------ GLMs
def _glm_moments(family: str, Xa: np.ndarray, y: np.ndarray, beta: np.ndarray):
    eta = np.einsum("rnd,rd->rn", Xa, beta)
    if family == "logistic":
        mu = 1 / (1 + np.exp(-eta))
        return mu, mu * (1 - mu)
    if family == "linear":
        return eta, np.ones_like(eta)
    raise ValueError(f"family={family!r} is not valid for GLM references; choose 'logistic' or 'linear'")


def glm_fit(family: str, X: np.ndarray, y: np.ndarray, *, weight_decay: float = 0.0, gtol: float = 1e-10,
            max_iter: int = 100, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Penalised MLE of ``R`` GLMs at once: ``X (R, n, d)``, ``y (R, n)``.

    Returns ``(beta (R, d + 1), grad_max (R,))``: weights then intercept, and the final
    max-abs gradient of the penalised mean loss (``inf`` where the MLE does not exist). With
    ``strict`` (the default) any fit above ``gtol`` is an error (separation in a logistic
    design): a reference at a non-optimum is no reference. A bootstrap passes ``strict=False``
    and reports the fraction of refits that converged.
    """
    R, n, d = X.shape
    Xa = np.concatenate([X, np.ones((R, n, 1))], axis=2)
    beta = np.zeros((R, d + 1))
    for _ in range(max_iter):
        mu, w = _glm_moments(family, Xa, y, beta)
        g = np.einsum("rnd,rn->rd", Xa, mu - y) / n + weight_decay * beta
        if np.abs(g).max() <= gtol:
            break
        H = np.einsum("rnd,rn,rne->rde", Xa, w, Xa) / n + weight_decay * np.eye(d + 1)
        try:
            beta = beta - np.linalg.solve(H, g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break  # a singular Hessian: reported below as not converged
    mu, _ = _glm_moments(family, Xa, y, beta)
    g = np.abs(np.einsum("rnd,rn->rd", Xa, mu - y) / n + weight_decay * beta).max(1)
    if family == "logistic" and weight_decay == 0:
        # under (quasi-)separation the probabilities saturate at 0 or 1 in float64 and the gradient
        # underflows to 0 while the coefficients diverge: the MLE does not exist
        eta = np.abs(np.einsum("rnd,rd->rn", Xa, beta)).max(1)
        g = np.where(eta > 35, np.inf, g)  # float64 probabilities saturate at |eta| ~ 36.7
    if strict and (g > gtol).any():
        raise RuntimeError(f"glm_fit: {int((g > gtol).sum())} of {R} fits did not converge (max |gradient| "
                           f"{g.max():.3g} > gtol={gtol:g}); is a logistic design separable?")
    return beta, g


def glm_references(family: str, X: np.ndarray, y: np.ndarray, *, weight_decay: float = 0.0) -> dict[str, np.ndarray]:
    """Wald references of ``R`` GLM fits (module notes), each ``(R, d)`` for the weights:
    ``coef``, ``se_observed``, ``se_sandwich``, ``inv_sqrt_vif``; plus ``intercept (R,)``."""
    R, n, d = X.shape
    beta, _ = glm_fit(family, X, y, weight_decay=weight_decay)
    Xa = np.concatenate([X, np.ones((R, n, 1))], axis=2)
    mu, w = _glm_moments(family, Xa, y, beta)
    H = np.einsum("rnd,rn,rne->rde", Xa, w, Xa) + n * weight_decay * np.eye(d + 1)
    psi = Xa * (mu - y)[..., None] + weight_decay * beta[:, None, :]
    J = np.einsum("rnd,rne->rde", psi, psi)
    Hinv = np.linalg.inv(H)
    sandwich = np.einsum("rab,rbc,rcd->rad", Hinv, J, Hinv)
    diag = np.diagonal(Hinv, axis1=1, axis2=2)
    return dict(coef=beta[:, :d], intercept=beta[:, d], se_observed=np.sqrt(diag[:, :d]),
                se_sandwich=np.sqrt(np.diagonal(sandwich, axis1=1, axis2=2)[:, :d]),
                inv_sqrt_vif=1 / np.sqrt(np.diagonal(H, axis1=1, axis2=2)[:, :d] * diag[:, :d]))


# ------------------------------------------------------------------------- one hidden layer
def unit_vectors(params: dict[str, Tensor], first: str, second: str) -> Tensor:
    """Each hidden unit as one vector ``(w_in, b, w_out)``: shape ``(..., h, d + 1 + k)``."""
    w1, b1, w2 = params[f"{first}.weight"], params[f"{first}.bias"], params[f"{second}.weight"]
    return torch.cat([w1, b1.unsqueeze(-1), w2.transpose(-1, -2)], dim=-1)


def match_units(units: Tensor, target: Tensor) -> np.ndarray:
    """Hungarian matching of hidden units to ``target``'s: ``perm`` with ``units[perm[j]]``
    the unit matched to ``target[j]`` (squared Euclidean cost)."""
    cost = torch.cdist(target.double(), units.double()).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def permute_units(params: dict[str, Tensor], perm: np.ndarray, first: str, second: str) -> dict[str, Tensor]:
    """``params`` with hidden units reordered by ``perm`` (the function is unchanged)."""
    out = dict(params)
    p = torch.as_tensor(perm)
    out[f"{first}.weight"] = params[f"{first}.weight"][..., p, :]
    out[f"{first}.bias"] = params[f"{first}.bias"][..., p]
    out[f"{second}.weight"] = params[f"{second}.weight"][..., :, p]
    return out


def balance(params: dict[str, Tensor], first: str, second: str) -> Tensor:
    """Per unit ``(|w_in|^2 + b^2 - |w_out|^2) / (|w_in|^2 + b^2 + |w_out|^2)``: 0 at any
    penalised optimum of a ReLU layer (the penalty fixes the rescaling gauge)."""
    a = params[f"{first}.weight"].square().sum(-1) + params[f"{first}.bias"].square()
    b = params[f"{second}.weight"].square().sum(-2)
    return (a - b) / (a + b).clamp_min(1e-300)


def polish(model: nn.Module, loss, X: Tensor, y: Tensor, *, weight_decay: float, gtol: float = 1e-9,
           max_iter: int = 200) -> tuple[nn.Module, NewtonFits]:
    """The penalised optimum nearest a trained network (damped Newton from its weights):
    the float64 model there and the solver's report (gradient, remaining step, curvature)."""
    fits = newton_fits(model, loss, X[None].double(), y[None], weight_decay=weight_decay, gtol=gtol,
                       max_iter=max_iter)
    theta = torch.cat([fits.params[n][0].flatten() for n, _ in model.named_parameters()])
    return load_flat(model, theta), fits


def wald_references(fitted: nn.Module, loss, X: Tensor, y: Tensor, *, weight_decay: float) -> dict[str, dict[str, Tensor]]:
    """Exact penalised observed-information and sandwich SEs at ``fitted`` (see :func:`mustat.hessian_se`)."""
    def summed(out, target):  # per-sample scores call it on one sample at a time
        return loss(out, target) * len(target)

    return {kind: hessian_se(fitted, summed, (X.double(), y), kind=kind, weight_decay=weight_decay)
            for kind in ("observed", "sandwich")}


def teacher_replicates(teacher: nn.Module, loss, Xs: Tensor, ys: Tensor, *, weight_decay: float,
                       first: str = "0", second: str = "2", gtol: float = 1e-9, max_iter: int = 200) -> dict:
    """Fit each fresh dataset ``(Xs[r], ys[r])`` from the teacher's weights to its penalised
    optimum, match its hidden units to the teacher's, and return the matched stacked
    parameters, the per-parameter SD across replicates (``ddof = 1``), convergence and balance."""
    R = len(Xs)
    start = flat_parameters(teacher).expand(R, -1).clone()
    fits = newton_fits(teacher, loss, Xs, ys, start=start, weight_decay=weight_decay, gtol=gtol, max_iter=max_iter)
    target = unit_vectors({k: v.detach().double() for k, v in teacher.named_parameters()}, first, second)
    matched = {k: [] for k in fits.params}
    swaps = 0
    for r in range(R):
        one = {k: v[r] for k, v in fits.params.items()}
        perm = match_units(unit_vectors(one, first, second), target)
        swaps += int((perm != np.arange(len(perm))).any())
        for k, v in permute_units(one, perm, first, second).items():
            matched[k].append(v)
    params = {k: torch.stack(v) for k, v in matched.items()}
    sd = {k: v.std(0, unbiased=True) for k, v in params.items()}
    # a swap permutes units, and the solver's drift is in the fit's own order: compare it with the
    # SD in that order only when nothing was swapped (else require the curvature check alone)
    flat_sd = torch.cat([sd[k].flatten() for k in fits.params])
    ok = fits.converged_within(flat_sd) if swaps == 0 else fits.min_eig > 0
    return dict(params=params, sd=sd, mean={k: v.mean(0) for k, v in params.items()},
                converged_frac=float(ok.double().mean()), grad_max=float(fits.grad_max.max()), swapped=swaps,
                balance_max=float(balance(params, first, second).abs().max()))


def converged_frac(fits: NewtonFits, se: dict[str, Tensor], tol: float = 0.1) -> float:
    """Fraction of ``fits`` at a strict minimum that no longer move by more than ``tol``
    standard errors ``se`` (keyed like ``fits.params``; :meth:`NewtonFits.converged_within`)."""
    flat = torch.cat([se[k].flatten() for k in fits.params])
    return float(fits.converged_within(flat, tol).double().mean())
