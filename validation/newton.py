r"""Many small penalised fits solved to convergence at once: Newton's method with
a line search on stacked problems, in float64 with exact Hessians.

Problem ``b`` minimises

.. math:: F_b(\theta) = \mathrm{loss}\big(f(X_b; \theta), y_b\big) + \tfrac{\lambda}{2}\|\theta\|^2,

the *mean* training loss on its own data ``(X_b, y_b)`` plus PyTorch's L2
penalty, over every parameter of a small network. A bootstrap refit is the
problem on a resample, a teacher replicate the problem on a fresh dataset, a
polish the problem on the training data itself. Each step takes the saddle-free
Newton direction :math:`-V|\Lambda|^{-1}V^\top\nabla F_b` (:math:`\nabla^2 F_b = V\Lambda V^\top`;
the Newton direction where the Hessian is positive definite, a descent direction scaled by the
curvature's magnitude along negative curvature) and the longest of the steps :math:`4^{-k}`
(k = 0..10) that decreases :math:`F_b` (near a minimum the full step, whose convergence is
quadratic). A line search rather than Levenberg-Marquardt damping: where the quadratic model
fails, a shift towards the gradient would lose the scaling of the weakly curved directions,
which are the ones a standard error is most sensitive to. Every problem has its own budget of
``max_iter`` steps.
A problem has converged when the max-abs gradient of :math:`F_b` is at most
``gtol``; the sampling standard errors of a penalised estimate are only
defined at such a point.

ReLU networks need a second criterion. Their loss has a kink wherever a
sample's pre-activation is 0, and each kink makes the mean-loss gradient jump
by :math:`O(1/n)`; the penalised optimum usually sits on one, so the gradient
never falls below about :math:`10^{-3}` (n = 2000) however long Newton runs.
A problem whose objective stops decreasing (``stall`` consecutive steps with
neither a relative decrease beyond ``ftol`` nor a halved gradient) is therefore
stopped, and the result
carries what decides whether it is an optimum worth a standard error: the
smallest eigenvalue of the (almost-everywhere) Hessian (``min_eig``; negative
at a saddle, which is escaped along its negative direction first) and how far
the problem still moved over the second half of the iterations (``drift``;
:meth:`NewtonFits.converged_within` compares it with the standard errors). The
undamped Newton step would not do: at a kink it measures the one-sided gradient,
not the distance to the optimum.

A hidden unit at zero is a saddle the Hessian cannot see when some direction makes it grow
(its block is :math:`\lambda I`, every sample on its kink); such units are grown along their best
direction and descended again (``births``; :class:`Certificate`). :func:`certify` judges an
endpoint with a kink-aware first-order test (the Newton step in sandwich SEs for the best
subgradient of the kinks the step would cross) and a second-order one.

For one-hidden-layer ReLU networks with weight decay the weakest directions
are known exactly: every unit's rescaling orbit, on which the loss is constant
and the penalty has a closed-form minimum (the *balanced* unit). Each
iteration (and the start) moves every unit there, which Newton alone would
reach only slowly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, hessian, vmap

from mustat._checks import check_option, check_scalar
from mustat._functional import FunctionalModel

Loss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class NewtonFits:
    """Stacked solutions: ``params[name]`` has shape ``(B, *param.shape)``;
    ``grad_max[b]`` is the final max-abs gradient of problem b's penalised mean loss,
    ``converged[b]`` whether it reached ``gtol``, ``iterations`` the most steps any problem took
    (``steps[b]``: problem b's own, each at most ``max_iter``); ``min_eig``,
    ``drift`` and ``minimum`` say whether a stopped problem is an optimum (module notes)."""

    params: dict[str, Tensor]
    grad_max: Tensor
    converged: Tensor
    iterations: int
    min_eig: Tensor
    drift: Tensor
    gtol: float = 0.0
    minimum: Tensor | None = None
    steps: Tensor | None = None

    def drift_over(self, se: Tensor) -> Tensor:
        """``(B,)``: each problem's largest move over the second half of the iterations, in units of
        ``se`` (``(p,)`` or ``(B, p)``, flat; a coordinate with ``se == 0`` must not move)."""
        d = self.drift.abs()
        ratio = torch.where(se > 0, d / se.clamp_min(1e-300), torch.where(d > 0, float("inf"), 0.0))
        return ratio.amax(1)

    def converged_within(self, se: Tensor, tol: float = 0.1) -> Tensor:
        """``(B,)``: at a local minimum (a positive definite Hessian, or a kink where no descent
        along its negative curvature exists: ``minimum``) and no longer moving by more than ``tol``
        standard errors (module notes). An SD over such fits is inflated by at most a factor
        ``sqrt(1 + tol^2)`` (0.5% at 0.1) by optimisation error."""
        minimum = self.min_eig > 0 if self.minimum is None else self.minimum
        return minimum & ((self.grad_max <= self.gtol) | (self.drift_over(se) <= tol))

    @property
    def converged_frac(self) -> float:
        return float(self.converged.double().mean())


def _functional(model: nn.Module, device):
    """The model's float64 functional view on ``device``, its trainable tensors' names, an unflatten
    helper and the flat start (masked entries are held at 0 by the view)."""
    fm = FunctionalModel(model, dtype=torch.float64, device=device)
    names = fm.trainable()
    start = fm.params(names)
    shapes = [start[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]

    def unflatten(theta: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(names, theta.split(sizes, dim=-1), shapes)}

    theta0 = torch.cat([start[n].flatten() for n in names])
    return fm, names, unflatten, theta0


def _one_hidden(model: nn.Module) -> str | None:
    """``"relu"`` or ``"softplus"`` for ``nn.Sequential(Linear, ReLU or Softplus(beta=1, threshold=20), Linear)``
    (plain modules, biases on): the closed-form Hessian applies; else None."""
    if not isinstance(model, nn.Sequential) or len(model) != 3:
        return None
    a, act, b = model
    if not (type(a) is nn.Linear and type(b) is nn.Linear and a.bias is not None and b.bias is not None):
        return None
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is nn.Softplus and act.beta == 1 and act.threshold == 20:   # F.softplus's defaults
        return "softplus"
    return None


def _softplus_beta(model: nn.Module) -> float | None:
    """``beta`` of ``nn.Sequential(Linear, Softplus(beta, threshold=20), Linear)`` (biases on), else None:
    the smooth surrogate of a ReLU network that :func:`smooth_polish` fits."""
    if not isinstance(model, nn.Sequential) or len(model) != 3:
        return None
    a, act, b = model
    if type(a) is nn.Linear and type(b) is nn.Linear and a.bias is not None and b.bias is not None \
            and type(act) is nn.Softplus and act.threshold == 20:
        return float(act.beta)
    return None


def _mlp_hessian(loss: Loss, d: int, h: int, k: int, weight_decay: float, activation: str = "relu",
                 beta: float = 1.0):
    r"""Exact Hessians of the penalised mean loss of ``Linear(d, h) -> ReLU -> Linear(h, k)`` (or
    Softplus), stacked over problems: ``hess(theta (B, p), X (B, n, d), y) -> (B, p, p)``.

    With :math:`a = W_1 x + b_1`, :math:`z = \phi(a)`, :math:`f = W_2 z + b_2`, per-sample
    output gradient :math:`r_i = \partial\ell_i/\partial f` and Hessian
    :math:`\Lambda_i = L_i L_i^\top`, the Hessian is the Gauss-Newton part
    :math:`\frac1n\sum_i (L_i^\top J_i)^\top (L_i^\top J_i)` plus the output's own curvature
    :math:`\frac1n\sum_{i,c} r_{ic}\nabla^2 f_{ic}`: the cross block
    :math:`\partial^2 f_c / \partial W_{2,cj}\,\partial(W_{1,j\cdot}, b_{1,j}) = \phi'(a_j)\,(x, 1)`
    and, for a smooth :math:`\phi`, the per-unit block
    :math:`\partial^2 f_c / \partial(W_{1,j\cdot}, b_{1,j})^2 = W_{2,cj}\,\phi''(a_j)\,(x, 1)(x, 1)^\top`
    (zero almost everywhere for ReLU), plus :math:`\lambda I`. Softplus is
    :math:`\log(1 + e^{\beta a})/\beta` (PyTorch switches to :math:`a` where :math:`\beta a > 20`, where
    :math:`\phi'' < 2\beta\cdot 10^{-9}`).
    Parameter order: ``W1, b1, W2, b2`` (``named_parameters``).
    """
    check_option(activation, "activation", ("relu", "softplus"))
    sizes = [h * d, h, k * h, k]

    def sample_loss(o, t):
        return loss(o[None], t[None])

    out_grad = vmap(vmap(grad(sample_loss)))
    out_hess = vmap(vmap(hessian(sample_loss)))

    def hess(theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        B, n = X.shape[:2]
        W1, b1, W2, b2 = theta.split(sizes, dim=1)
        W1, W2 = W1.view(B, h, d), W2.view(B, k, h)
        a = torch.baddbmm(b1.unsqueeze(1), X, W1.transpose(1, 2))          # (B, n, h)
        if activation == "relu":
            on, z = (a > 0).to(X.dtype), a.clamp_min(0)                     # phi', phi
        else:
            on, z = torch.sigmoid(beta * a), F.softplus(a, beta=beta)
        f = torch.baddbmm(b2.unsqueeze(1), z, W2.transpose(1, 2))          # (B, n, k)
        r = out_grad(f, y).reshape(B, n, k)
        lam = out_hess(f, y).reshape(B, n, k, k)
        evals, evecs = torch.linalg.eigh(0.5 * (lam + lam.transpose(-1, -2)))
        L = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)                # Lambda = L L^T
        # whitened Jacobian rows, one per (sample, factor column c): G = L^T J
        LW = torch.einsum("bnqc,bqj->bncj", L, W2) * on.unsqueeze(2)       # (B, n, k_c, h)
        G_W1 = LW.unsqueeze(-1) * X.unsqueeze(2).unsqueeze(2)              # (B, n, c, h, d)
        G_W2 = L.transpose(-1, -2).unsqueeze(-1) * z.unsqueeze(2).unsqueeze(2)  # (B, n, c, k, h)
        G = torch.cat([G_W1.flatten(3), LW, G_W2.flatten(3), L.transpose(-1, -2)], dim=3)
        G = G.reshape(B, n * k, -1)
        H = G.transpose(1, 2) @ G
        # the residual cross block between W2[c, j] and (W1[j, :], b1[j])
        ron = r.unsqueeze(-1) * on.unsqueeze(2)                            # (B, n, k, h)
        C_W1 = torch.einsum("bnch,bnd->bchd", ron, X)                      # (B, k, h, d)
        C_b1 = ron.sum(1)                                                  # (B, k, h)
        o2, o3 = sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]
        idx = torch.arange(h, device=X.device)
        E = X.new_zeros(B, k, h, h, d)
        E[:, :, idx, idx, :] = C_W1                                        # delta_{jj'} C_W1[c, j, :]
        cross = torch.cat([E.flatten(3), torch.diag_embed(C_b1)], dim=3).reshape(B, k * h, o2)
        H[:, o2:o3, :o2] += cross
        H[:, :o2, o2:o3] += cross.transpose(1, 2)
        if activation == "softplus":
            # the unit's own block: sum_c r_c W2[c, j] phi''(a_j) (x, 1)(x, 1)^T
            w = torch.einsum("bnc,bcj->bnj", r, W2) * beta * on * (1 - on)    # (B, n, h)
            Xt = torch.cat([X, X.new_ones(B, n, 1)], 2)                        # (B, n, d + 1)
            blocks = torch.einsum("bnj,bnd,bne->bjde", w, Xt, Xt)              # (B, h, d + 1, d + 1)
            rows = torch.cat([torch.arange(h * d, device=X.device).view(h, d),
                              h * d + torch.arange(h, device=X.device).view(h, 1)], 1)   # unit j's indices
            H[:, rows.unsqueeze(2), rows.unsqueeze(1)] += blocks
        H = H / n
        return H + weight_decay * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)

    return hess


def _rebalancer(d: int, h: int, k: int):
    """For ``Linear(d, h) -> ReLU -> Linear(h, k)`` under an L2 penalty: move every hidden unit
    along its rescaling orbit ``(c w_in, c b, w_out / c)`` to the penalty's minimum,
    ``c^4 = |w_out|^2 / (|w_in|^2 + b^2)``. The loss is invariant on the orbit, so this is the exact
    minimum along the weakest directions of the problem, which Newton reaches only slowly where
    ReLU kinks spoil its quadratic model; it never increases the objective."""
    sizes = [h * d, h, k * h, k]

    def rebalance(theta: Tensor) -> Tensor:
        W1, b1, W2, b2 = theta.split(sizes, dim=1)
        W1, W2 = W1.reshape(-1, h, d), W2.reshape(-1, k, h)
        a = W1.square().sum(2) + b1.square()
        b = W2.square().sum(1)
        c = torch.where((a > 0) & (b > 0), (b / a.clamp_min(1e-300)).pow(0.25), torch.ones_like(a))
        return torch.cat([(W1 * c.unsqueeze(2)).flatten(1), b1 * c, (W2 / c.unsqueeze(1)).flatten(1), b2], dim=1)

    return rebalance


def _grow_units(theta: Tensor, value: Tensor, X: Tensor, y: Tensor, loss: Loss, d: int, h: int,
                weight_decay: float, value_fn, chunked, gen) -> Tensor:
    """For ``Linear(d, h) -> ReLU -> Linear(h, 1)``: every unit of (relative) scale <= 1e-2 whose birth
    ratio exceeds 1 is set to ``(s u, -sign(G) s)`` along its best direction u (:func:`_birth_search`),
    ``s`` the best of ``2^-m`` (m = 0..30); ``theta`` and ``value`` are updated in place where the
    objective decreases. Returns the problems changed ``(B,)``."""
    B, n = X.shape[:2]
    Xt = torch.cat([X, X.new_ones(B, n, 1)], -1)
    grown = torch.zeros(B, dtype=torch.bool, device=theta.device)
    for j in range(h):
        W1, b1, W2, b2 = theta.split([h * d, h, h, 1], dim=1)
        u = torch.cat([W1.view(B, h, d), b1.unsqueeze(-1)], -1)
        scale = (u.square().sum(-1) + W2.square()).sqrt()
        small = scale[:, j] <= 1e-2 * scale.amax(1)
        if not bool(small.any()):
            continue
        idx = torch.nonzero(small).flatten()
        z = theta[idx].clone()
        z[:, j * d:(j + 1) * d] = 0
        z[:, h * d + j] = 0
        z[:, h * d + h + j] = 0
        with torch.enable_grad():
            zW1, zb1, zW2, zb2 = z.split([h * d, h, h, 1], dim=1)
            a = torch.einsum("bnd,bhd->bnh", X[idx], zW1.view(-1, h, d)) + zb1.unsqueeze(1)
            f = (a.clamp_min(0) @ zW2.unsqueeze(-1)).squeeze(-1) + zb2
            f = f.detach().requires_grad_(True)
            total = sum(loss(f[i][:, None], y[idx[i]]) for i in range(len(idx)))
            res = (torch.autograd.grad(total, f)[0] * n).detach()
        u0 = u[idx, j]
        u0 = torch.where(u0.norm(dim=-1, keepdim=True) > 0, u0, torch.ones_like(u0))
        G, ub = _birth_search(res, Xt[idx], u0, 32, gen)
        grow = G.abs() > weight_decay * (1 + 1e-6)
        if not bool(grow.any()):
            continue
        idx, z, G, ub = idx[grow], z[grow], G[grow], ub[grow]
        ts = [2.0 ** -m for m in range(31)]
        trials = []
        for t in ts:
            c = z.clone()
            c[:, j * d:(j + 1) * d] = t * ub[:, :d]
            c[:, h * d + j] = t * ub[:, d]
            c[:, h * d + h + j] = -torch.sign(G) * t
            trials.append(c)
        vals = torch.stack([chunked(value_fn, c, X[idx], y[idx]) for c in trials], 1)
        best = vals.argmin(1)
        bv = vals[torch.arange(len(idx)), best]
        better = bv < value[idx]
        sel = idx[better]
        theta[sel] = torch.stack(trials, 1)[better, best[better]]
        value[sel] = bv[better]
        grown[sel] = True
    return grown


def newton_fits(
    model: nn.Module,
    loss: Loss,
    X: Tensor,
    y: Tensor,
    *,
    start: Tensor | None = None,
    weight_decay: float = 0.0,
    gtol: float = 1e-8,
    max_iter: int = 100,
    stall: int = 3,
    ftol: float = 1e-9,
    escapes: int = 20,
    births: int = 5,
    chunk: int | None = None,
    max_chunk_bytes: float = 5e8,
) -> NewtonFits:
    """Minimise each problem's penalised mean loss (module notes) to ``gtol``.

    Parameters
    ----------
    model
        The network; only read (a float64, eval-mode copy is differentiated).
    loss
        ``loss(output, target)``: the mean loss of a batch.
    X, y
        Stacked data, ``X`` of shape ``(B, n, ...)`` and ``y`` of shape ``(B, n, ...)``.
    start
        ``(B, p)`` starting points (flat, in ``model.named_parameters()`` order);
        default: every problem starts from the model's own parameters.
    weight_decay
        ``lambda >= 0``, PyTorch's L2 coefficient on the mean loss, on every parameter.
    gtol
        Convergence: max-abs gradient of the penalised mean loss.
    max_iter
        Damped Newton steps at most, for each problem separately; problems still above ``gtol``
        are reported (``converged``), never silently accepted.
    stall, ftol
        Stop a problem after ``stall`` consecutive steps (accepted or not) that decrease its
        objective by less than ``ftol`` relative and do not halve its gradient (module notes:
        ReLU kinks; the objective's own sampling noise is of order ``1/n``, far above ``ftol``).
    escapes
        At most this many moves along negative curvature out of saddle points, each
        followed by a new descent.
    births
        One-hidden-layer ReLU networks with one output and a penalty: at most this many rounds in
        which each unit at zero that some direction would make grow (a saddle the Hessian cannot
        see, :class:`Certificate`) is grown along that direction, followed by a new descent.
    chunk
        Problems differentiated at once (default: as many as fit ``max_chunk_bytes``
        of the Hessian's forward-over-reverse intermediates, roughly).
    """
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)
    check_scalar(gtol, "gtol", kind=Real, low=0.0, closed="neither")
    check_scalar(max_iter, "max_iter", kind=Integral, low=1)
    check_scalar(escapes, "escapes", kind=Integral, low=0)
    check_scalar(births, "births", kind=Integral, low=0)
    if X.ndim < 2 or y.ndim < 2 or len(X) != len(y) or X.shape[1] != y.shape[1]:
        raise ValueError(f"newton_fits needs stacked data X (B, n, ...) and y (B, n, ...), got X {tuple(X.shape)} "
                         f"and y {tuple(y.shape)}")
    fm, names, unflatten, theta0 = _functional(model, X.device)
    work = model
    B, n = X.shape[:2]
    p = len(theta0)
    X = X.to(torch.float64) if X.is_floating_point() else X
    y = y.to(torch.float64) if y.is_floating_point() else y
    theta = theta0.expand(B, p).clone() if start is None else start.to(X.device, torch.float64).clone()
    if theta.shape != (B, p):
        raise ValueError(f"start must have shape (B, p) = ({B}, {p}), got {tuple(theta.shape)}")

    def objective(th: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        out = fm(unflatten(th), xb)
        return loss(out, yb) + 0.5 * weight_decay * th.square().sum()

    value_fn = vmap(objective)

    def grad_fn(th: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
        # problems are independent, so one backward through their summed objectives gives each
        # problem's own gradient (several times faster than vmap(grad(...)))
        with torch.enable_grad():
            th = th.detach().requires_grad_(True)
            return torch.autograd.grad(value_fn(th, xs, ys).sum(), th)[0]

    hess_fn = vmap(hessian(objective))
    per_problem = 8 * p * n * max(p, int(X[0, 0].numel()), 16) * 2  # torch.func's forward-over-reverse
    rebalance = None
    activation, beta = _one_hidden(work), 1.0
    if activation is None and _softplus_beta(work) is not None:
        activation, beta = "softplus", _softplus_beta(work)
    if activation is not None:
        d, h, k = work[0].in_features, work[0].out_features, work[2].out_features
        hess_fn = _mlp_hessian(loss, d, h, k, weight_decay, activation, beta)
        if weight_decay > 0 and activation == "relu":   # a smooth activation has no rescaling orbit
            rebalance = _rebalancer(d, h, k)
        per_problem = 8 * n * k * (p + h * d) * 3  # the whitened Jacobian and its pieces
    if chunk is None:
        chunk = max(1, int(max_chunk_bytes // per_problem))

    def chunked(fn, th, xs, ys):
        return torch.cat([fn(th[i : i + chunk], xs[i : i + chunk], ys[i : i + chunk]) for i in range(0, len(th), chunk)])

    if rebalance is not None:
        theta = rebalance(theta)
    value = chunked(value_fn, theta, X, y)
    g = chunked(grad_fn, theta, X, y)
    dev = theta.device
    # every problem has its own budget of max_iter steps (a shared count let one slow problem use up
    # the others' steps, and a problem stopped by it was never checked for descent along negative
    # curvature: most of the "not a minimum" endpoints of docs/calibration/invariant.md)
    steps = torch.zeros(B, dtype=torch.long, device=dev)
    halfway = theta.clone()
    ts = torch.tensor([4.0 ** -k for k in range(11)], dtype=torch.float64, device=dev)

    def descend(active: Tensor) -> None:
        stalled = torch.zeros(B, dtype=torch.long, device=dev)
        active = active & (steps < max_iter)
        while bool(active.any()):
            idx = torch.nonzero(active).flatten()
            steps[idx] += 1
            mid = idx[steps[idx] == max_iter // 2 + 1]
            halfway[mid] = theta[mid]
            th, xs, ys, gg = theta[idx], X[idx], y[idx], g[idx]
            H = chunked(hess_fn, th, xs, ys)
            H = 0.5 * (H + H.transpose(1, 2))
            # saddle-free Newton (Dauphin et al. 2014): -V |Lambda|^-1 V^T g, the Newton step where H is
            # positive definite and a descent step scaled by |curvature| along negative curvature. The
            # damped step it replaces, -(H + mu I)^-1 g with mu just above -lambda_min, was huge along
            # a nearly flat negative direction (a weak unit that the penalty almost collapses), every
            # step of the line search overshot, and the problem stalled off a minimum
            evals, evecs = torch.linalg.eigh(H)
            floor = 1e-10 * evals.abs().amax(1, keepdim=True).clamp_min(1e-12)
            inv = 1.0 / evals.abs().clamp_min(floor)
            direction = -(evecs @ (inv.unsqueeze(-1) * (evecs.transpose(1, 2) @ gg.unsqueeze(-1)))).squeeze(-1)
            # a line search along the Newton direction: where kinks spoil the quadratic model,
            # shorter steps in the same direction keep the weakly curved directions' scaling,
            # which a shift towards the gradient (Levenberg-Marquardt) would lose
            trials = th[:, None, :] + ts[None, :, None] * direction[:, None, :]
            vals = torch.stack([chunked(value_fn, trials[:, j], xs, ys) for j in range(len(ts))], 1)
            # the longest step whose value ties the best within float64 rounding: near the optimum
            # every trial ties, and the full Newton step is the one that shrinks the gradient
            rounding = 16 * torch.finfo(torch.float64).eps * value[idx].abs().clamp_min(1.0)
            best = (vals <= vals.min(1, keepdim=True).values + rounding[:, None]).to(torch.int8).argmax(1)
            new_value = vals[torch.arange(len(idx), device=dev), best]
            trial = trials[torch.arange(len(idx), device=dev), best]
            new_g = chunked(grad_fn, trial, xs, ys)
            # near the optimum the decrease falls below float64 rounding of the value: then
            # a step that shrinks the gradient is still progress
            accept = (new_value < value[idx]) | (
                (new_value <= value[idx] + rounding) & (new_g.abs().amax(1) < gg.abs().amax(1)))
            # progress: a real decrease, or (near a smooth optimum, where the decrease is below
            # ftol but Newton converges quadratically) a halved gradient
            progress = (new_value < value[idx] - ftol * value[idx].abs().clamp_min(1.0)) | (
                accept & (new_g.abs().amax(1) <= 0.5 * gg.abs().amax(1)))
            stalled[idx] = torch.where(progress, torch.zeros_like(stalled[idx]), stalled[idx] + 1)
            theta[idx] = torch.where(accept[:, None], trial, th)
            value[idx] = torch.where(accept, new_value, value[idx])
            g[idx] = torch.where(accept[:, None], new_g, gg)
            if rebalance is not None:
                balanced = rebalance(theta[idx])
                b_value = chunked(value_fn, balanced, xs, ys)
                better = b_value < value[idx]
                if bool(better.any()):
                    sel = idx[better]
                    theta[sel] = balanced[better]
                    value[sel] = b_value[better]
                    g[sel] = chunked(grad_fn, theta[sel], X[sel], y[sel])
            active = (g.abs().amax(1) > gtol) & (stalled < stall) & (steps < max_iter)

    descend(g.abs().amax(1) > gtol)
    no_descent = torch.zeros(B, dtype=torch.bool, device=dev)
    escape_ts = torch.tensor([c * 2.0 ** -k for k in range(31) for c in (1.0, -1.0)], dtype=torch.float64, device=dev)
    min_eig = torch.zeros(B, dtype=torch.float64, device=dev)

    def settle() -> None:
        """A stationary point with negative curvature is a saddle (for example a hidden unit that
        collapsed to zero): move along the most negative direction, then descend again."""
        for e in range(escapes + 1):
            H = chunked(hess_fn, theta, X, y)
            H = 0.5 * (H + H.transpose(1, 2))
            evals, evecs = torch.linalg.eigh(H)
            min_eig.copy_(evals[:, 0])
            saddle = min_eig < -1e-10 * evals[:, -1].abs().clamp_min(1e-12)
            if e == escapes or not bool(saddle.any()):
                break
            idx = torch.nonzero(saddle).flatten()
            v = evecs[idx, :, 0]
            trials = theta[idx, None, :] + escape_ts[None, :, None] * v[:, None, :]           # (b, T, p)
            vals = torch.stack([chunked(value_fn, trials[:, j], X[idx], y[idx]) for j in range(len(escape_ts))], 1)
            best = vals.argmin(1)
            better = vals[torch.arange(len(idx), device=dev), best] < value[idx]
            no_descent[idx] = ~better  # no descent along negative curvature: a minimum on a ReLU kink
            # a problem whose budget is spent is classified, not moved (it stays "not a minimum")
            better &= steps[idx] < max_iter
            moved = idx[better]
            if not len(moved):
                break
            theta[moved] = trials[better, best[better]]
            value[moved] = vals[better, best[better]]
            g[moved] = chunked(grad_fn, theta[moved], X[moved], y[moved])
            active = torch.zeros(B, dtype=torch.bool, device=dev)
            active[moved] = True
            descend(active)

    settle()
    if rebalance is not None and k == 1:
        # a unit at zero is a saddle when some direction makes it grow (|G(u)| > lambda, see
        # certify): its block of the almost-everywhere Hessian is lambda I there, so neither Newton
        # nor the escapes see it; grow it along the best direction, then descend again
        gen = torch.Generator().manual_seed(0)
        for _ in range(births):
            grown = _grow_units(theta, value, X, y, loss, d, h, weight_decay, value_fn, chunked, gen)
            grown &= steps < max_iter
            if not bool(grown.any()):
                break
            g[grown] = chunked(grad_fn, theta[grown], X[grown], y[grown])
            descend(grown)
            settle()
    grad_max = g.abs().amax(1)
    shapes = [t.shape for t in unflatten(theta0).values()]
    parts = theta.split([math.prod(s) for s in shapes], dim=1)
    params = {name: t.reshape(B, *s) for name, t, s in zip(names, parts, shapes)}
    drift = torch.where((steps > max_iter // 2)[:, None], theta - halfway, torch.zeros_like(theta))
    return NewtonFits(params, grad_max, grad_max <= gtol, int(steps.max()), min_eig, drift, gtol,
                      (min_eig > 0) | no_descent, steps)


def flat_parameters(model: nn.Module) -> Tensor:
    """The model's parameters as one float64 vector, in ``named_parameters()`` order (what
    :func:`newton_fits` takes as ``start``)."""
    return torch.cat([p.detach().to(torch.float64).flatten() for p in model.parameters()])


def load_flat(model: nn.Module, theta: Tensor) -> nn.Module:
    """A float64 copy of ``model`` with its parameters set from the flat vector ``theta``."""
    out = copy.deepcopy(model).to(torch.float64)
    total = sum(p.numel() for p in out.parameters())
    if total != len(theta):
        raise ValueError(f"theta has {len(theta)} entries but the model has {total} parameters")
    with torch.no_grad():
        start = 0
        for p in out.parameters():
            p.copy_(theta[start : start + p.numel()].view_as(p))
            start += p.numel()
    return out


@dataclass(frozen=True)
class Certificate:
    r"""Whether each endpoint of a one-hidden-layer ReLU network's penalised fit is a local minimum
    worth a standard error (:func:`certify`); every field is ``(B,)`` unless stated.

    ``certified = (step_se <= tol) & second_order & ~saddle_at_zero``, where

    * ``step_se`` (first order, kink-aware): the largest Newton step
      :math:`|(|H|^{-1} \gamma)_j|` in units of the parameter's sandwich SE :math:`se_j`, for the
      subgradient :math:`\gamma = \nabla F + \sum_{(i,j)\in K} s_{ij} c_{ij}`, :math:`s \in [0, 1]^K`,
      that makes it smallest (a linear programme, ``scipy.optimize.linprog``; zero units' coordinates,
      whose SE is 0, are left out: the birth test judges them).
      :math:`K` holds the (sample, unit) pairs whose pre-activation the plain Newton step would
      carry across 0, and :math:`c_{ij} = \mp \frac1n r_i w_{out,j} \tilde x_i` (in unit j's
      ``(w_in, b)`` coordinates) switches sample i's contribution to unit j off (if on) or on:
      the Clarke subdifferential of the kink. Away from kinks it is the plain Newton step
      (``step_plain_se``). A ReLU optimum usually sits on a kink, where the one-sided gradient
      jumps by :math:`O(1/n)` and the plain step stays near 0.2-0.6 SE however long Newton runs.
      ``grad_max``: the raw max-abs gradient, for the record.
    * ``min_eig``: the smallest eigenvalue of the exact (almost-everywhere) penalised Hessian
      :math:`H`: the Gauss-Newton part, the residual cross terms and :math:`\lambda I`.
      ``second_order = (min_eig > 0) | (min_eig_tangent > 0 & ~descent)``: at a kink minimum the
      one-sided :math:`H` may be indefinite across the kink, so the certificate then asks for a
      positive definite :math:`H` on the kinks' tangent space (``min_eig_tangent``: the directions
      that keep every pair of :math:`K` on its kink) and for no decrease of :math:`F` along
      :math:`\pm t v`, :math:`t = 2^{-m}` (m = 0..30), for every eigenvector :math:`v` of a negative
      eigenvalue (``descent`` is True where one is found).
    * ``dead[b, j]``: unit j is exactly zero. Its block of ``H`` is then :math:`\lambda I` (every
      sample on its kink), which says nothing: the origin is a local minimum of the unit iff no
      direction makes it grow, :math:`\max_u |\bar G(u)| < \lambda`,
      :math:`\bar G(u) = \frac1n\sum_i r_i\,\mathrm{relu}(u^\top \tilde x_i)` over unit vectors
      ``u`` (``r``: the output gradient of each sample's loss). ``birth[b, j]`` is that maximum over
      :math:`\lambda`, by fixed-point ascent :math:`u \leftarrow \bar m(u)/|\bar m(u)|` from
      ``starts`` directions (a search: a larger value elsewhere is not excluded); NaN for live
      units. ``saddle_at_zero``: some dead unit has ``birth > 1``.
    * ``weak_unit``: the unit carrying most of the eigenvector of ``min_eig``; ``weak_share`` that
      share, ``weak_scale`` its norm :math:`\sqrt{|w_{in}|^2 + b^2 + |w_{out}|^2}`, ``weak_birth`` its
      birth ratio *at zero* (everything else fixed): above 1 the unit cannot collapse, so a
      negative ``min_eig`` on a small unit is a weak unit still growing towards a small optimum.
    * ``kinks``: the size of :math:`K`.
    * ``se (B, p)``: the sandwich SEs of the parameters (:math:`|H|^{-1} J |H|^{-1} / n`; 0 on zero units).
    """

    certified: Tensor
    step_se: Tensor
    step_plain_se: Tensor
    grad_max: Tensor
    min_eig: Tensor
    min_eig_tangent: Tensor
    descent: Tensor
    second_order: Tensor
    dead: Tensor
    birth: Tensor
    saddle_at_zero: Tensor
    weak_unit: Tensor
    weak_share: Tensor
    weak_scale: Tensor
    weak_birth: Tensor
    kinks: Tensor
    tol: float
    se: Tensor | None = None

    def verdicts(self) -> list[str]:
        """One line per problem: why it is (not) certified."""
        out = []
        for b in range(len(self.certified)):
            if bool(self.certified[b]):
                dead = int(self.dead[b].sum())
                kink = "" if float(self.min_eig[b]) > 0 else " (on a kink: H indefinite across it, no descent)"
                out.append("certified minimum" + kink + (f" ({dead} unit(s) at zero, birth < 1)" if dead else ""))
                continue
            why = []
            if not bool(self.second_order[b]):
                why.append(f"min eig {float(self.min_eig[b]):.2g} (tangent {float(self.min_eig_tangent[b]):.2g}, "
                           f"descent {'found' if bool(self.descent[b]) else 'none'}) on unit {int(self.weak_unit[b])} "
                           f"({float(self.weak_share[b]):.0%} of it; scale {float(self.weak_scale[b]):.2g}, "
                           f"birth at zero {float(self.weak_birth[b]):.2f})")
            if not float(self.step_se[b]) <= self.tol:
                why.append(f"Newton step {float(self.step_se[b]):.2g} SE (plain {float(self.step_plain_se[b]):.2g}, "
                           f"{int(self.kinks[b])} kink pairs)")
            if bool(self.saddle_at_zero[b]):
                why.append("a zero unit can grow (birth > 1)")
            out.append("; ".join(why))
        return out


def _birth_search(res: Tensor, Xt: Tensor, u0: Tensor, starts: int, generator) -> tuple[Tensor, Tensor]:
    """``G = mean(res * relu(Xt u))`` of largest magnitude over unit vectors u, by fixed-point ascent
    (``u <- m(u) / |m(u)|``, ``m(u) = mean(+-res * 1[Xt u > 0] Xt)``) from ``u0 (B, d+1)`` and
    ``starts - 1`` seeded random directions, for both signs of ``res (B, n)``; ``Xt (B, n, d+1)``.
    Returns the signed ``G (B,)`` and its direction ``u (B, d+1)``."""
    B, n, q = Xt.shape
    U = torch.randn(B, starts, q, dtype=Xt.dtype, generator=generator).to(Xt.device)
    U[:, 0] = u0
    best, best_u = Xt.new_zeros(B), Xt.new_zeros(B, q)
    for sign in (1.0, -1.0):
        u = U / U.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        r = sign * res
        for _ in range(100):
            on = (torch.einsum("bnq,bsq->bsn", Xt, u) > 0).to(Xt.dtype)          # (B, S, n)
            m = torch.einsum("bsn,bn,bnq->bsq", on, r, Xt) / n
            new = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            done = bool((new - u).abs().amax() < 1e-12)
            u = new
            if done:
                break
        G = (torch.einsum("bnq,bsq->bsn", Xt, u).clamp_min(0) * r.unsqueeze(1)).mean(2)   # (B, S)
        val, at = G.max(1)
        take = val > best.abs()
        best = torch.where(take, sign * val, best)
        best_u = torch.where(take[:, None], u[torch.arange(B), at], best_u)
    return best, best_u


def _birth_ratio(res: Tensor, Xt: Tensor, weight_decay: float, u0: Tensor, starts: int, generator) -> Tensor:
    """``max_u |mean(res * relu(Xt u))| / lambda`` (:func:`_birth_search`)."""
    return _birth_search(res, Xt, u0, starts, generator)[0].abs() / weight_decay


def certify(theta: Tensor, X: Tensor, y: Tensor, loss: Loss, *, d: int, h: int, k: int = 1, weight_decay: float,
            tol: float = 0.1, starts: int = 32, seed: int = 0) -> Certificate:
    r"""Certify the endpoints ``theta (B, p)`` of penalised fits of ``Linear(d, h) -> ReLU ->
    Linear(h, k)`` (flat, ``named_parameters`` order) on ``X (B, n, d)``, ``y (B, n)`` as local
    minima (:class:`Certificate` states the statistics and the tests).

    Parameters
    ----------
    loss
        ``loss(output, target)``: the mean loss of a batch, as given to :func:`newton_fits`.
    weight_decay
        :math:`\lambda > 0`, PyTorch's L2 coefficient on the mean loss (the birth test needs a penalty).
    tol
        The largest Newton step allowed, in sandwich SEs (0.1: an SD over such fits is inflated by
        at most 0.5%, :meth:`NewtonFits.converged_within`).
    starts, seed
        Directions of the birth search, and their seed.
    """
    import numpy as np
    from scipy.optimize import linprog
    from torch.func import grad as fgrad

    from validation.invariant import forward

    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0, closed="neither")
    check_scalar(tol, "tol", kind=Real, low=0.0, closed="neither")
    check_scalar(starts, "starts", kind=Integral, low=1)
    if k != 1:
        raise ValueError(f"certify is for one output (k = 1), got k = {k}")
    p = h * d + h + k * h + k
    if theta.ndim != 2 or theta.shape[1] != p or X.ndim != 3 or X.shape[0] != theta.shape[0] or X.shape[2] != d \
            or y.shape[:2] != X.shape[:2]:
        raise ValueError(f"certify needs theta (B, p={p}), X (B, n, d={d}) and y (B, n); got theta "
                         f"{tuple(theta.shape)}, X {tuple(X.shape)}, y {tuple(y.shape)}")
    theta, X = theta.double(), X.double()
    y = y.double() if y.is_floating_point() else y
    B, n = X.shape[:2]
    H = _mlp_hessian(loss, d, h, k, weight_decay)(theta, X, y)
    H = 0.5 * (H + H.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(H)

    def sample_loss(t, x, target):
        return loss(forward(t, x[None], d, h, k), target[None])

    def objective(th: Tensor) -> Tensor:                                     # (B,) at th (B, p)
        out = torch.stack([forward(th[b], X[b], d, h, k)[:, 0] for b in range(B)])
        return torch.stack([loss(out[b][:, None], y[b]) for b in range(B)]) + 0.5 * weight_decay * th.square().sum(1)

    scores = vmap(vmap(fgrad(sample_loss), in_dims=(None, 0, 0)))(theta, X, y) + weight_decay * theta[:, None]
    g = scores.mean(1)
    J = scores.transpose(1, 2) @ scores / n
    floor = 1e-12 * evals.abs().amax(1, keepdim=True).clamp_min(1e-300)
    inv = evecs @ torch.diag_embed(1.0 / evals.abs().clamp_min(floor)) @ evecs.transpose(1, 2)   # |H|^-1
    se = (torch.diagonal(inv @ J @ inv, dim1=1, dim2=2) / n).clamp_min(0).sqrt()
    step = (inv @ g.unsqueeze(-1)).squeeze(-1)

    W1, b1, W2, _ = theta.split([h * d, h, k * h, k], dim=1)
    W1, W2 = W1.view(B, h, d), W2.view(B, k, h)
    u = torch.cat([W1, b1.unsqueeze(-1)], -1)                                        # (B, h, d+1)
    scale = (u.square().sum(-1) + W2.square().sum(1)).sqrt()                         # (B, h)
    dead = scale <= 1e-6 * scale.amax(1, keepdim=True)          # a collapsed unit (Newton leaves ~1e-15)
    # a dead unit's coordinates carry no SE (its scores vanish): the birth test judges them instead
    unit_of = torch.cat([torch.arange(h).repeat_interleave(d), torch.arange(h), torch.arange(h), torch.tensor([-1])])
    dead_coord = torch.where(unit_of >= 0, dead[:, unit_of.clamp_min(0)], torch.zeros(B, p, dtype=torch.bool))
    se = torch.where(dead_coord, torch.zeros_like(se), se)
    step = torch.where(dead_coord, torch.zeros_like(step), step)

    def in_se(v: Tensor, s: Tensor) -> Tensor:
        return torch.where(s > 0, v.abs() / s.clamp_min(1e-300), torch.where(v != 0, torch.inf, 0.0)).amax(-1)

    step_plain = in_se(step, se)
    Xt = torch.cat([X, X.new_ones(B, n, 1)], -1)
    a = torch.einsum("bnq,bhq->bnh", Xt, u)
    du = torch.cat([step[:, :h * d].view(B, h, d), step[:, h * d:h * d + h].unsqueeze(-1)], -1)
    a_new = a - torch.einsum("bnq,bhq->bnh", Xt, du)
    cross = ((a > 0) != (a_new > 0)) & ~dead.unsqueeze(1)                             # (B, n, h)
    with torch.enable_grad():
        out = torch.stack([forward(theta[b], X[b], d, h, k)[:, 0] for b in range(B)]).requires_grad_(True)
        total = sum(loss(out[b][:, None], y[b]) for b in range(B))
        res_full = (torch.autograd.grad(total, out)[0] * n).detach()                   # dl_i / df_i
    step_se = step_plain.clone()
    tangent = evals[:, 0].clone()
    kinks = cross.sum((1, 2)).clone()
    for b in range(B):
        crossing = cross[b].clone()
        best_x, best_C = None, None
        for _ in range(4):   # the crossing set grows with the step it implies (at most 4 rounds)
            pairs = torch.nonzero(crossing)                                        # (K, 2): sample, unit
            if not len(pairs):
                break
            C = theta.new_zeros(p, len(pairs))
            sign = torch.where(a[b, pairs[:, 0], pairs[:, 1]] > 0, -1.0, 1.0)
            coef = sign * res_full[b, pairs[:, 0]] * W2[b, 0, pairs[:, 1]] / n
            cols = torch.arange(len(pairs))
            for q in range(d):
                C[pairs[:, 1] * d + q, cols] = coef * X[b, pairs[:, 0], q]
            C[h * d + pairs[:, 1], cols] = coef
            live = se[b] > 0
            A = ((inv[b] @ C)[live] / se[b][live, None]).numpy()
            rhs = -((inv[b] @ g[b])[live] / se[b][live]).numpy()
            # min over s in [0, 1]^K of max_j |A s - rhs|_j: a linear programme in (s, t)
            K, m = A.shape[1], A.shape[0]
            ones = np.ones((m, 1))
            sol = linprog(np.r_[np.zeros(K), 1.0], A_ub=np.block([[A, -ones], [-A, -ones]]), b_ub=np.r_[rhs, -rhs],
                          bounds=[(0.0, 1.0)] * K + [(0.0, None)], method="highs")
            if not sol.success:
                break
            x = sol.x[:K]
            new_step = torch.where(dead_coord[b], 0.0, inv[b] @ (g[b] + C @ torch.as_tensor(x)))
            size = in_se(new_step, se[b])
            if size < step_se[b]:
                step_se[b], best_x, best_C = size, x, C
            kinks[b] = len(pairs)
            du_b = torch.cat([new_step[:h * d].view(h, d), new_step[h * d:h * d + h].unsqueeze(-1)], -1)
            more = crossing | (((a[b] > 0) != (a[b] - Xt[b] @ du_b.T > 0)) & ~dead[b].unsqueeze(0))
            if bool((more == crossing).all()):
                break
            crossing = more
        if best_x is None:
            continue
        # the kinks' tangent space: directions keeping a_ij = 0 for the interior multipliers
        interior = torch.as_tensor((best_x > 1e-9) & (best_x < 1 - 1e-9))
        Nrm = best_C[:, interior]
        if Nrm.shape[1]:
            Q, _ = torch.linalg.qr(Nrm, mode="complete")
            rank = int(torch.linalg.matrix_rank(Nrm))
            T = Q[:, rank:]
            tangent[b] = torch.linalg.eigvalsh(T.T @ H[b] @ T)[0] if T.shape[1] else torch.inf
    # no descent along any direction of negative curvature (a kink minimum), else a saddle
    value = objective(theta)
    descent = torch.zeros(B, dtype=torch.bool)
    for e in range(p):
        neg = evals[:, e] < 0
        if not bool(neg.any()):
            break
        for t in [2.0 ** -m for m in range(31)]:
            for sgn in (1.0, -1.0):
                trial = theta + sgn * t * evecs[:, :, e]
                descent |= neg & (objective(trial) < value - 1e-15 * value.abs())
    min_eig = evals[:, 0]
    second_order = (min_eig > 0) | ((tangent > 0) & ~descent)
    v = evecs[:, :, 0]
    share = torch.stack([v[:, j * d:(j + 1) * d].square().sum(1) + v[:, h * d + j].square()
                         + v[:, h * d + h + j].square() for j in range(h)], 1)               # (B, h)
    weak = share.argmax(1)
    rows = torch.arange(B)
    gen = torch.Generator().manual_seed(seed)
    birth = torch.full((B, h), math.nan, dtype=torch.float64)

    def ratio_at_zero(j: Tensor) -> Tensor:
        """Birth ratio of unit j[b] of each problem with that unit zeroed (everything else fixed)."""
        z = theta.clone()
        for b in range(B):
            jj = int(j[b])
            z[b, jj * d:(jj + 1) * d] = 0
            z[b, h * d + jj] = 0
            z[b, h * d + h + jj] = 0
        with torch.enable_grad():
            out = torch.stack([forward(z[b], X[b], d, h, k)[:, 0] for b in range(B)]).requires_grad_(True)
            total = sum(loss(out[b][:, None], y[b]) for b in range(B))
            res = torch.autograd.grad(total, out)[0] * n
        u0 = u[rows, j]
        u0 = torch.where(u0.norm(dim=-1, keepdim=True) > 0, u0, torch.ones_like(u0))
        return _birth_ratio(res.detach(), Xt, weight_decay, u0, starts, gen)

    for j in range(h):
        if bool(dead[:, j].any()):
            birth[:, j] = torch.where(dead[:, j], ratio_at_zero(torch.full((B,), j)), birth[:, j])
    weak_birth = ratio_at_zero(weak)
    saddle_at_zero = (dead & (birth > 1)).any(1)
    certified = (step_se <= tol) & second_order & ~saddle_at_zero
    return Certificate(certified, step_se, step_plain, g.abs().amax(1), min_eig, tangent, descent, second_order,
                       dead, birth, saddle_at_zero, weak, share[rows, weak], scale[rows, weak], weak_birth, kinks,
                       float(tol), se)


@dataclass(frozen=True)
class SmoothPolish:
    r"""The optimum of the smooth surrogate of a ReLU network's penalised objective
    (:func:`smooth_polish`); every field is ``(B,)`` unless stated.

    ``theta (B, p)``: the surrogate's optimum; ``grad_max``: its max-abs gradient; ``step_se``: the
    largest Newton step :math:`|(H_\beta^{-1}\nabla F_\beta)_j|` in the surrogate's sandwich SEs;
    ``min_eig``: the smallest eigenvalue of the surrogate's exact Hessian :math:`H_\beta`;
    ``certified = (step_se <= tol) & (min_eig > 0)``: a strict local minimum of the surrogate,
    certified without any kink caveat. The difference from ReLU, measured: ``relu_gap`` (the ReLU
    objective at ``theta`` minus at the ReLU endpoint it started from; negative where the surrogate
    found a lower ReLU point) and ``moved_se`` (the largest move from that endpoint, in sandwich SEs).
    """

    theta: Tensor
    grad_max: Tensor
    step_se: Tensor
    min_eig: Tensor
    certified: Tensor
    relu_gap: Tensor
    moved_se: Tensor
    beta: float
    tol: float


def smooth_polish(theta: Tensor, X: Tensor, y: Tensor, loss: Loss, *, d: int, h: int, k: int = 1,
                  weight_decay: float, betas: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0),
                  max_iter: int = 100, tol: float = 0.01) -> SmoothPolish:
    r"""Continue ReLU fits ``theta (B, p)`` (flat, ``named_parameters`` order; data ``X (B, n, d)``,
    ``y (B, n)``) on the smooth surrogate :math:`\mathrm{relu} \approx \log(1 + e^{\beta a})/\beta`,
    through the increasing ``betas`` (continuation: each stage starts at the last optimum), by
    :func:`newton_fits` with the exact closed-form Hessian; then certify the last stage's optimum
    (:class:`SmoothPolish`). The surrogate differs from ReLU by at most :math:`\log 2/\beta` in each
    unit's output, and it has no kinks, so its gradient vanishes at the optimum and its Hessian is
    the whole second-order story.

    Parameters
    ----------
    weight_decay
        :math:`\lambda \ge 0`, PyTorch's L2 coefficient on the mean loss.
    betas
        Increasing sharpnesses, each > 0.
    max_iter
        Newton steps per stage.
    tol
        The largest Newton step allowed at the last stage, in the surrogate's sandwich SEs.
    """
    from torch.func import grad as fgrad

    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)
    check_scalar(tol, "tol", kind=Real, low=0.0, closed="neither")
    betas = tuple(float(b) for b in betas)
    if not betas or any(b <= 0 for b in betas) or list(betas) != sorted(betas):
        raise ValueError(f"betas must be a non-empty increasing sequence of positive numbers, got {betas}")
    p = h * d + h + k * h + k
    if theta.ndim != 2 or theta.shape[1] != p or X.ndim != 3 or X.shape[0] != theta.shape[0] or X.shape[2] != d:
        raise ValueError(f"smooth_polish needs theta (B, p={p}) and X (B, n, d={d}); got theta {tuple(theta.shape)}, "
                         f"X {tuple(X.shape)}")
    X = X.double()
    y = y.double() if y.is_floating_point() else y
    B, n = X.shape[:2]
    start = theta.double().clone()
    th = start.clone()
    for beta in betas:
        net = nn.Sequential(nn.Linear(d, h), nn.Softplus(beta=beta), nn.Linear(h, k)).double()
        fits = newton_fits(net, loss, X, y, start=th, weight_decay=weight_decay, gtol=1e-12, max_iter=max_iter)
        th = torch.cat([fits.params[name].flatten(1) for name, _ in net.named_parameters()], 1)
    beta = betas[-1]
    H = _mlp_hessian(loss, d, h, k, weight_decay, "softplus", beta)(th, X, y)
    H = 0.5 * (H + H.transpose(1, 2))
    evals = torch.linalg.eigvalsh(H)

    def fwd(t, x, act):
        W1, b1, W2, b2 = t.split([h * d, h, k * h, k])
        a = x @ W1.view(h, d).T + b1
        return act(a) @ W2.view(k, h).T + b2

    def smooth(a):
        return F.softplus(a, beta=beta)

    def sample_loss(t, x, target):
        return loss(fwd(t, x[None], smooth), target[None])

    scores = vmap(vmap(fgrad(sample_loss), in_dims=(None, 0, 0)))(th, X, y) + weight_decay * th[:, None]
    g = scores.mean(1)
    J = scores.transpose(1, 2) @ scores / n
    Hinv = torch.linalg.pinv(H)
    se = (torch.diagonal(Hinv @ J @ Hinv, dim1=1, dim2=2) / n).clamp_min(0).sqrt()
    step = (Hinv @ g.unsqueeze(-1)).squeeze(-1)

    def in_se(v):
        return torch.where(se > 0, v.abs() / se.clamp_min(1e-300), torch.where(v != 0, torch.inf, 0.0)).amax(-1)

    def relu_objective(t):
        return torch.stack([loss(fwd(t[b], X[b], lambda a: a.clamp_min(0)), y[b]) for b in range(B)]) \
            + 0.5 * weight_decay * t.square().sum(1)

    step_se = in_se(step)
    certified = (step_se <= tol) & (evals[:, 0] > 0)
    return SmoothPolish(th, g.abs().amax(1), step_se, evals[:, 0], certified, relu_objective(th) - relu_objective(start),
                        in_se(th - start), beta, float(tol))
