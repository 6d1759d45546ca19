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
