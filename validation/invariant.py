r"""Gauge-invariant targets of one-hidden-layer networks, many datasets at once.

A ReLU unit's weights are defined only up to its rescaling orbit
:math:`(c\,w_{in}, c\,b, w_{out}/c)` and the units up to a permutation, so a
per-weight standard error answers a question about a gauge. Three targets do not
depend on one:

* the network output :math:`f(x)` at fixed test points (invariant under both);
* the path weights :math:`p_{jk} = w_{out,j}\,w_{in,jk}` (invariant under rescaling;
  the permutation is fixed by matching units to the target's);
* the unit contributions :math:`w_{out,j}\,\phi(w_{in,j}^\top x + b_j)` at the test points
  (invariant under rescaling, matched likewise);
* the balanced weights: each unit moved to the penalty's minimum on its orbit,
  :math:`c^4 = \|w_{out}\|^2 / (\|w_{in}\|^2 + b^2)`, where every penalised optimum
  already is (:func:`validation.newton._rebalancer`).

:class:`StackedMLP` trains ``R`` independent networks as one model (as
:class:`validation.designs.StackedGLM` does for GLMs: with the sum of the replicates'
mean losses each replicate's gradient is its own, and Adam and L2 weight decay act
elementwise). :class:`TargetTracker` records the targets' trajectory during
training as batch sums, which gives two interval rules that run *during* training:

* **batch means** of the target's own trajectory: for a smooth target :math:`g`, the
  delta method applied to the iterates gives
  :math:`\widehat{se}^2(g) = b\,s^2(\bar g_1, \dots, \bar g_K)\cdot S/N`, the sandwich
  variance of :math:`g(\hat\theta)` (:mod:`mustat.uncertainty.batch_means`), with
  Student-t intervals on :math:`K - 1` degrees of freedom around the window mean of
  :math:`g` (an invariant centre: the mean of :math:`f` over the window, not :math:`f`
  at the mean weights);
* the **window SD** of the target, the pseudo bootstrap's rule, with normal intervals.

:func:`delta_references` gives the exact references at a penalised optimum: the
delta-method sandwich :math:`\nabla g^\top H^{-1} J H^{-1} \nabla g / n` and observed
information :math:`\nabla g^\top H^{-1} \nabla g / n`, with :math:`H` the exact
penalised Hessian of the mean loss and :math:`J` the per-sample scores' second moment.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from validation.newton import _mlp_hessian, _one_hidden, _rebalancer


class StackedLinear(nn.Linear):
    """``R`` linear layers ``in -> out`` as one ``nn.Linear(in, R * out)``: ``x (S, R, in) ->
    (S, R, out)``; rows ``r * out .. (r + 1) * out`` of ``weight`` belong to replicate ``r``."""

    def __init__(self, in_features: int, out_features: int, replicates: int):
        super().__init__(in_features, replicates * out_features)
        self.replicates, self.units = replicates, out_features

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight.view(self.replicates, self.units, self.in_features)
        return torch.einsum("srd,rhd->srh", x, W) + self.bias.view(self.replicates, self.units)


class StackedMLP(nn.Module):
    """``R`` networks ``Linear(d, h) -> activation -> Linear(h, k)`` trained as one: data
    ``(S, R, d)``, outputs ``(S, R)`` when ``k = 1`` (as :class:`validation.designs.StackedGLM`)
    or ``(S, R, k)``. Replicate ``r`` starts from ``nets[r]``'s weights."""

    def __init__(self, nets: list[nn.Sequential]):
        super().__init__()
        kinds = {_one_hidden(n) for n in nets}
        if len(kinds) != 1 or None in kinds:
            raise ValueError("StackedMLP stacks nn.Sequential(Linear, ReLU or Softplus, Linear) networks of one kind")
        first, second = nets[0][0], nets[0][2]
        self.d, self.h, self.k = first.in_features, first.out_features, second.out_features
        R = len(nets)
        self.activation = kinds.pop()
        self.first = StackedLinear(self.d, self.h, R)
        self.act = type(nets[0][1])()
        self.second = StackedLinear(self.h, self.k, R)
        with torch.no_grad():
            self.first.weight.copy_(torch.cat([n[0].weight for n in nets]))
            self.first.bias.copy_(torch.cat([n[0].bias for n in nets]))
            self.second.weight.copy_(torch.cat([n[2].weight for n in nets]))
            self.second.bias.copy_(torch.cat([n[2].bias for n in nets]))

    @property
    def replicates(self) -> int:
        return self.first.replicates

    def forward(self, x: Tensor) -> Tensor:
        out = self.second(self.act(self.first(x)))
        return out.squeeze(-1) if self.k == 1 else out

    def flat(self) -> Tensor:
        """``(R, p)`` parameters, each row in a plain network's ``named_parameters`` order
        (``W1, b1, W2, b2``): the layout of :mod:`validation.newton`."""
        R = self.replicates
        return torch.cat([self.first.weight.reshape(R, -1), self.first.bias.reshape(R, -1),
                          self.second.weight.reshape(R, -1), self.second.bias.reshape(R, -1)], 1)


def split(theta: Tensor, d: int, h: int, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``W1 (..., h, d), b1 (..., h), W2 (..., k, h), b2 (..., k)`` of flat parameters ``(..., p)``."""
    W1, b1, W2, b2 = theta.split([h * d, h, k * h, k], dim=-1)
    lead = theta.shape[:-1]
    return W1.reshape(*lead, h, d), b1, W2.reshape(*lead, k, h), b2


def forward(theta: Tensor, X: Tensor, d: int, h: int, k: int, activation: str = "relu", beta: float = 1.0) -> Tensor:
    """The network of flat parameters ``theta (p,)`` on ``X (n, d)``: ``(n, k)`` (softplus of sharpness ``beta``)."""
    W1, b1, W2, b2 = split(theta, d, h, k)
    a = X @ W1.T + b1
    z = a.clamp_min(0) if activation == "relu" else F.softplus(a, beta=beta)
    return z @ W2.T + b2


def targets(theta: Tensor, X_test: Tensor, d: int, h: int, k: int, activation: str = "relu", *,
            weights: bool = True) -> dict[str, Tensor]:
    """The invariant targets of flat parameters ``theta (R, p)``: ``f`` at the test points
    ``(R, m * k)``, the path weights ``W2[c, j] W1[j, i]`` ``(R, k * h * d)``, the unit contributions
    ``W2[c, j] phi(a_j(x))`` at the test points ``(R, m * k * h)`` and (``weights``) the
    balanced weights ``(R, p)`` (ReLU only: a smooth activation has no orbit, its weights are returned)."""
    W1, b1, W2, b2 = split(theta, d, h, k)
    a = torch.einsum("md,rhd->rmh", X_test.to(theta.dtype), W1) + b1.unsqueeze(1)
    z = a.clamp_min(0) if activation == "relu" else F.softplus(a)
    f = torch.einsum("rmh,rkh->rmk", z, W2) + b2.unsqueeze(1)
    out = {"f": f.flatten(1), "path": (W2.unsqueeze(-1) * W1.unsqueeze(-3)).flatten(1),
           "unit": (z.unsqueeze(2) * W2.unsqueeze(1)).flatten(1)}
    if weights:
        out["weight"] = _rebalancer(d, h, k)(theta) if activation == "relu" else theta
    return out


class TargetTracker:
    """Batch sums of the invariant targets (:func:`targets`) of a :class:`StackedMLP` over a
    tracking window (the protocol of :class:`mustat.training.TrackWindow`: ``reset`` when the
    window opens, ``update`` after every step), in float64.

    ``batch_steps``: steps per batch (``window_steps // 20``, as batch means uses); a trailing
    incomplete batch is dropped from the batch means but kept in the window mean and SD.
    """

    trajectory = True

    def __init__(self, model: StackedMLP, X_test: Tensor, batch_steps: int):
        if batch_steps < 1:
            raise ValueError(f"batch_steps must be >= 1, got {batch_steps}")
        self.model, self.X_test, self.batch_steps = model, X_test.to(torch.float64), int(batch_steps)
        self.reset()

    def reset(self) -> None:
        self.steps, self._batch, self._in_batch = 0, None, 0
        self.total = self.total_sq = None
        self.batch_means: list[dict[str, Tensor]] = []

    def new_epoch(self) -> None:
        pass

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`update` after every ``optimizer.step()`` (a removable handle)."""
        return optimizer.register_step_post_hook(lambda *_: self.update())

    @torch.no_grad()
    def update(self) -> None:
        m = self.model
        g = targets(m.flat().double(), self.X_test, m.d, m.h, m.k, m.activation)
        if self.total is None:
            self.total = {k: torch.zeros_like(v) for k, v in g.items()}
            self.total_sq = {k: torch.zeros_like(v) for k, v in g.items()}
        if self._in_batch == 0:
            self._batch = {k: torch.zeros_like(v) for k, v in g.items()}
        for key, v in g.items():
            self.total[key] += v
            self.total_sq[key] += v * v
            self._batch[key] += v
        self.steps += 1
        self._in_batch += 1
        if self._in_batch == self.batch_steps:
            self.batch_means.append({k: v / self.batch_steps for k, v in self._batch.items()})
            self._in_batch = 0

    def result(self, n: int, batch_size: int) -> dict[str, dict[str, Tensor]]:
        """Per target group: ``mean`` (window mean), ``bm_se`` (batch means, Student-t on
        ``dof = K - 1``), ``sd`` (window SD, ddof 1), each ``(R, q)``; ``dof`` the batch count - 1."""
        K = len(self.batch_means)
        if K < 2:
            raise ValueError(f"the window gave {K} complete batches of {self.batch_steps} steps; batch means need >= 2")
        out = {}
        for key in self.total:
            mean = self.total[key] / self.steps
            var = (self.total_sq[key] - self.steps * mean * mean) / (self.steps - 1)
            bm = torch.stack([b[key] for b in self.batch_means])
            lrv = self.batch_steps * bm.var(0, unbiased=True)
            out[key] = dict(mean=mean, bm_se=(lrv * batch_size / n).sqrt(), sd=var.clamp_min(0).sqrt(),
                            dof=torch.tensor(K - 1))
        return out


def delta_references(theta: Tensor, X: Tensor, y: Tensor, loss, X_test: Tensor, *, d: int, h: int, k: int,
                     weight_decay: float, activation: str = "relu",
                     surrogate_beta: float | None = None) -> dict[str, dict[str, Tensor]]:
    r"""Exact delta-method SEs of every target at the penalised optima ``theta (R, p)`` of the
    datasets ``X (R, n, d)``, ``y (R, n)``: ``{"sandwich" | "observed": {group: (R, q)}}`` for the
    groups of :func:`targets` and ``"raw"``, the parameters themselves.

    ``loss(out, y)`` is the mean loss of a batch. The penalised per-sample score is
    :math:`\psi_i = \nabla \ell_i + \lambda\theta`, :math:`J = \frac1n\sum\psi_i\psi_i^\top`;
    the sandwich covariance of :math:`\hat\theta` is :math:`H^{-1} J H^{-1} / n`, the observed
    one :math:`H^{-1}/n`. Every group goes through its own Jacobian, the balanced weights' too:
    balancing projects out each unit's rescaling direction, along which :math:`H^{-1}/n` keeps a
    variance of :math:`1/(2\lambda n)` the data never see. Where ``H`` is not positive definite (not
    a minimum) the observed variance can be negative and gives NaN, which :func:`coverage_table`
    never counts as covered; the sandwich stays finite there, so callers must check the fit is a
    minimum (:class:`validation.newton.NewtonFits`).

    ``surrogate_beta``: the fit is the optimum of the smooth surrogate (softplus of that sharpness
    in place of ReLU, :func:`validation.newton.smooth_polish`); ``H`` and the scores are then the
    surrogate's, while the targets keep ``activation``.
    """
    theta, X, y, X_test = theta.double(), X.double(), y.double(), X_test.double()
    R, n = X.shape[:2]
    fit_act, fit_beta = ("softplus", float(surrogate_beta)) if surrogate_beta else (activation, 1.0)
    H = _mlp_hessian(loss, d, h, k, weight_decay, fit_act, fit_beta)(theta, X, y)

    def sample_loss(t, x, target):
        return loss(forward(t, x[None], d, h, k, fit_act, fit_beta), target[None])

    scores = vmap(vmap(grad(sample_loss), in_dims=(None, 0, 0)))(theta, X, y) + weight_decay * theta[:, None]
    J = scores.transpose(1, 2) @ scores / n
    Hinv = torch.linalg.inv(H)
    cov = {"sandwich": Hinv @ J @ Hinv / n, "observed": Hinv / n}

    def groups(t):
        return {key: v[0] for key, v in targets(t[None], X_test, d, h, k, activation).items()}

    jac = vmap(jacrev(groups))(theta)                                   # {group: (R, q, p)}
    out = {}
    for kind, V in cov.items():
        # no clamping: away from a minimum H^-1 is indefinite and a negative variance gives NaN (no SE)
        se = {key: torch.einsum("rqp,rps,rqs->rq", Jg, V, Jg).sqrt() for key, Jg in jac.items()}
        se["raw"] = torch.diagonal(V, dim1=1, dim2=2).sqrt()
        out[kind] = se
    return out


def match_to(theta: Tensor, target: Tensor, d: int, h: int, k: int) -> Tensor:
    """``theta (R, p)`` with each replicate's hidden units reordered to match ``target (p,)``'s
    (Hungarian matching on balanced ``(w_in, b, w_out)``); returns the permutations ``(R, h)``."""
    from validation.references import match_units

    def units(t):
        W1, b1, W2, _ = split(t, d, h, k)
        return torch.cat([W1, b1.unsqueeze(-1), W2.transpose(-1, -2)], -1)

    bal = _rebalancer(d, h, k)(theta.double())
    ref = units(_rebalancer(d, h, k)(target.double()[None])[0])
    return torch.as_tensor(np.stack([match_units(units(b), ref) for b in bal]))


def permute(group: str, values: Tensor, perm: Tensor, *, d: int, h: int, k: int, m: int) -> Tensor:
    """A target group's values ``(R, q)`` with hidden units reordered by ``perm (R, h)`` (``f`` is
    invariant; ``m`` test points)."""
    if group == "f":
        return values
    R = len(values)
    idx = perm.long()
    if group == "path":
        v = values.view(R, k, h, d)
        return torch.gather(v, 2, idx.view(R, 1, h, 1).expand(R, k, h, d)).reshape(R, -1)
    if group == "unit":
        v = values.view(R, m, k, h)
        return torch.gather(v, 3, idx.view(R, 1, 1, h).expand(R, m, k, h)).reshape(R, -1)
    W1, b1, W2, b2 = split(values, d, h, k)
    W1 = torch.gather(W1, 1, idx.view(R, h, 1).expand(R, h, d))
    b1 = torch.gather(b1, 1, idx)
    W2 = torch.gather(W2, 2, idx.view(R, 1, h).expand(R, k, h))
    return torch.cat([W1.flatten(1), b1, W2.flatten(1), b2], 1)


def coverage_table(centre: np.ndarray, se: np.ndarray, truth: np.ndarray, dof: float | None = None) -> dict:
    """Coverage of 95% intervals ``centre +- q se`` (normal, or Student-t on ``dof``) of ``truth``
    over every entry, with Wilson bounds; an infinite or NaN SE is never counted as covered."""
    from scipy import stats

    from validation.metrics import wilson

    q = stats.norm.ppf(0.975) if dof is None else stats.t.ppf(0.975, dof)
    ok = np.isfinite(se)
    hit = ok & (np.abs(centre - truth) <= q * np.where(ok, se, 0))
    lo, hi = wilson(int(hit.sum()), hit.size)
    return dict(coverage=float(hit.mean()), lo=lo, hi=hi, intervals=int(hit.size),
                width_median=float(np.median(2 * q * se[ok])) if ok.any() else math.nan)
