"""The stacked damped-Newton solver: exact against numpy Newton on GLMs, the closed-form
MLP Hessian against torch.func, saddles escaped, convergence reported honestly."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import hessian, vmap
from torch.nn import functional as F

from mustat.uncertainty import bootstrap_replicates
from mustat.uncertainty.bootstrap import plan
from validation import newton as N
from validation.bootstrap import newton_bootstrap


def _logistic(n=400, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ np.linspace(-1, 1, d) + 0.3)))).astype(float)
    return X, y


def _numpy_logistic(X, y, lam):
    """Penalised logistic MLE (every parameter penalised, PyTorch's mean-loss convention)."""
    n, d = X.shape
    Xa, beta = np.c_[X, np.ones(n)], np.zeros(d + 1)
    for _ in range(50):
        mu = 1 / (1 + np.exp(-Xa @ beta))
        g = Xa.T @ (mu - y) / n + lam * beta
        H = (Xa * (mu * (1 - mu))[:, None]).T @ Xa / n + lam * np.eye(d + 1)
        beta -= np.linalg.solve(H, g)
    return beta


def bce(o, t):
    return F.binary_cross_entropy_with_logits(o.squeeze(-1), t)


def test_glm_fits_match_numpy_newton_on_each_resample():
    X, y = _logistic()
    lam, B = 1e-2, 5
    idx = np.random.default_rng(1).integers(len(y), size=(B, len(y)))
    fits = N.newton_fits(nn.Linear(4, 1).double(), bce, torch.tensor(X[idx]), torch.tensor(y[idx]),
                         weight_decay=lam, gtol=1e-13)
    assert fits.converged.all() and fits.grad_max.max() <= 1e-13
    for b in range(B):
        ref = _numpy_logistic(X[idx[b]], y[idx[b]], lam)
        got = np.r_[fits.params["weight"][b].numpy().ravel(), fits.params["bias"][b].numpy()]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-11)
    assert (fits.min_eig > 0).all()


@pytest.mark.parametrize("activation", ["relu", "softplus"])
@pytest.mark.parametrize("kind", ["regression", "softmax", "binary"])
def test_closed_form_mlp_hessian_equals_torch_func(kind, activation):
    torch.manual_seed(0)
    d, h, k = (6, 5, 1) if kind != "softmax" else (4, 6, 3)
    act = nn.ReLU() if activation == "relu" else nn.Softplus()
    model = nn.Sequential(nn.Linear(d, h), act, nn.Linear(h, k)).double()
    assert N._one_hidden(model) == activation
    assert N._one_hidden(nn.Sequential(nn.Linear(d, h), nn.Softplus(beta=2), nn.Linear(h, k))) is None
    B, n, lam = 3, 200, 1e-2
    X = torch.randn(B, n, d, dtype=torch.float64)
    if kind == "softmax":
        y, loss = torch.randint(k, (B, n)), (lambda o, t: F.cross_entropy(o, t))
    elif kind == "regression":
        y, loss = torch.randn(B, n, dtype=torch.float64), (lambda o, t: 0.5 * (o.squeeze(-1) - t).square().mean())
    else:
        y, loss = torch.randint(2, (B, n)).double(), bce
    fm, _, unflatten, theta0 = N._functional(model, "cpu")
    theta = theta0 + 0.3 * torch.randn(B, len(theta0), dtype=torch.float64)

    def objective(th, xb, yb):
        return loss(fm(unflatten(th), xb), yb) + 0.5 * lam * th.square().sum()

    ref = vmap(hessian(objective))(theta, X, y)
    got = N._mlp_hessian(loss, d, h, k, lam, activation)(theta, X, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-13)


class Product(nn.Module):
    """f(x) = a * b * x: the origin is a saddle of the penalised least-squares loss when y ~ x."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.a * self.b * x.squeeze(-1)


def test_a_saddle_is_escaped_along_negative_curvature():
    x = torch.linspace(-2, 2, 101, dtype=torch.float64)
    y = 1.5 * x
    lam = 1e-2

    def loss(o, t):
        return 0.5 * (o - t).square().mean()

    fits = N.newton_fits(Product().double(), loss, x[None, :, None], y[None], weight_decay=lam, gtol=1e-12)
    a, b = float(fits.params["a"][0]), float(fits.params["b"][0])
    # the penalised optimum: |a| = |b|, a*b = c with c solving E[x^2] (c - 1.5) + lam = 0
    c = 1.5 - lam / float(x.square().mean())
    assert a * b == pytest.approx(c, rel=1e-9) and abs(a) == pytest.approx(abs(b), rel=1e-9)
    assert fits.converged.all() and (fits.min_eig > 0).all()
    # without escapes the solver stops at the saddle, and says so (negative curvature)
    stuck = N.newton_fits(Product().double(), loss, x[None, :, None], y[None], weight_decay=lam, escapes=0)
    assert float(stuck.params["a"][0]) == 0 and (stuck.min_eig < 0).all()
    assert not stuck.converged_within(torch.ones(2)).any()


def test_newton_bootstrap_equals_numpy_refits_on_the_same_resamples():
    X, y = _logistic(n=300)
    lam, B = 1e-3, 4
    model = nn.Linear(4, 1).double()
    reps, fits = newton_bootstrap(model, bce, (torch.tensor(X), torch.tensor(y)), B=B, weight_decay=lam, seed=3,
                                  gtol=1e-12)
    resample, _ = plan(len(y), B=B, epochs=0, seed=3)
    for b in range(B):
        rows = resample[b].numpy()
        ref = _numpy_logistic(X[rows], y[rows], lam)
        np.testing.assert_allclose(reps.params["weight"][b].numpy().ravel(), ref[:-1], rtol=0, atol=1e-10)
    assert (reps.grad_max <= 1e-12).all() and fits.converged_frac == 1.0


def test_drift_and_convergence_reports():
    X, y = _logistic(n=200)
    fits = N.newton_fits(nn.Linear(4, 1).double(), bce, torch.tensor(X)[None], torch.tensor(y)[None],
                         weight_decay=1e-2, max_iter=2)
    # two iterations from zero: far from the optimum and still moving
    assert not fits.converged.any() and fits.iterations == 2
    assert fits.drift.abs().max() > 0
    assert not fits.converged_within(torch.full((5,), 1e-6), tol=0.1).any()
    assert fits.converged_within(torch.full((5,), 1e3), tol=0.1).all()


def test_bad_input_is_a_clear_error():
    m = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match=r"stacked data X \(B, n, \.\.\.\)"):
        N.newton_fits(m, bce, torch.zeros(10, 3), torch.zeros(10))
    with pytest.raises(ValueError, match=r"start must have shape \(B, p\) = \(2, 4\)"):
        N.newton_fits(m, bce, torch.zeros(2, 10, 3), torch.zeros(2, 10), start=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="weight_decay"):
        N.newton_fits(m, bce, torch.zeros(2, 10, 3), torch.zeros(2, 10), weight_decay=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        bootstrap_replicates(m, bce, (torch.zeros(10, 3), torch.zeros(10)), B=2, optimizer="lbfgs")


def test_load_flat_round_trip():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    theta = N.flat_parameters(m)
    back = N.load_flat(m, theta * 2)
    torch.testing.assert_close(N.flat_parameters(back), theta * 2)
    with pytest.raises(ValueError, match="theta has 3 entries but the model has 11 parameters"):
        N.load_flat(m, theta[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_newton_runs_where_its_data_are():
    """Every tensor Newton allocates follows the data's device (eye, step sizes, flags were on the CPU)."""
    X, y = _logistic(n=200)
    Xc, yc = torch.tensor(X, device="cuda")[None], torch.tensor(y, device="cuda")[None]
    fits = N.newton_fits(nn.Linear(4, 1).double().cuda(), bce, Xc, yc, weight_decay=1e-3, gtol=1e-10)
    assert fits.params["weight"].device.type == "cuda" and bool(fits.converged.all())
    ref = N.newton_fits(nn.Linear(4, 1).double(), bce, torch.tensor(X)[None], torch.tensor(y)[None], weight_decay=1e-3,
                        gtol=1e-10)
    torch.testing.assert_close(fits.params["weight"].cpu(), ref.params["weight"], rtol=0, atol=1e-10)


# --- issue 35: per-problem budgets, units grown out of zero, the kink-aware certificate ---------

def _relu_problem(n=300, d=3, h=3, seed=0):
    """y = relu(x1) - relu(-x2) + noise: two units' worth of signal, three units."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.maximum(X[:, 0], 0) - np.maximum(-X[:, 1], 0) + 0.5 * rng.standard_normal(n)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 1)).double()
    return torch.tensor(X)[None], torch.tensor(y)[None], net


def _mse(o, t):
    return 0.5 * (o.squeeze(-1) - t).square().mean()


def _objective_np(theta, X, y, lam, d, h):
    W1, b1, W2, b2 = theta[:h * d].reshape(h, d), theta[h * d:h * d + h], theta[h * d + h:h * d + 2 * h], theta[-1]
    f = np.maximum(X @ W1.T + b1, 0) @ W2 + b2
    return 0.5 * np.mean((f - y) ** 2) + 0.5 * lam * theta @ theta


def test_a_network_at_zero_is_a_saddle_the_hessian_cannot_see_and_births_leave_it():
    X, y, net = _relu_problem()
    lam, d, h = 1e-2, 3, 3
    zero = torch.zeros(1, 16, dtype=torch.float64)
    stuck = N.newton_fits(net, _mse, X, y, start=zero, weight_decay=lam, births=0, gtol=1e-10)
    th0 = torch.cat([stuck.params[k].flatten(1) for k, _ in net.named_parameters()], 1)
    # at zero every unit's Hessian block is lambda I: positive, yet the point is a saddle
    assert float(stuck.min_eig[0]) > 0 and float(th0[0, :-1].abs().max()) == 0
    cert0 = N.certify(th0, X, y, _mse, d=d, h=h, weight_decay=lam)
    assert bool(cert0.saddle_at_zero[0]) and not bool(cert0.certified[0])
    assert float(np.nanmax(cert0.birth[0].numpy())) > 1
    grown = N.newton_fits(net, _mse, X, y, start=zero, weight_decay=lam, gtol=1e-10, max_iter=300)
    th = torch.cat([grown.params[k].flatten(1) for k, _ in net.named_parameters()], 1)
    cert = N.certify(th, X, y, _mse, d=d, h=h, weight_decay=lam)
    assert bool(cert.certified[0]), cert.verdicts()
    Xn, yn = X[0].numpy(), y[0].numpy()
    assert _objective_np(th[0].numpy(), Xn, yn, lam, d, h) < _objective_np(th0[0].numpy(), Xn, yn, lam, d, h) - 1e-3


def test_relu_certificate_eigenvalue_is_torch_funcs():
    X, y, net = _relu_problem(seed=1)
    lam, d, h = 1e-2, 3, 3
    fits = N.newton_fits(net, _mse, X, y, weight_decay=lam, gtol=1e-10, max_iter=300)
    th = torch.cat([fits.params[k].flatten(1) for k, _ in net.named_parameters()], 1)
    cert = N.certify(th, X, y, _mse, d=d, h=h, weight_decay=lam)
    fm, _, unflatten, _ = N._functional(net, "cpu")
    H = hessian(lambda t: _mse(fm(unflatten(t), X[0]), y[0]) + 0.5 * lam * t.square().sum())(th[0]).numpy()
    assert float(cert.min_eig[0]) == pytest.approx(np.linalg.eigvalsh(H)[0], abs=1e-12)
    assert cert.se.shape == (1, 16) and bool((cert.se > 0).all())


def _softplus_objective_np(theta, X, y, lam, d, h, beta):
    W1, b1, W2, b2 = theta[:h * d].reshape(h, d), theta[h * d:h * d + h], theta[h * d + h:h * d + 2 * h], theta[-1]
    a = X @ W1.T + b1
    z = np.logaddexp(0, beta * a) / beta
    r = z @ W2 + b2 - y
    f = 0.5 * np.mean(r ** 2) + 0.5 * lam * theta @ theta
    s = 1 / (1 + np.exp(-beta * a))                                    # phi'
    gW2 = z.T @ r / len(y)
    gb2 = r.mean()
    ga = (r[:, None] * W2[None, :]) * s / len(y)
    grad = np.r_[(ga.T @ X).ravel(), ga.sum(0), gW2, gb2] + lam * theta
    return f, grad


def test_smooth_polish_is_scipys_minimum_of_the_surrogate():
    """The surrogate's optimum: L-BFGS (scipy, numpy objective and gradient) from a perturbed start
    reaches the same point, and nothing lower; the eigenvalue is numpy's of torch.func's Hessian."""
    from scipy.optimize import minimize

    X, y, net = _relu_problem(seed=1)
    lam, d, h, beta = 1e-2, 3, 3, 100.0
    fits = N.newton_fits(net, _mse, X, y, weight_decay=lam, gtol=1e-10, max_iter=300)
    relu = torch.cat([fits.params[k].flatten(1) for k, _ in net.named_parameters()], 1)
    sp = N.smooth_polish(relu, X, y, _mse, d=d, h=h, weight_decay=lam, betas=(beta,))
    assert bool(sp.certified[0]) and float(sp.grad_max[0]) < 1e-10
    Xn, yn, t0 = X[0].numpy(), y[0].numpy(), sp.theta[0].numpy()
    start = t0 + 0.02 * np.random.default_rng(0).standard_normal(16)
    res = minimize(_softplus_objective_np, start, args=(Xn, yn, lam, d, h, beta), jac=True, method="L-BFGS-B",
                   options=dict(ftol=1e-15, gtol=1e-12, maxiter=5000))
    np.testing.assert_allclose(res.x, t0, atol=1e-5)
    assert res.fun >= _softplus_objective_np(t0, Xn, yn, lam, d, h, beta)[0] - 1e-13
    soft = nn.Sequential(nn.Linear(d, h), nn.Softplus(beta=beta), nn.Linear(h, 1)).double()
    fm, _, unflatten, _ = N._functional(soft, "cpu")
    H = hessian(lambda t: _mse(fm(unflatten(t), X[0]), y[0]) + 0.5 * lam * t.square().sum())(sp.theta[0]).numpy()
    assert float(sp.min_eig[0]) == pytest.approx(np.linalg.eigvalsh(H)[0], abs=1e-10)
    # the difference from ReLU, measured: the ReLU objective at the surrogate's optimum minus at the start
    gap = _objective_np(t0, Xn, yn, lam, d, h) - _objective_np(relu[0].numpy(), Xn, yn, lam, d, h)
    assert float(sp.relu_gap[0]) == pytest.approx(gap, abs=1e-14)


def test_closed_form_hessian_of_a_sharp_softplus_equals_torch_func():
    torch.manual_seed(0)
    d, h, k, beta, lam = 4, 3, 1, 50.0, 1e-2
    model = nn.Sequential(nn.Linear(d, h), nn.Softplus(beta=beta), nn.Linear(h, k)).double()
    X, y = torch.randn(2, 100, d, dtype=torch.float64), torch.randn(2, 100, dtype=torch.float64)
    fm, _, unflatten, theta0 = N._functional(model, "cpu")
    theta = theta0 + 0.3 * torch.randn(2, len(theta0), dtype=torch.float64)
    ref = vmap(hessian(lambda th, xb, yb: _mse(fm(unflatten(th), xb), yb) + 0.5 * lam * th.square().sum()))(theta, X, y)
    got = N._mlp_hessian(_mse, d, h, k, lam, "softplus", beta)(theta, X, y)
    # PyTorch's softplus is linear where beta * a > 20; the closed form keeps phi'' there (< 2 beta e-9)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-8)


def test_smooth_polish_bad_input_is_a_clear_error():
    X, y, net = _relu_problem(n=50)
    th = N.flat_parameters(net)[None]
    with pytest.raises(ValueError, match="betas must be a non-empty increasing sequence"):
        N.smooth_polish(th, X, y, _mse, d=3, h=3, weight_decay=1e-2, betas=(100.0, 10.0))
    with pytest.raises(ValueError, match=r"smooth_polish needs theta \(B, p=16\)"):
        N.smooth_polish(th[:, :4], X, y, _mse, d=3, h=3, weight_decay=1e-2)


def test_a_kink_makes_the_plain_step_large_and_the_subgradient_step_small():
    """A ReLU optimum on n samples sits on kinks: the plain Newton step stays a sizeable fraction of
    an SE, the kink-aware one is small (the point is certified only by the latter)."""
    X, y, net = _relu_problem(n=2000, seed=2)
    lam, d, h = 1e-3, 3, 3
    fits = N.newton_fits(net, _mse, X, y, weight_decay=lam, gtol=1e-12, max_iter=300)
    th = torch.cat([fits.params[k].flatten(1) for k, _ in net.named_parameters()], 1)
    cert = N.certify(th, X, y, _mse, d=d, h=h, weight_decay=lam)
    assert int(cert.kinks[0]) > 0
    assert float(cert.step_se[0]) <= float(cert.step_plain_se[0])
    assert float(cert.step_se[0]) <= 0.1


def test_each_problem_has_its_own_step_budget():
    X, y, net = _relu_problem(n=200)
    Xs, ys = torch.cat([X, X]), torch.cat([y, y])
    theta = N.flat_parameters(net)
    start = torch.stack([theta, theta + 2.0])          # the second starts far away
    fits = N.newton_fits(net, _mse, Xs, ys, start=start, weight_decay=1e-2, max_iter=7)
    assert fits.steps.shape == (2,) and int(fits.steps.max()) <= 7 and fits.iterations == int(fits.steps.max())


def test_certify_bad_input_is_a_clear_error():
    X, y, net = _relu_problem(n=50)
    th = N.flat_parameters(net)[None]
    with pytest.raises(ValueError, match=r"certify needs theta \(B, p=16\)"):
        N.certify(th[:, :5], X, y, _mse, d=3, h=3, weight_decay=1e-2)
    with pytest.raises(ValueError, match="weight_decay"):
        N.certify(th, X, y, _mse, d=3, h=3, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"one output \(k = 1\), got k = 2"):
        N.certify(th, X, y, _mse, d=3, h=3, k=2, weight_decay=1e-2)
    with pytest.raises(ValueError, match="births"):
        N.newton_fits(net, _mse, X, y, births=-1)
