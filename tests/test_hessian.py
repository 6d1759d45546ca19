"""Reference standard errors: a network with no hidden layer is a GLM, and mustat
must give statsmodels' answer."""

import warnings

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from torch import nn

import mustat
from mustat.models import GLM
from mustat.uncertainty import hessian_se
from validation.glm import fit_glm


def _standardize(X):
    return (X - X.mean(0)) / X.std(0)


def _design(kind):
    rng = np.random.default_rng(11)
    if kind == "logistic-sim":
        X = rng.standard_normal((600, 5)) * [0.2, 1, 4, 1, 2]
        X[:, 3] += 0.8 * X[:, 1]  # correlated features
        eta = 0.3 + X @ np.array([2.0, 0.0, -0.3, 0.5, 0.0])
        return "logistic", X, rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float), 2
    if kind == "logistic-real":
        data = load_breast_cancer()
        return "logistic", _standardize(data.data[:, [0, 1, 4, 8]]), data.target.astype(float), 2
    if kind == "softmax-sim":
        X = rng.standard_normal((800, 3)) * [0.5, 1, 2]
        logits = np.c_[np.zeros(800), X @ rng.standard_normal((3, 2)) * 0.6]
        P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return "softmax", X, (P.cumsum(1) > rng.random((800, 1))).argmax(1), 3
    if kind == "softmax-real":
        data = load_wine()
        return "softmax", _standardize(data.data[:, [1, 2, 3]]), data.target, 3
    if kind == "linear-sim":
        X = rng.standard_normal((300, 4)) * [0.1, 1, 10, 1]
        return "linear", X, 1 + X @ np.array([3.0, 0.0, 0.1, -1.0]) + rng.standard_normal(300), 2
    data = load_diabetes()
    return "linear", data.data, data.target, 2


def _statsmodels(family, X, y, cov_type):
    Xc = sm.add_constant(X)
    if family == "logistic":
        return sm.Logit(y, Xc).fit(disp=0, method="newton", tol=1e-12, cov_type=cov_type)
    if family == "softmax":
        return sm.MNLogit(y, Xc).fit(disp=0, method="newton", tol=1e-12, maxiter=100, cov_type=cov_type)
    return sm.OLS(y, Xc).fit(cov_type=cov_type, use_t=False)


def _stack(model, d):
    """mustat's (bias, weight) in statsmodels' layout: (const + features) x outputs."""
    return np.c_[d["linear.bias"].numpy(), d["linear.weight"].numpy()].T.squeeze()


DESIGNS = ["logistic-sim", "logistic-real", "softmax-sim", "softmax-real", "linear-sim", "linear-real"]


@pytest.mark.parametrize("kind", ["observed", "sandwich"])
@pytest.mark.parametrize("design", DESIGNS)
def test_glm_reproduces_statsmodels(design, kind):
    family, X, y, k = _design(design)
    ref = _statsmodels(family, X, y, "nonrobust" if kind == "observed" else "HC0")
    Xt, yt = torch.tensor(X), torch.tensor(y)
    model = fit_glm(GLM(X.shape[1], family, n_classes=k), Xt, yt)
    coef = _stack(model, {n: p.detach() for n, p in model.named_parameters()})
    np.testing.assert_allclose(coef, np.asarray(ref.params), rtol=1e-5)
    scale = "estimate" if family == "linear" else 1.0
    se = hessian_se(model, model.nll, (Xt, yt), kind=kind, scale=scale)
    np.testing.assert_allclose(_stack(model, se), np.asarray(ref.bse), rtol=1e-4)
    res = mustat.wald(model, se)
    p = _stack(model, {k_: torch.tensor(v) for k_, v in res.pvalues.items()})
    np.testing.assert_allclose(p, np.asarray(ref.pvalues), rtol=1e-3, atol=1e-12)
    ci = res.conf_int()
    lo = _stack(model, {k_: torch.tensor(v[..., 0]) for k_, v in ci.items()})
    ref_ci = np.asarray(ref.conf_int())
    ref_lo = ref_ci[..., 0] if family == "softmax" else ref_ci[:, 0]
    if family == "softmax":  # statsmodels stacks MNLogit intervals as (outputs, params, 2)
        ref_lo = np.asarray(ref.conf_int()).reshape(k - 1, -1, 2)[..., 0].T
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-4, atol=1e-6 * np.abs(ref_lo).max())


def test_pruned_weight_is_conditioned_on():
    # Pruning coefficient j = fitting the GLM without column j.
    family, X, y, _ = _design("logistic-sim")
    Xt, yt = torch.tensor(X), torch.tensor(y)
    glm = GLM(5).double()
    mustat.prune(glm, {"linear.weight": torch.tensor([[5.0, 0.0, 5.0, 5.0, 5.0]])}, sparsity=0.2)
    model = fit_glm(glm, Xt, yt)
    se = hessian_se(model, model.nll, (Xt, yt))
    ref = sm.Logit(y, sm.add_constant(np.delete(X, 1, axis=1))).fit(disp=0, method="newton", tol=1e-12)
    assert se["linear.weight"][0, 1] == 0 and model.linear.weight[0, 1] == 0
    np.testing.assert_allclose(np.r_[se["linear.bias"].numpy(), np.delete(se["linear.weight"].numpy().ravel(), 1)],
                               ref.bse, rtol=1e-4)


def test_singular_hessian_raises_with_advice_and_damping_works():
    torch.manual_seed(0)
    X = torch.randn(200, 3, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    # one free logit per class: adding a vector to every class leaves the softmax unchanged
    over = nn.Linear(3, 3).double()

    def loss(out, t):
        return nn.functional.cross_entropy(out, t, reduction="sum")

    with pytest.raises(ValueError, match="not positive definite.*damping"):
        hessian_se(over, loss, (X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se = hessian_se(over, loss, (X, y), damping=1e-3)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in se.values())
    assert set(se) == {"weight", "bias"}


def test_hessian_se_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = torch.randn(50, 3), torch.randn(50)
    with pytest.raises(ValueError):  # an unfitted ReLU net: not at a minimum
        hessian_se(model, lambda o, t: 0.5 * (o.squeeze(-1) - t).square().sum(), (X, y))
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="fisher"), "observed, sandwich"),
    (dict(damping=-1.0), "damping must be in"),
    (dict(scale="mle"), "scale='mle' is not valid"),
    (dict(scale=0.0), "scale must be in"),
])
def test_hessian_se_bad_arguments(kwargs, match):
    model = GLM(2).double()
    with pytest.raises(ValueError, match=match):
        hessian_se(model, model.nll, (torch.randn(10, 2), torch.ones(10)), **kwargs)


def _penalised_reference(family, X, y, wd):
    """Penalised GLM in numpy float64: Newton on mean NLL + wd/2 |theta|^2 (bias included), then
    H = sum_i w_i x_i x_i^T + n wd I, psi_i = x_i r_i + wd theta, sandwich H^-1 (sum psi psi^T) H^-1."""
    n = len(X)
    Xc = np.c_[np.ones(n), X]
    theta = np.zeros(Xc.shape[1])
    for _ in range(100):
        eta = Xc @ theta
        mu = eta if family == "linear" else 1 / (1 + np.exp(-eta))
        w = np.ones(n) if family == "linear" else mu * (1 - mu)
        grad = Xc.T @ (mu - y) + n * wd * theta
        H = (Xc * w[:, None]).T @ Xc + n * wd * np.eye(len(theta))
        theta -= np.linalg.solve(H, grad)
    psi = Xc * (mu - y)[:, None] + wd * theta
    Hinv = np.linalg.inv(H)
    return theta, np.sqrt(np.diag(Hinv)), np.sqrt(np.diag(Hinv @ psi.T @ psi @ Hinv))


@pytest.mark.parametrize("family", ["logistic", "linear"])
def test_penalised_fit_and_standard_errors_match_numpy(family):
    rng = np.random.default_rng(8)
    X = rng.standard_normal((400, 3)) * [0.5, 1, 2]
    X[:, 2] += X[:, 1]
    eta = 0.2 + X @ np.array([1.0, -0.5, 0.0])
    y = (rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "logistic" else eta + rng.standard_normal(400)).astype(float)
    wd = 0.03
    theta, se_obs, se_sand = _penalised_reference(family, X, y, wd)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    fit = fit_glm(GLM(3, family), Xt, yt, weight_decay=wd)
    coef = np.r_[fit.linear.bias.detach().numpy(), fit.linear.weight.detach().numpy().ravel()]
    np.testing.assert_allclose(coef, theta, rtol=1e-9, atol=1e-12)
    for kind, ref in (("observed", se_obs), ("sandwich", se_sand)):
        se = hessian_se(fit, fit.nll, (Xt, yt), kind=kind, weight_decay=wd)
        ours = np.r_[se["linear.bias"].numpy(), se["linear.weight"].numpy().ravel()]
        np.testing.assert_allclose(ours, ref, rtol=1e-9)
    # the penalty is not negligible here, so leaving it out would fail this test
    unpen = hessian_se(fit, fit.nll, (Xt, yt), kind="observed")["linear.weight"].numpy().ravel()
    assert np.max(np.abs(unpen / se_obs[1:] - 1)) > 1e-3


def test_subset_standard_errors_do_not_require_grad():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    X, y = torch.randn(50, 3), torch.randn(50)
    se = hessian_se(model, lambda o, t: 0.5 * (o.squeeze(-1) - t).square().sum(), (X, y), params=["2.weight"], damping=1.0)
    assert list(se) == ["2.weight"] and not se["2.weight"].requires_grad


def test_information_has_one_shape():
    from mustat.uncertainty import information

    glm = GLM(2)
    X, y = torch.randn(20, 2), torch.randint(0, 2, (20,)).double()
    a = information(glm, glm.nll, (X, y))
    b = information(glm, glm.nll, (X, y), sandwich=True, weight_decay=0.1)
    assert a.J is None and b.J is not None and a.gradient.shape == b.gradient.shape == (3,)
    torch.testing.assert_close(b.H - a.H, 20 * 0.1 * torch.eye(3, dtype=torch.float64))
