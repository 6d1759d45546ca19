"""Asymptotic (Wald) standard errors from the observed information, exact for
small networks: ``H^-1`` or the sandwich ``H^-1 J H^-1``, computed with
``torch.func`` in float64."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from numbers import Real

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

from mustat._checks import check_option, check_scalar
from mustat._masking import find_mask
from mustat._params import all_names, resolve, select

Loss = Callable[[Tensor, Tensor], Tensor]


class Kind(str, Enum):
    """Which covariance estimate."""

    OBSERVED = "observed"
    """Inverse observed information ``scale * H^-1`` (correct model, MLE)."""
    SANDWICH = "sandwich"
    """``H^-1 J H^-1`` with ``J = sum_i g_i g_i^T`` from per-sample gradients: robust to a
    misspecified likelihood (statsmodels' ``cov_type="HC0"``)."""


@dataclass
class _Layout:
    """Where each free coordinate of the flat vector lives (masked entries are fixed at 0)."""

    names: list[str]
    shapes: list[torch.Size]
    free: list[Tensor]  # flat indices of the unmasked entries of each tensor

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, shape, idx in zip(self.names, self.shapes, self.free):
            full = theta.new_zeros(shape.numel()).index_put((idx,), theta[start : start + len(idx)])
            out[name] = full.view(shape)
            start += len(idx)
        return out

    def size(self) -> int:
        return sum(len(i) for i in self.free)


def _prepare(model: nn.Module, params: Iterable[str] | None):
    """A float64, unmasked, eval-mode copy of the model (the user's is untouched) and the layout."""
    names = all_names(model) if params is None else select(model, params)
    free = []
    for name in names:
        module, attr = resolve(model, name)
        m = find_mask(module, attr)
        n = getattr(module, attr).numel()
        free.append(torch.arange(n) if m is None else torch.nonzero(m.mask.flatten().cpu() != 0).flatten())
    work = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    from mustat.pruning import finalize

    finalize(work).eval()
    # parameters left out of ``params`` are held fixed: no autograd through them
    work.requires_grad_(False)
    shapes = [getattr(*resolve(work, n)).shape for n in names]
    theta = torch.cat([getattr(*resolve(work, n)).detach().flatten()[i] for n, i in zip(names, free)])
    return work, _Layout(names, shapes, free), theta


@dataclass(frozen=True)
class Information:
    """Curvature of the (penalised) summed loss at the current parameters, float64 on CPU.

    ``H``: Hessian of ``sum_i loss_i + n * weight_decay / 2 * |theta|^2``; ``J``:
    ``sum_i psi_i psi_i^T`` with the per-sample penalised scores
    ``psi_i = grad loss_i + weight_decay * theta`` (None unless asked for);
    ``gradient``: gradient of the penalised total; ``value``: the unpenalised summed loss.
    """

    H: Tensor
    J: Tensor | None
    gradient: Tensor
    layout: _Layout
    theta: Tensor
    value: float


def information(
    model: nn.Module,
    loss: Loss,
    data: tuple[Tensor, Tensor],
    *,
    params: Iterable[str] | None = None,
    sandwich: bool = False,
    weight_decay: float = 0.0,
) -> Information:
    """Observed information of the penalised summed loss (see :class:`Information`).

    ``loss`` returns the *summed* loss of a batch; ``weight_decay`` is PyTorch's L2
    coefficient on the *mean* loss, so on the summed loss the penalty is
    ``n * weight_decay / 2 * |theta|^2`` over the included ``params``.
    """
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)
    work, layout, theta = _prepare(model, params)
    buffers = dict(work.named_buffers())
    X, y = (t.to("cpu") for t in data)
    X = X.to(torch.float64) if X.is_floating_point() else X
    n = len(X)

    def total(th, xb, yb):
        p = layout.unflatten(th)
        return loss(functional_call(work, (p, buffers), (xb,)), yb)

    def penalised(th, xb, yb):
        return total(th, xb, yb) + 0.5 * n * weight_decay * th.square().sum()

    H = hessian(penalised)(theta, X, y)
    J = None
    if sandwich:
        per_sample = vmap(grad(lambda th, xi, yi: total(th, xi[None], yi[None])), in_dims=(None, 0, 0))
        G = per_sample(theta, X, y) + weight_decay * theta
        J = G.T @ G
    return Information(H.detach(), None if J is None else J.detach(), grad(penalised)(theta, X, y).detach(),
                       layout, theta, float(total(theta, X, y)))


@torch.no_grad()
def _write(model: nn.Module, layout: _Layout, theta: Tensor) -> None:
    """Write the free coordinates back into the model's (possibly masked) tensors."""
    from mustat._masking import source

    start = 0
    for name, idx in zip(layout.names, layout.free):
        target, _ = source(*resolve(model, name))
        flat = target.view(-1)
        flat[idx.to(flat.device)] = theta[start : start + len(idx)].to(flat)
        start += len(idx)


def hessian_se(
    model: nn.Module,
    loss: Loss,
    data: tuple[Tensor, Tensor],
    *,
    kind: str | Kind = "observed",
    damping: float = 0.0,
    params: Iterable[str] | None = None,
    scale: float | str = 1.0,
    weight_decay: float = 0.0,
) -> dict[str, Tensor]:
    r"""Wald standard errors of every parameter from the observed information.

    Statistics. With :math:`\ell(\theta) = \sum_i \ell_i(\theta)` the summed
    negative log-likelihood (``loss``), :math:`H = \nabla^2 \ell(\hat\theta)` and
    :math:`J = \sum_i \nabla \ell_i \nabla \ell_i^\top`, the covariance of the
    maximum-likelihood estimate is asymptotically :math:`\mathrm{scale} \cdot H^{-1}`
    (``kind="observed"``: correct likelihood) or :math:`H^{-1} J H^{-1}`
    (``kind="sandwich"``, HC0: robust to misspecification). Both assume
    :math:`\hat\theta` is a (local) minimum, so fit to convergence first, and
    independent samples. For a GLM this is exactly statsmodels' ``cov_params()``
    (``cov_type="nonrobust"`` and ``"HC0"``).

    Penalised fits (``weight_decay`` = :math:`\lambda`, PyTorch's convention: an
    L2 term :math:`\frac{\lambda}{2}\|\theta\|^2` added to the *mean* loss) are
    M-estimators of :math:`\frac1n\sum_i \ell_i + \frac{\lambda}{2}\|\theta\|^2`:
    :math:`H` becomes the penalised Hessian :math:`\nabla^2\ell + n\lambda I` and
    :math:`J = \sum_i \psi_i\psi_i^\top` uses the per-sample penalised scores
    :math:`\psi_i = \nabla\ell_i + \lambda\theta` (they sum to zero at the
    penalised optimum, so :math:`J` is the data-only score covariance, centred).
    ``"sandwich"`` is then the sampling covariance of the penalised estimate;
    ``"observed"``, :math:`H^{-1}`, the Laplace (Gaussian-prior posterior) covariance.

    Parameters
    ----------
    model
        The fitted network; not modified (a float64 copy is differentiated).
    loss
        ``loss(output, target)`` returning the *summed* NLL of a batch (e.g. ``GLM.nll``).
    data
        ``(X, y)``: the data the model was fitted on.
    kind
        ``"observed"`` or ``"sandwich"``.
    damping
        ``delta >= 0``: use ``H + delta I``. Hidden-layer networks have singular ``H``
        (the ReLU rescaling and permutation symmetries); damping gives finite but
        *conservative-to-arbitrary* SEs in the flat directions, so prefer
        restricting ``params`` where possible.
    params
        Names of the parameters to include (default: all, weights and biases). The
        others are held fixed (conditioned on).
    scale
        Multiplies the observed covariance. ``1.0`` for likelihoods with a known
        scale (Bernoulli, categorical). ``"estimate"`` for a Gaussian loss written as
        ``0.5 * sum (y - f)^2``: ``scale = 2 * loss / (n - p)`` = RSS / (n - p), the
        OLS convention (statsmodels ``OLS.bse``). Not used by ``"sandwich"``.
    weight_decay
        The L2 coefficient the fit used (see above), ``>= 0``.

    Returns
    -------
    dict[str, Tensor]
        float64 standard errors keyed by parameter name (``"0.weight"``, ``"0.bias"``;
        a pruned weight under its plain name), with the parameters' shapes. Masked
        (pruned) entries are fixed at 0 and get SE 0.

    Raises
    ------
    ValueError
        If ``H`` (plus damping) is not positive definite: the parameters are not
        identified, or the model is not at a minimum.
    """
    kind = check_option(kind, "kind", Kind)
    check_scalar(damping, "damping", kind=Real, low=0.0)
    if isinstance(scale, str):
        check_option(scale, "scale", ["estimate"])
    else:
        check_scalar(scale, "scale", kind=Real, low=0.0, closed="neither")
    info = information(model, loss, data, params=params, sandwich=kind is Kind.SANDWICH, weight_decay=weight_decay)
    cov = _inverse_pd(info.H, damping)
    if kind is Kind.SANDWICH:
        cov = cov @ info.J @ cov
    else:
        if scale == "estimate":
            dof = len(data[0]) - info.layout.size()
            if dof <= 0:
                raise ValueError(f"scale='estimate' needs more samples than parameters: n={len(data[0])}, p={info.layout.size()}")
            scale = 2.0 * info.value / dof
        cov = cov * scale
    return info.layout.unflatten(cov.diagonal().clamp_min(0).sqrt())


def _inverse_pd(H: Tensor, damping: float) -> Tensor:
    H = 0.5 * (H + H.T) + damping * torch.eye(len(H), dtype=H.dtype)
    evals, evecs = torch.linalg.eigh(H)
    tol = len(H) * torch.finfo(H.dtype).eps * evals.abs().max()
    if evals[0] <= tol:
        n_bad = int((evals <= tol).sum())
        raise ValueError(
            f"the Hessian{' + damping' if damping else ''} is not positive definite: {n_bad} of "
            f"{len(H)} eigenvalues <= {float(tol):.3g} (smallest {float(evals[0]):.3g}, largest "
            f"{float(evals[-1]):.3g}). Either the parameters are not identified (hidden-layer "
            "networks have ReLU-rescaling and permutation symmetries; a softmax with a free logit "
            "per class is overparametrised) or the model is not at a minimum (fit to convergence). "
            "Pass damping=delta > 0 to use (H + delta I)^-1, or restrict params=[...]"
        )
    if evals[0] < 1e-10 * evals[-1]:
        warnings.warn(
            f"the Hessian is ill-conditioned (condition number {float(evals[-1] / evals[0]):.3g}); "
            "standard errors in its flat directions are unreliable",
            stacklevel=3,
        )
    return (evecs / evals) @ evecs.T


def fit_glm(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    loss: Loss | None = None,
    max_iter: int = 1000,
    gtol: float = 1e-8,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Fit a copy of ``model`` to convergence by full-batch L-BFGS in float64.

    Minimises the mean loss plus ``weight_decay / 2 * |theta|^2`` over every
    parameter (PyTorch's ``weight_decay`` on a mean loss; 0: maximum likelihood).

    For reference use (Wald standard errors need the exact optimum): the
    returned model is a float64 copy; ``model`` itself is not modified.
    ``loss`` defaults to ``model.nll`` (a :class:`mustat.models.GLM`). Warns
    if the gradient's max-norm per sample has not reached ``gtol`` (for
    example under separation in logistic regression, where the MLE does not exist).
    """
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)
    fitted = copy.deepcopy(model).to(torch.float64)
    loss = loss or fitted.nll
    X = X.to(torch.float64)
    n = len(X)
    opt = torch.optim.LBFGS(
        fitted.parameters(), lr=1, max_iter=max_iter, tolerance_grad=gtol,
        tolerance_change=0, history_size=50, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = loss(fitted(X), y) / n + 0.5 * weight_decay * sum(p.square().sum() for p in fitted.parameters())
        value.backward()
        return value

    for _ in range(5):
        opt.step(closure)
        closure()
        gmax = max(float(p.grad.abs().max()) for p in fitted.parameters())
        if gmax <= gtol:
            break
    # Newton polish: L-BFGS stops at |g| ~ 1e-9, which leaves ~1e-7 in coefficients
    # near zero; two exact Newton steps reach the optimum to machine precision.
    for _ in range(2):
        info = information(fitted, loss, (X, y), weight_decay=weight_decay)
        _write(fitted, info.layout, info.theta - torch.linalg.solve(info.H, info.gradient))
    closure()
    gmax = max(float(p.grad.abs().max()) for p in fitted.parameters())
    if gmax > gtol:
        warnings.warn(
            f"fit_glm did not converge: max |gradient| per sample {gmax:.3g} > gtol={gtol}; "
            "Wald standard errors at this point are not valid (is the data separable?)",
            stacklevel=2,
        )
    for p in fitted.parameters():
        p.grad = None
    return fitted
