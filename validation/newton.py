r"""Many small penalised fits solved to convergence at once: Newton's method with
a line search on stacked problems, in float64 with exact Hessians.

Problem ``b`` minimises

.. math:: F_b(\theta) = \mathrm{loss}\big(f(X_b; \theta), y_b\big) + \tfrac{\lambda}{2}\|\theta\|^2,

the *mean* training loss on its own data ``(X_b, y_b)`` plus PyTorch's L2
penalty, over every parameter of a small network. A bootstrap refit is the
problem on a resample, a teacher replicate the problem on a fresh dataset, a
polish the problem on the training data itself. Each step takes the Newton
direction :math:`-(\nabla^2 F_b + \mu_b I)^{-1}\nabla F_b`, with damping
:math:`\mu_b > 0` only where the Hessian is not positive definite, and the
longest of the steps :math:`4^{-k}` (k = 0..6) that decreases :math:`F_b`
(near a minimum the full step, whose convergence is quadratic). A line search
rather than Levenberg-Marquardt damping: where the quadratic model fails, a
shift towards the gradient would lose the scaling of the weakly curved
directions, which are the ones a standard error is most sensitive to.
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
    ``converged[b]`` whether it reached ``gtol``, ``iterations`` the steps taken; ``min_eig``,
    ``drift`` and ``minimum`` say whether a stopped problem is an optimum (module notes)."""

    params: dict[str, Tensor]
    grad_max: Tensor
    converged: Tensor
    iterations: int
    min_eig: Tensor
    drift: Tensor
    gtol: float = 0.0
    minimum: Tensor | None = None

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


def _mlp_hessian(loss: Loss, d: int, h: int, k: int, weight_decay: float, activation: str = "relu"):
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
    :math:`\log(1 + e^a)` (PyTorch switches to :math:`a` above 20, where :math:`\phi'' < 2\cdot 10^{-9}`).
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
            on, z = torch.sigmoid(a), F.softplus(a)
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
            w = torch.einsum("bnc,bcj->bnj", r, W2) * on * (1 - on)           # (B, n, h)
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
    escapes: int = 5,
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
        Damped Newton steps at most; problems still above ``gtol`` are reported
        (``converged``), never silently accepted.
    stall, ftol
        Stop a problem after ``stall`` consecutive steps (accepted or not) that decrease its
        objective by less than ``ftol`` relative and do not halve its gradient (module notes:
        ReLU kinks; the objective's own sampling noise is of order ``1/n``, far above ``ftol``).
    escapes
        At most this many moves along negative curvature out of saddle points, each
        followed by a new descent.
    chunk
        Problems differentiated at once (default: as many as fit ``max_chunk_bytes``
        of the Hessian's forward-over-reverse intermediates, roughly).
    """
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)
    check_scalar(gtol, "gtol", kind=Real, low=0.0, closed="neither")
    check_scalar(max_iter, "max_iter", kind=Integral, low=1)
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
    activation = _one_hidden(work)
    if activation is not None:
        d, h, k = work[0].in_features, work[0].out_features, work[2].out_features
        hess_fn = _mlp_hessian(loss, d, h, k, weight_decay, activation)
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
    eye = torch.eye(p, dtype=torch.float64, device=dev)
    it = 0
    halfway = theta.clone()
    ts = torch.tensor([4.0 ** -k for k in range(7)], dtype=torch.float64, device=dev)

    def descend(active: Tensor) -> None:
        nonlocal it
        stalled = torch.zeros(B, dtype=torch.long, device=dev)
        while bool(active.any()) and it < max_iter:
            it += 1
            if it == max_iter // 2 + 1:
                halfway.copy_(theta)
            idx = torch.nonzero(active).flatten()
            th, xs, ys, gg = theta[idx], X[idx], y[idx], g[idx]
            H = chunked(hess_fn, th, xs, ys)
            H = 0.5 * (H + H.transpose(1, 2))
            scale = H.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-12)
            # damping only where H is not positive definite (a saddle or a concave region)
            m = torch.zeros(len(idx), dtype=torch.float64, device=dev)
            for _ in range(60):
                L, info = torch.linalg.cholesky_ex(H + m[:, None, None] * eye)
                bad = info != 0
                if not bool(bad.any()):
                    break
                m = torch.where(bad, torch.maximum(10 * m, 1e-6 * scale), m)
            direction = -torch.cholesky_solve(gg.unsqueeze(-1), L).squeeze(-1)
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
            active = (g.abs().amax(1) > gtol) & (stalled < stall)

    descend(g.abs().amax(1) > gtol)
    no_descent = torch.zeros(B, dtype=torch.bool, device=dev)
    # a stationary point with negative curvature is a saddle (for example a hidden unit that
    # collapsed to zero): move along the most negative direction, then descend again
    for _ in range(escapes + 1):
        H = chunked(hess_fn, theta, X, y)
        H = 0.5 * (H + H.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(H)
        min_eig = evals[:, 0]
        saddle = min_eig < -1e-10 * evals[:, -1].abs().clamp_min(1e-12)
        if _ == escapes or not bool(saddle.any()) or it >= max_iter:
            break
        idx = torch.nonzero(saddle).flatten()
        v = evecs[idx, :, 0]
        ts = torch.tensor([c * 2.0 ** -k for k in range(16) for c in (1.0, -1.0)], dtype=torch.float64, device=dev)
        trials = theta[idx, None, :] + ts[None, :, None] * v[:, None, :]           # (b, T, p)
        vals = torch.stack([chunked(value_fn, trials[:, j], X[idx], y[idx]) for j in range(len(ts))], 1)
        best = vals.argmin(1)
        better = vals[torch.arange(len(idx), device=dev), best] < value[idx]
        moved = idx[better]
        no_descent[idx[~better]] = True  # no descent along negative curvature: a minimum on a ReLU kink
        if not len(moved):
            break
        theta[moved] = trials[better, best[better]]
        value[moved] = vals[better, best[better]]
        g[moved] = chunked(grad_fn, theta[moved], X[moved], y[moved])
        active = torch.zeros(B, dtype=torch.bool, device=dev)
        active[moved] = True
        descend(active)
    grad_max = g.abs().amax(1)
    shapes = [t.shape for t in unflatten(theta0).values()]
    parts = theta.split([math.prod(s) for s in shapes], dim=1)
    params = {name: t.reshape(B, *s) for name, t, s in zip(names, parts, shapes)}
    drift = theta - halfway if it > max_iter // 2 else torch.zeros_like(theta)
    return NewtonFits(params, grad_max, grad_max <= gtol, it, min_eig, drift, gtol,
                      (min_eig > 0) | no_descent)


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
