"""Issue 35, item 3: what carries batch means' excess over the sandwich on the gauge-fixed hidden layer?

Batch means estimates the long-run variance (LRV) of the iterates. Its module notes derive
``LRV = H^-1 (C/S) H^-1`` (the sandwich times ``N/S``) from one identity: with a *fixed*
preconditioner ``P`` the updates telescope, ``sum_t g_t = -(eta P)^-1 (theta_T - theta_0)``, so the
window's summed gradient is bounded whatever ``P`` is. Adam's ``P_t = 1 / (sqrt(v_t) + eps)`` moves
(``v`` is an average over about 1/(1 - beta2) = 1,000 steps of squared gradients), and
``sum_t P_t^-1 (theta_{t+1} - theta_t)`` does not telescope: its remainder ``sum_t (P_t^-1 -
P_{t+1}^-1) theta_{t+1}`` is a sum of products of two slow fluctuations, which adds to the LRV.
The other suspects are the kinks (the loss is only piecewise quadratic, so the Hessian the
trajectory averages is not the one at the optimum) and slow, weakly curved directions (an
autocorrelation time near the batch length, or a drift).

Design: the study's 6-8-1 regression teacher (``teacher-regression``, 2,000 samples, dataset =
seed 0-4), a student from its own initialisation trained as the study trains it (Adam lr 0.01,
S = 32 drawn with replacement, weight decay 1e-3 or 1e-2) for the first 50 epochs. From that one
state, five windows of 750 epochs (47,250 steps) each, with the same minibatches:

- ``adam``: Adam goes on (the study's setting);
- ``adam, v frozen``: Adam with its second moment frozen at the window's start (momentum kept):
  a fixed preconditioner, the only change;
- ``sgd``: plain SGD with replacement (no momentum) at the step size that gives the same median
  stationary variance of the balanced iterates as Adam's window (one short pilot window; the
  achieved ratio is reported);
- ``sgd, rebalanced``: the same SGD, every iterate moved back to its orbit's balanced point after
  the step (the same function): the iterates stay near one point of the orbit instead of wandering
  along it, held only by the weak penalty;
- ``sgd, kinks frozen``: the same SGD on :class:`FrozenKinks`, the student with each training
  point's ReLU pattern fixed (a smooth loss, the same parameters and orbits); its reference is its
  own optimum (:func:`levenberg_newton` from the window mean) and its exact sandwich there.

Every step's parameters are mapped to their balanced orbit point (``mustat.gauge``, checked
against ``mustat.gauge.balanced``) and kept. Reference: the student polished by Newton from its
last iterate to the penalised optimum (``validation.references.polish``), and the full penalised
sandwich covariance ``Sigma = H^-1 J H^-1`` there (its diagonal checked against
``validation.references.wald_references``). Per window:

- batch means (20 batches of 2,362 steps, as the estimator does) over the 56 weights: median SE
  ratio to the sandwich;
- the spectrum: for each eigenvector ``u`` of the penalised Hessian ``H`` at the optimum (the
  orbit directions left out), the ratio ``u' LRV u (S/N) / u' Sigma u``, the direction's
  autocorrelation time ``tau = LRV / Var`` in steps and the t statistic of a straight-line trend
  across its batch means, pooled over fits by the eigenvalue's rank (soft to stiff);
- the kinks: per hidden unit, the fraction of (snapshot, training point) pairs whose
  pre-activation sign differs from the sign at the optimum; its Spearman correlation with the
  unit's excess (median SE ratio of its 8 parameters).

Writes ``slow.csv`` (one row per fit and optimizer) and ``slow.md``.

    python docs/calibration/slow.py               # 2 decays x 5 datasets x 5 windows (14 min on one core)
    python docs/calibration/slow.py --seeds 0 --decays 1e-3   # one fit
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from mustat._io import atomic_write
from mustat.gauge import balanced
from mustat.training import steps_per_epoch
from mustat.uncertainty import information
from validation.designs import get_design
from validation.references import polish, wald_references

HERE = Path(__file__).parent
S, LR, BURN, EPOCHS, BATCHES = 32, 0.01, 50, 750, 20
OPTIMIZERS = ("adam", "adam, v frozen", "sgd", "sgd, rebalanced", "sgd, kinks frozen")
BETAS, EPS = (0.9, 0.999), 1e-8


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class FrozenKinks(nn.Module):
    """The student with every training point's ReLU pattern frozen: input ``[x, m]`` (``m`` the point's
    0/1 pattern of the hidden units at a reference optimum), output ``W2 (m * (W1 x + b1)) + b2``. The
    same parameters (and names) and the same rescaling orbits, but no kinks: a smooth loss that equals
    the ReLU network's on the region where no point changes side."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.add_module("0", net[0])
        self.add_module("2", net[2])
        self.d = net[0].in_features

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x, m = inp[:, : self.d], inp[:, self.d:]
        return self._modules["2"](m * self._modules["0"](x))


def balance_rows(Z: np.ndarray, d: int, h: int) -> np.ndarray:
    """Each row (a 6-8-1 parameter vector: W1 (h x d), b1 (h), W2 (1 x h), b2) at its orbit's
    balanced point: unit j scaled by c_j = sqrt(|v_j| / ||(a_j, b_j)||) in, 1 / c_j out."""
    W1 = Z[:, : h * d].reshape(-1, h, d)
    b1 = Z[:, h * d: h * d + h]
    v = Z[:, h * d + h: h * d + 2 * h]
    inn = np.sqrt((W1 ** 2).sum(-1) + b1 ** 2)
    c = np.sqrt(np.abs(v) / np.maximum(inn, 1e-300))
    c = np.where((inn > 0) & (np.abs(v) > 0), c, 1.0)
    out = Z.copy()
    out[:, : h * d] = (W1 * c[:, :, None]).reshape(len(Z), -1)
    out[:, h * d: h * d + h] = b1 * c
    out[:, h * d + h: h * d + 2 * h] = v / c
    return out


def sandwich(model: nn.Module, loss, X: torch.Tensor, y: torch.Tensor, wd: float) -> tuple[np.ndarray, np.ndarray]:
    """The penalised Hessian ``H`` of ``sum_i l_i + n wd/2 |theta|^2`` and ``Sigma = H^-1 J H^-1``,
    ``J = sum_i psi_i psi_i'``, ``psi_i = grad l_i + wd theta`` (float64, at ``model``'s weights)."""
    from torch.func import functional_call, grad, hessian, vmap

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = flat(model).double()
    X, y = X.double(), y.double()
    m = model.double()

    def unflat(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = t[i: i + k].reshape(s)
            i += k
        return out

    def sample_loss(t, x, target):
        return loss(functional_call(m, unflat(t), (x[None],)).reshape(-1), target.reshape(-1)) + 0.5 * wd * t @ t

    def total(t):
        return loss(functional_call(m, unflat(t), (X,)).reshape(-1), y.reshape(-1)) * len(y) + 0.5 * len(y) * wd * t @ t

    H = hessian(total)(theta0).numpy()
    psi = vmap(grad(sample_loss), in_dims=(None, 0, 0))(theta0, X, y).numpy()
    # not centred, as mustat.hessian_se's J (the scores sum to 0 at a stationary point)
    J = psi.T @ psi
    Hi = np.linalg.inv(H)
    return H, Hi @ J @ Hi


def window(model: nn.Module, state: dict, kind: str, wd: float, X: torch.Tensor, y: torch.Tensor, loss, seed: int,
           steps: int, sgd_lr: float | None = None, record: bool = True) -> np.ndarray:
    """Run ``steps`` steps of ``kind`` from ``state`` (model and Adam state) with minibatches of S drawn with
    replacement by ``seed``; return every step's parameters (rows)."""
    model.load_state_dict(state["model"])
    params = list(model.parameters())
    if kind == "adam":
        opt = torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
        opt.load_state_dict(state["adam"])
    else:
        inner = state["adam"]["state"]
        m = [inner[i]["exp_avg"].clone() for i in range(len(params))]
        t0 = float(inner[0]["step"])
        vhat = [inner[i]["exp_avg_sq"] / (1 - BETAS[1] ** t0) for i in range(len(params))]
        denom = [v.sqrt() + EPS for v in vhat]
    g = torch.Generator().manual_seed(10_000 + seed)
    n = len(y)
    Z = np.empty((steps if record else 0, sum(p.numel() for p in params)))
    for t in range(steps):
        idx = torch.randint(n, (S,), generator=g)
        for p in params:
            p.grad = None
        loss(model(X[idx]).reshape(-1), y[idx].reshape(-1)).backward()
        with torch.no_grad():
            if kind == "adam":
                opt.step()
            else:
                for i, p in enumerate(params):
                    gr = p.grad + wd * p
                    if kind.startswith("sgd"):
                        p.sub_(sgd_lr * gr)
                    else:
                        m[i].mul_(BETAS[0]).add_(gr, alpha=1 - BETAS[0])
                        bc = 1 - BETAS[0] ** (t0 + t + 1)
                        p.sub_(LR * (m[i] / bc) / denom[i])
                if kind == "sgd, rebalanced":     # back to the orbit's balanced point: the same function
                    W1, b1, W2 = params[0], params[1], params[2]
                    inn = (W1.square().sum(1) + b1.square()).sqrt()
                    c = torch.where((inn > 0) & (W2[0] != 0), (W2[0].abs() / inn.clamp_min(1e-30)).sqrt(), 1.0)
                    W1.mul_(c[:, None])
                    b1.mul_(c)
                    W2.div_(c[None, :])
        if record:
            Z[t] = flat(model).double().numpy()
    return Z


def effective_lr(state: dict) -> float:
    inner = state["adam"]["state"]
    t0 = float(inner[0]["step"])
    steps = torch.cat([(LR / ((inner[i]["exp_avg_sq"] / (1 - BETAS[1] ** t0)).sqrt() + EPS)).flatten()
                       for i in range(len(inner))])
    return float(steps.median())


def analyse(Zb: np.ndarray, opt_theta: np.ndarray, H: np.ndarray, Sigma: np.ndarray, n: int, weights: np.ndarray,
            X: np.ndarray, d: int, h: int) -> dict:
    T, p = Zb.shape
    b = T // BATCHES
    M = Zb[: b * BATCHES].reshape(BATCHES, b, p).mean(1)
    LRV = b * np.cov(M, rowvar=False)
    se_bm = np.sqrt(np.diag(LRV) * S / n)
    se_ref = np.sqrt(np.diag(Sigma))
    ratio = se_bm / se_ref
    centre = np.abs(Zb.mean(0) - opt_theta) / se_ref
    # the h orbit generators (a_j, b_j, -v_j) are eigenvectors of H (eigenvalue 2 n wd: the penalty alone holds
    # them), and neither the sandwich nor the balanced trajectory has variance along them (the penalised
    # optimum and every balanced snapshot sit on the balanced manifold, to which they are normal): both
    # variances are 0 there, so the spectrum is taken on their orthogonal complement, which H leaves invariant
    orbits = np.zeros((p, h))
    for j in range(h):
        orbits[j * d:(j + 1) * d, j] = opt_theta[j * d:(j + 1) * d]
        orbits[h * d + j, j] = opt_theta[h * d + j]
        orbits[h * d + h + j, j] = -opt_theta[h * d + h + j]
    Q = np.linalg.svd(np.eye(p) - orbits @ np.linalg.pinv(orbits))[0][:, : p - h]
    lam, V = np.linalg.eigh(Q.T @ H @ Q)
    U = Q @ V
    proj_lrv = np.einsum("ik,ij,jk->k", U, LRV, U) * S / n
    proj_sig = np.einsum("ik,ij,jk->k", U, Sigma, U)
    var = np.einsum("ik,ij,jk->k", U, np.cov(Zb, rowvar=False), U)
    tau = np.einsum("ik,ij,jk->k", U, LRV, U) / var
    # drift: each direction's trend across the batch means (slope over its SE, the residual variance of
    # the straight line with B - 2 degrees of freedom): Student t with 18 dof for a stationary series
    coords = M @ U
    kk = np.arange(BATCHES) - (BATCHES - 1) / 2
    slope = kk @ (coords - coords.mean(0)) / (kk @ kk)
    resid = coords - coords.mean(0) - np.outer(kk, slope)
    drift = slope / np.sqrt((resid ** 2).sum(0) / (BATCHES - 2) / (kk @ kk))
    # kinks: per hidden unit, the share of (snapshot, point) pairs whose pre-activation sign is not the optimum's
    W1o = opt_theta[: h * d].reshape(h, d)
    b1o = opt_theta[h * d: h * d + h]
    ref_sign = (X @ W1o.T + b1o) > 0
    snaps = Zb[:: max(1, T // 400)]
    flips = np.zeros(h)
    for z in snaps:
        s = (X @ z[: h * d].reshape(h, d).T + z[h * d: h * d + h]) > 0
        flips += (s != ref_sign).mean(0)
    flips /= len(snaps)
    unit = np.array([np.median(ratio[np.r_[j * d:(j + 1) * d, h * d + j, h * d + h + j]]) for j in range(h)])
    return dict(ratio_weights=float(np.median(ratio[weights])), ratio_all=float(np.median(ratio)),
                centre=float(np.median(centre[weights])), lam=lam, dir_ratio=proj_lrv / proj_sig, tau=tau,
                drift=drift, batch=b, flips=flips, unit_ratio=unit,
                window_var=np.median(np.diag(np.cov(Zb, rowvar=False))[weights]))


def row(wd: float, seed: int, kind: str, lr: float, a: dict, rho: float, seconds: float, converged: bool) -> dict:
    return dict(decay=wd, seed=seed, optimizer=kind, lr=lr, converged=converged,
                newton_step_se=a.get("newton_step_se", 0.0), window_var=a["window_var"],
                ratio=a["ratio_weights"],
                ratio_all=a["ratio_all"], centre=a["centre"], batch=a["batch"],
                flips_median=float(np.median(a["flips"])), flips_max=float(a["flips"].max()),
                spearman_flips_excess=rho,
                **{f"dir{k}_ratio": v for k, v in enumerate(a["dir_ratio"])},
                **{f"dir{k}_lambda": v for k, v in enumerate(a["lam"])},
                **{f"dir{k}_tau": v for k, v in enumerate(a["tau"])},
                **{f"dir{k}_drift": v for k, v in enumerate(a["drift"])},
                **{f"unit{j}_ratio": v for j, v in enumerate(a["unit_ratio"])},
                **{f"unit{j}_flips": v for j, v in enumerate(a["flips"])},
                seconds=seconds)


def levenberg_newton(model: nn.Module, summed, data, wd: float, iters: int = 200) -> float | None:
    """Damped Newton on a smooth penalised objective, in place: ``(H + mu I)^-1 g`` steps, ``mu`` raised
    until the objective falls and lowered after each success, down to plain Newton; stops when a full
    Newton step moves no parameter by more than 1e-9. Returns the last step's size, or None."""
    from mustat.uncertainty import information

    def objective(info):
        return info.value + 0.5 * info.n * wd * float(info.theta @ info.theta)

    def load(theta):
        with torch.no_grad():
            for k, v in info.layout.unflatten(theta).items():
                model.get_parameter(k).copy_(v)

    info = information(model, summed, data, weight_decay=wd)
    mu0 = 1e-3 * float(info.H.diagonal().abs().mean())
    mu = mu0
    for _ in range(iters):
        f0, theta0 = objective(info), info.theta.clone()
        H = 0.5 * (info.H + info.H.T)
        if float(torch.linalg.eigvalsh(H)[0]) > 0:
            full = torch.linalg.solve(H, info.gradient)
            if float(full.abs().max()) < 1e-9:      # converged: a full Newton step moves nothing (SEs are ~0.05)
                load(theta0 - full)
                return float(full.abs().max())
        for _ in range(60):
            step = torch.linalg.solve(H + mu * torch.eye(len(H), dtype=H.dtype), info.gradient)
            load(theta0 - step)
            trial = information(model, summed, data, weight_decay=wd)
            if objective(trial) <= f0 + 1e-12 * abs(f0):      # near the optimum the change is below rounding
                break
            mu = max(10 * mu, mu0)
        else:
            load(theta0)
            return None
        info = trial
        mu = 0.0 if mu < 1e-8 * mu0 else mu / 10
    return None


def frozen_window(design, model, state, wd, X, y, loss, seed, steps, sgd_lr, weights, log) -> list[dict]:
    """SGD on :class:`FrozenKinks` with the pattern of the ReLU network after Newton from the window's
    start, from the same state and minibatches; reference: the frozen model's own optimum (damped
    Newton, :func:`levenberg_newton`, from the balanced window mean) and its exact sandwich there."""
    import copy

    t = time.perf_counter()
    model.load_state_dict(state["model"])
    d, h = model[0].in_features, model[0].out_features
    # the pattern: the ReLU network's after Newton from the window's starting state (near the
    # trajectory; whether that point is a certified minimum does not matter, only that the pattern is
    # the one the trajectory mostly sees)
    relu_opt, _ = polish(copy.deepcopy(model), loss, torch.tensor(X), torch.tensor(y), weight_decay=wd, gtol=1e-10,
                         max_iter=200)
    with torch.no_grad():
        M = (relu_opt[0](torch.tensor(X)) > 0).double().numpy()
    XM = np.c_[X, M]
    frozen = FrozenKinks(model)
    XM32, y32 = torch.tensor(XM, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    Z = window(frozen, state, "sgd", wd, XM32, y32, loss, seed, steps, sgd_lr=sgd_lr)
    if not np.isfinite(Z).all():
        log("  sgd, kinks frozen: diverged")
        return []
    Zb = balance_rows(Z, d, h)
    # the frozen model is smooth: Newton (the library's, which refuses a Hessian that is not positive
    # definite) from the balanced window mean converges to its optimum in the trajectory's basin
    ref = FrozenKinks(copy.deepcopy(model)).double()
    mean = Zb.mean(0)
    with torch.no_grad():
        i = 0
        for prm in ref.parameters():
            prm.copy_(torch.from_numpy(mean[i:i + prm.numel()]).reshape(prm.shape))
            i += prm.numel()
    data = (torch.tensor(XM), torch.tensor(y))

    def summed(out, target):
        return loss(out.reshape(-1), target.reshape(-1)) * len(target)

    change = levenberg_newton(ref, summed, data, wd)
    if change is None:
        log("  sgd, kinks frozen: Newton did not converge from the window mean: skipped")
        return []
    theta = flat(ref).double().numpy()
    H, Sigma = sandwich(ref, loss, torch.tensor(XM), torch.tensor(y), wd)
    if np.linalg.eigvalsh(H)[0] <= 0:
        log("  sgd, kinks frozen: the frozen model's optimum is not a strict minimum: skipped")
        return []
    a = analyse(Zb, theta, H, Sigma, len(y), weights, X, d, h)
    log(f"  sgd, kinks frozen ratio {a['ratio_weights']:.3f}  centre {a['centre']:.2f}  (last Newton change "
        f"{change:.1e})  ({time.perf_counter() - t:.0f} s)")
    return [row(wd, seed, "sgd, kinks frozen", sgd_lr, a, float("nan"), time.perf_counter() - t, True)]


def fit(design, wd: float, seed: int, log, epochs: int = EPOCHS, kinds=OPTIMIZERS) -> list[dict]:
    X, y, _ = design.sample(seed)
    X32, y32 = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    loss = design.loss()
    model = design.model(10_000 * seed)
    first = model[0]
    d, h = first.in_features, first.out_features
    n = len(y)
    per_epoch = steps_per_epoch(n, S)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    for _ in range(BURN * per_epoch):
        idx = torch.randint(n, (S,), generator=g)
        opt.zero_grad()
        loss(model(X32[idx]).reshape(-1), y32[idx].reshape(-1)).backward()
        opt.step()
    state = dict(model={k: v.clone() for k, v in model.state_dict().items()}, adam=opt.state_dict())
    state["adam"] = {"state": {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in state["adam"]["state"].items()},
                     "param_groups": state["adam"]["param_groups"]}
    steps = epochs * per_epoch
    weights = np.r_[0:h * d, h * d + h:h * d + 2 * h]
    rows = []
    # the SGD step: matched to Adam's stationary variance on a pilot window (a tenth of the window each)
    pilot = steps // 10
    va = np.median(np.var(balance_rows(window(model, state, "adam", wd, X32, y32, loss, seed + 100, pilot), d, h), 0)[weights])
    lr0 = effective_lr(state)
    vs = np.median(np.var(balance_rows(window(model, state, "sgd", wd, X32, y32, loss, seed + 100, pilot, sgd_lr=lr0), d, h), 0)[weights])
    sgd_lr = lr0 * va / vs if np.isfinite(vs) and vs > 0 else lr0     # the stationary variance is about linear in the step
    for kind in kinds:
        t = time.perf_counter()
        if kind == "sgd, kinks frozen":
            rows += frozen_window(design, model, state, wd, X, y, loss, seed, steps, sgd_lr, weights, log)
            continue
        Z = window(model, state, kind, wd, X32, y32, loss, seed, steps, sgd_lr=sgd_lr)
        if not np.isfinite(Z).all():
            log(f"  {kind}: diverged")
            continue
        Zb = balance_rows(Z, d, h)
        check = balanced(model)             # the last iterate, through the library's map
        raw = dict(model.named_parameters())
        lib = torch.cat([check.get(k, raw[k]).detach().flatten() for k in raw]).double().numpy()
        assert np.allclose(lib, Zb[-1], rtol=1e-5, atol=1e-7), "balance_rows disagrees with mustat.gauge.balanced"
        fitted, newton = polish(model, loss, torch.tensor(X), torch.tensor(y), weight_decay=wd, gtol=1e-10, max_iter=2000)
        if float(newton.min_eig[0]) <= 0:
            log(f"  {kind}: the polished endpoint is not a strict minimum (on a kink): skipped")
            continue
        # the ReLU objective is rugged (a kink per point and unit): Newton may stop at a point that is a
        # strict minimum of its piece but not stationary; the reference is recorded with its verdict
        converged = bool(newton.converged[0])
        theta = flat(fitted).double().numpy()
        H, Sigma = sandwich(fitted, loss, torch.tensor(X), torch.tensor(y), wd)
        ref = wald_references(fitted, loss, torch.tensor(X), torch.tensor(y), weight_decay=wd)["sandwich"]
        ref = torch.cat([ref[k].flatten() for k in ("0.weight", "0.bias", "2.weight", "2.bias")]).numpy()
        assert np.allclose(np.sqrt(np.diag(Sigma)), ref, rtol=1e-6), "sandwich disagrees with wald_references"
        a = analyse(Zb, theta, H, Sigma, n, weights, X, d, h)
        rho = stats.spearmanr(a["flips"], a["unit_ratio"]).statistic
        # how far the reference is from stationary: the Newton step there, in sandwich SEs
        g = information(fitted, lambda o, t_: loss(o, t_) * len(t_), (torch.tensor(X), torch.tensor(y)),
                        weight_decay=wd).gradient.numpy()
        a["newton_step_se"] = float(np.median(np.abs(np.linalg.solve(H, g))[weights] / np.sqrt(np.diag(Sigma))[weights]))
        rows.append(row(wd, seed, kind, sgd_lr if kind.startswith("sgd") else LR, a, rho, time.perf_counter() - t,
                        converged))
        log(f"  {kind:15s} ratio {a['ratio_weights']:.3f}  reference converged {converged} (Newton step "
            f"{a['newton_step_se']:.2g} SE)  centre {a['centre']:.2f}  flips {np.median(a['flips']):.4f}  "
            f"({time.perf_counter() - t:.0f} s)")
    return rows


def report(frame: pd.DataFrame, dest: Path, command: str) -> None:
    p = sum(1 for c in frame.columns if c.startswith("dir") and c.endswith("_ratio"))
    lines = ["# What carries batch means' excess on the gauge-fixed hidden layer (issue 35, item 3)", "",
             f"Produced by `{command}` on {date.today()} ({platform.machine()}, torch {torch.__version__}, one thread). "
             "Module notes of docs/calibration/slow.py: the design. Ratio: balanced batch-means SE / exact sandwich SE, "
             "median over the 56 weights of a fit; centre: median |window mean - optimum| in sandwich SEs.", "",
             "| weight decay | optimizer | fits | ratio: median over fits | per fit | centre | SGD step / Adam's | window variance / Adam's |",
             "|---|---|---|---|---|---|---|---|"]
    adam_var = frame[frame.optimizer == "adam"].set_index(["decay", "seed"]).window_var
    for (wd, kind), g in frame.groupby(["decay", "optimizer"], sort=False):
        vr = g.set_index(["decay", "seed"]).window_var / adam_var.reindex(g.set_index(["decay", "seed"]).index)
        lines.append(f"| {wd:g} | {kind} | {len(g)} | **{g.ratio.median():.3f}** | "
                     f"{', '.join(f'{r:.2f}' for r in g.ratio)} | {g.centre.median():.2f} | "
                     f"{(g.lr.median() / LR) if kind.startswith('sgd') else 1:.3g} | {vr.median():.2f} |")
    lines += ["", "## The spectrum: per eigen-direction of the penalised Hessian, LRV x S/N over the sandwich's variance", "",
              "The 8 orbit directions are left out (neither variance has a part there: the code's comment). The other 57 "
              "directions, ranked by eigenvalue (0 = the softest), and pooled in groups over fits: median ratio, "
              "median autocorrelation time tau (steps; the batch is "
              f"{int(frame.batch.median()):,} steps) and median |drift| (the straight-line trend "
              "across the 20 batch means over its standard error: Student t with 18 dof, median |t| 0.69, when the "
              "direction is stationary).", "",
              "| weight decay | optimizer | directions | median eigenvalue | ratio | tau | abs drift |", "|---|---|---|---|---|---|---|"]
    groups = [(0, 3), (3, 10), (10, 25), (25, 40), (40, p)]
    for (wd, kind), g in frame.groupby(["decay", "optimizer"], sort=False):
        for lo, hi in groups:
            ks = range(lo, hi)
            lam = np.concatenate([g[f"dir{k}_lambda"].to_numpy() for k in ks])
            r = np.concatenate([g[f"dir{k}_ratio"].to_numpy() for k in ks])
            tau = np.concatenate([g[f"dir{k}_tau"].to_numpy() for k in ks])
            dr = np.concatenate([np.abs(g[f"dir{k}_drift"].to_numpy()) for k in ks])
            lines.append(f"| {wd:g} | {kind} | {lo}-{hi - 1} | {np.median(lam):.3g} | {np.median(r):.2f} | "
                         f"{np.median(tau):.0f} | {np.median(dr):.2f} |")
    lines += ["", "## The kinks", "",
              "Per hidden unit: the share of (snapshot, training point) pairs on the other side of the unit's kink than "
              "at the optimum, and its Spearman correlation with the unit's excess (median over fits).", "",
              "| weight decay | optimizer | median share | largest share | Spearman (share, unit ratio) |",
              "|---|---|---|---|---|"]
    for (wd, kind), g in frame.groupby(["decay", "optimizer"], sort=False):
        if kind == "sgd, kinks frozen":         # no kinks: the shares would count sign changes nothing feels
            continue
        lines.append(f"| {wd:g} | {kind} | {g.flips_median.median():.4f} | {g.flips_max.max():.4f} | "
                     f"{g.spearman_flips_excess.median():.2f} |")
    atomic_write(dest, lambda t: Path(t).write_text("\n".join(lines) + "\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decays", default="1e-3,1e-2")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=HERE / "slow.csv")
    ap.add_argument("--optimizers", default=";".join(OPTIMIZERS), help=f"';'-separated, of {OPTIMIZERS}")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="the window in epochs (smoke tests: fewer)")
    ap.add_argument("--report", action="store_true", help="only rewrite the md from the csv")
    args = ap.parse_args()
    torch.set_num_threads(1)
    command = "python docs/calibration/slow.py" + (f" --decays {args.decays}" if args.decays != "1e-3,1e-2" else "") + \
        (f" --seeds {args.seeds}" if args.seeds != "0,1,2,3,4" else "")
    kinds = [k.strip() for k in args.optimizers.split(";")]
    unknown = [k for k in kinds if k not in OPTIMIZERS]
    if unknown:
        ap.error(f"--optimizers: {unknown} not among {OPTIMIZERS}")
    if not args.report:
        design = get_design("teacher-regression")
        frame = pd.read_csv(args.out) if args.out.exists() else pd.DataFrame()
        for wd in [float(v) for v in args.decays.split(",")]:
            for seed in [int(v) for v in args.seeds.split(",")]:
                done = set(frame[(frame.decay == wd) & (frame.seed == seed)].optimizer) if len(frame) else set()
                todo = [k for k in kinds if k not in done]
                if not todo:
                    continue
                print(f"weight decay {wd:g}, dataset {seed}", flush=True)
                rows = fit(design, wd, seed, lambda s: print(s, flush=True), args.epochs, todo)
                frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
                atomic_write(args.out, lambda p, f=frame: f.to_csv(p, index=False))
    report(pd.read_csv(args.out), args.out.with_suffix(".md"), command)


if __name__ == "__main__":
    main()
