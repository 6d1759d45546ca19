r"""A local estimand for one-hidden-layer networks: what one basin identifies.

A student trained from a random initialisation ends at one of many local optima of its penalised
objective :math:`F_n(\theta) = \frac1n\sum_i \ell_i(\theta) + \frac\lambda2\|\theta\|^2`. A
standard error computed there (a sandwich, batch means of the trajectory) describes the sampling
spread of *that* optimum, so its target is the optimum of the population objective
:math:`F(\theta) = E\,\ell(\theta) + \frac\lambda2\|\theta\|^2` in the same basin,

.. math:: \theta^*_{\mathrm{loc}} = \text{the local minimiser of } F \text{ that Newton reaches from } \hat\theta,

not the teacher's weights. :func:`local_optima` approximates :math:`F` by a fresh sample of
``n_pop`` points from the same teacher, one sample per dataset, and runs damped Newton from each
student's endpoint :math:`\hat\theta`; the units keep their order (no matching) and every
penalised optimum is balanced (:func:`validation.newton._rebalancer`), so the gauge is the one the
invariant study scores. The truth so defined has its own sampling error: its covariance is
:math:`n/n_{pop}` times one dataset's, so an exact 95% interval covers it with probability
:math:`2\Phi(1.96/\sqrt{1 + n/n_{pop}}) - 1` (:func:`expected_coverage`; 0.944 at
:math:`n_{pop} = 20n`).

A second design makes the basin common: every student starts at the teacher's weights plus a
small perturbation (:func:`perturbed_teacher`), and the truth is the population optimum reached
from the teacher.

:func:`score` turns centres, SEs and truths into a coverage row: the coverage of 95% intervals
with its Wilson bounds, and the standardised errors :math:`z = (c - \theta^*)/se`: their SD (1 for
a right SE) and the centre's bias in SE units (the median over entries of :math:`|\bar z|`, the
mean of z over datasets; about :math:`0.67/\sqrt{R}` for an unbiased centre).
"""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from mustat._checks import check_scalar
from validation.invariant import coverage_table
from validation.newton import NewtonFits, flat_parameters, newton_fits, smooth_polish


def expected_coverage(n: int, n_pop: int, level: float = 0.95) -> float:
    r"""Coverage of an exact ``level`` normal interval for :math:`\hat\theta` (``n`` samples) of a
    truth estimated independently on ``n_pop`` samples: :math:`2\Phi(z/\sqrt{1 + n/n_{pop}}) - 1`."""
    check_scalar(n, "n", kind=Integral, low=1)
    check_scalar(n_pop, "n_pop", kind=Integral, low=1)
    z = stats.norm.ppf(0.5 + level / 2)
    return float(2 * stats.norm.cdf(z / math.sqrt(1 + n / n_pop)) - 1)


def teacher_sample(teacher: nn.Module, n: int, seed: int, noise: float = 1.0) -> tuple[Tensor, Tensor]:
    """``n`` fresh samples of a regression teacher, float64: ``X ~ N(0, I)``, ``y = f(X) + noise * N(0, 1)``
    (the design of ``validation.designs._teacher_design`` with ``family="linear"``)."""
    check_scalar(n, "n", kind=Integral, low=1)
    rng = np.random.default_rng(seed)
    X = torch.tensor(rng.standard_normal((n, teacher[0].in_features)))
    with torch.no_grad():
        y = teacher.double()(X)[:, 0] + noise * torch.tensor(rng.standard_normal(n))
    return X, y


def local_optima(teacher: nn.Module, loss, starts: Tensor, *, weight_decay: float, n_pop: int, seed: int,
                 max_iter: int = 100, group: int = 4, gtol: float = 1e-10,
                 betas: tuple[float, ...] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    r"""The population penalised optimum of each start's basin: Newton on ``n_pop`` fresh samples of
    the teacher (one sample per start, seeded ``seed + r``) from ``starts (R, p)``.

    Parameters
    ----------
    teacher
        The regression teacher ``nn.Sequential(Linear, ReLU, Linear)`` (its architecture is the
        students'); only read.
    loss
        ``loss(output, target)``: the mean loss of a batch.
    starts
        ``(R, p)`` flat parameters (``named_parameters`` order), each student's endpoint.
    weight_decay
        :math:`\lambda > 0`: the penalty of the population objective (a basin of a ReLU network
        has a strict optimum only with one).
    n_pop
        Samples of the population objective per start (its own sampling error is
        ``sqrt(n / n_pop)`` of a dataset of ``n``'s, :func:`expected_coverage`).
    group
        Starts solved at once (memory: ``group * n_pop * p`` float64 for the Hessian's factors).
    betas
        If given, the optimum of the smooth surrogate instead (softplus of these sharpnesses,
        :func:`validation.newton.smooth_polish`, whose optimum is certified): the estimand of a
        student whose own optimum is the same surrogate's.

    Returns
    -------
    theta, info
        ``theta (R, p)``; ``info``: per start ``grad_max``, ``min_eig`` and ``minimum`` (ReLU: a
        positive definite Hessian or no descent along negative curvature; surrogate: certified),
        and for ReLU ``steps`` and ``drift`` (largest move over the second half of the iterations,
        flat ``(R, p)``), for the surrogate ``step_se`` (the Newton step in its sandwich SEs).
    """
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0, closed="neither")
    check_scalar(n_pop, "n_pop", kind=Integral, low=2)
    check_scalar(group, "group", kind=Integral, low=1)
    p = sum(t.numel() for t in teacher.parameters())
    if starts.ndim != 2 or starts.shape[1] != p:
        raise ValueError(f"starts must have shape (R, p={p}), got {tuple(starts.shape)}")
    thetas, infos = [], []
    for lo in range(0, len(starts), group):
        idx = range(lo, min(lo + group, len(starts)))
        data = [teacher_sample(teacher, n_pop, seed + r) for r in idx]
        X = torch.stack([a[0] for a in data])
        y = torch.stack([a[1] for a in data])
        if betas is None:
            fits = newton_fits(teacher, loss, X, y, start=starts[lo:lo + len(idx)].double(),
                               weight_decay=weight_decay, gtol=gtol, max_iter=max_iter)
            thetas.append(torch.cat([fits.params[k].flatten(1) for k, _ in teacher.named_parameters()], 1))
            infos.append({key: getattr(fits, key) for key in ("grad_max", "min_eig", "minimum", "steps", "drift")})
        else:
            d, h, k = teacher[0].in_features, teacher[0].out_features, teacher[2].out_features
            sp = smooth_polish(starts[lo:lo + len(idx)].double(), X, y, loss, d=d, h=h, k=k, weight_decay=weight_decay,
                               betas=betas, max_iter=max_iter)
            thetas.append(sp.theta)
            infos.append(dict(grad_max=sp.grad_max, min_eig=sp.min_eig, minimum=sp.certified, step_se=sp.step_se))
    info = {key: torch.cat([f[key] for f in infos]) for key in infos[0]}
    return torch.cat(thetas), info


def perturbed_teacher(teacher: nn.Module, scale: float, seed: int) -> nn.Module:
    """A float32 copy of ``teacher`` with every parameter plus ``scale * N(0, 1)`` (seeded): a student
    that starts in the teacher's basin."""
    check_scalar(scale, "scale", kind=Real, low=0.0)
    net = copy.deepcopy(teacher).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def score(centre: np.ndarray, se: np.ndarray, truth: np.ndarray, dof: float | None = None) -> dict:
    r"""A coverage row for 95% intervals ``centre +- q se`` of ``truth``, all ``(R, q)`` (datasets by
    entries; ``truth`` broadcasts): :func:`validation.invariant.coverage_table` (coverage, Wilson
    bounds, intervals, median width) plus the standardised errors :math:`z = (c - t)/se` over the
    entries with an SE: ``z_sd`` (their SD over every interval; 1 for a right SE and centre),
    ``bias_se`` (the median over entries of :math:`|\bar z|`, the mean over datasets: the centre's
    bias in SE units) and ``no_se`` (the share without a finite positive SE, never covered)."""
    centre, se = np.asarray(centre, float), np.asarray(se, float)
    truth = np.broadcast_to(np.asarray(truth, float), centre.shape)
    if centre.shape != se.shape or centre.ndim != 2:
        raise ValueError(f"centre and se must both be (R, q), got {centre.shape} and {se.shape}")
    row = coverage_table(centre, se, truth, dof)
    ok = np.isfinite(se) & (se > 0)
    z = np.where(ok, (centre - truth) / np.where(ok, se, 1.0), np.nan)
    # entries without any SE have no z: they count as never covered (no_se), not in the z summaries
    cols = ok.any(0)
    zbar = np.nanmean(z[:, cols], 0) if cols.any() else np.array([np.nan])
    row.update(z_sd=float(np.nanstd(z[ok], ddof=1)) if ok.sum() > 1 else math.nan,
               bias_se=float(np.nanmedian(np.abs(zbar))) if cols.any() else math.nan,
               no_se=float((~ok).mean()))
    return row


def flat(net: nn.Module) -> Tensor:
    """The network's parameters as one float64 vector (``named_parameters`` order)."""
    return flat_parameters(net)


__all__ = ["expected_coverage", "teacher_sample", "local_optima", "perturbed_teacher", "score", "flat", "NewtonFits"]
