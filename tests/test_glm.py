"""validation.glm.fit_glm: exact GLM optima against statsmodels, pruned coefficients held at 0,
separable data refused (statsmodels refuses them too)."""

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from sklearn.datasets import load_breast_cancer

import mustat
from mustat.models import GLM
from validation.glm import SeparationError, fit_glm, separated


@pytest.fixture(scope="module")
def cancer():
    d = load_breast_cancer()
    return (d.data - d.data.mean(0)) / d.data.std(0), d.target.astype(float)


def test_logistic_fit_and_ses_equal_statsmodels(cancer):
    X, y = cancer[0][:, :10], cancer[1]
    model = fit_glm(GLM(10), torch.tensor(X), torch.tensor(y))
    ref = sm.Logit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12)
    ours = np.r_[model.linear.bias.detach().numpy(), model.linear.weight.detach().numpy().ravel()]
    np.testing.assert_allclose(ours, ref.params, rtol=1e-8, atol=1e-10)
    se = mustat.hessian_se(model, model.nll, (torch.tensor(X), torch.tensor(y)))
    np.testing.assert_allclose(np.r_[se["linear.bias"].numpy(), se["linear.weight"].numpy().ravel()], ref.bse, rtol=1e-8)


def test_softmax_fit_equals_mnlogit():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 3))
    logits = np.c_[np.zeros(400), X @ np.array([[1.0, -0.5], [0.5, 0.2], [0.0, 1.0]])]
    y = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).cumsum(1) > rng.random((400, 1))
    y = y.argmax(1)
    model = fit_glm(GLM(3, "softmax", n_classes=3), torch.tensor(X), torch.tensor(y))
    ref = sm.MNLogit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12)
    np.testing.assert_allclose(model.linear.weight.detach().numpy().T, ref.params[1:], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(model.linear.bias.detach().numpy(), ref.params[0], rtol=1e-7, atol=1e-9)


def test_separable_data_are_refused_with_a_remedy(cancer):
    """All 30 standardised features separate the classes: the fit diverged to 6e4-1e22 and once
    passed its tolerance by underflow; now it says so, and offers the penalty."""
    X, y = cancer
    assert separated(X, y) and not separated(X[:, :10], y)
    with pytest.raises(SeparationError, match="separable.*weight_decay > 0"):
        fit_glm(GLM(30), torch.tensor(X), torch.tensor(y))
    fitted = fit_glm(GLM(30), torch.tensor(X), torch.tensor(y), weight_decay=1e-3)
    assert float(fitted.linear.weight.detach().abs().max()) < 10
    # quasi-complete separation: one feature separates all but the tied rows
    x = np.r_[-np.ones(20), np.zeros(20), np.ones(20)][:, None]
    yq = np.r_[np.zeros(20), np.tile([0.0, 1.0], 10), np.ones(20)]
    assert separated(x, yq)
    with pytest.raises(SeparationError):
        fit_glm(GLM(1), torch.tensor(x), torch.tensor(yq))


def test_fit_glm_leaves_the_model_alone_and_needs_a_glm():
    glm = GLM(2)
    before = glm.linear.weight.detach().clone()
    X = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (X[:, 0] + torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64) > 0).double()
    fitted = fit_glm(glm, X, y)
    assert torch.equal(glm.linear.weight, before) and fitted.linear.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="mustat.models.GLM"):
        fit_glm(torch.nn.Linear(2, 1), X, y)
