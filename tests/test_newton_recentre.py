"""mustat.newton_recentre: full-data Newton steps from an interval centre, against statsmodels' and
scipy's optima of the same (penalised) logistic likelihood."""

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from scipy.optimize import minimize
from sklearn.datasets import load_breast_cancer

import mustat


def _data():
    data = load_breast_cancer()
    X = data.data[:, :6]
    X = (X - X.mean(0)) / X.std(0)
    return X, data.target.astype(float)


def _summed_bce(out, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1).to(out.dtype),
                                                                reduction="sum")


def _glm(beta: np.ndarray, dtype=torch.float64) -> torch.nn.Linear:
    glm = torch.nn.Linear(len(beta) - 1, 1).to(dtype)
    with torch.no_grad():
        glm.weight.copy_(torch.tensor(beta[:-1])[None])
        glm.bias.copy_(torch.tensor(beta[-1:]))
    return glm


def _beta(moved: dict) -> np.ndarray:
    return np.concatenate([moved["weight"].double().flatten().numpy(), moved["bias"].double().numpy()])


def test_newton_steps_reach_statsmodels_mle_quadratically():
    X, y = _data()
    mle = sm.Logit(y, sm.add_constant(X, prepend=False)).fit(disp=0, tol=1e-12).params
    start = mle + 0.05 * np.random.default_rng(0).standard_normal(len(mle))
    glm = _glm(start)
    data = (torch.tensor(X), torch.tensor(y))
    before = [p.detach().clone() for p in glm.parameters()]
    dist = [np.abs(start - mle).max()]
    for steps in (1, 2, 3):
        dist.append(np.abs(_beta(mustat.newton_recentre(glm, _summed_bce, data, steps=steps)) - mle).max())
    # Newton's quadratic convergence: each error at most a constant times the previous one squared
    assert dist[1] < 10 * dist[0] ** 2 and dist[2] < 10 * dist[1] ** 2
    assert dist[3] < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(before, glm.parameters()))       # the model is not modified


def test_weight_decay_moves_to_the_penalised_optimum():
    X, y = _data()
    wd = 0.05
    Xa = np.c_[X, np.ones(len(y))]

    def objective(beta):      # PyTorch's convention: the L2 term on the mean loss, every parameter
        eta = Xa @ beta
        return np.mean(np.logaddexp(0, eta) - y * eta) + 0.5 * wd * beta @ beta

    def gradient(beta):
        return Xa.T @ (1 / (1 + np.exp(-Xa @ beta)) - y) / len(y) + wd * beta

    ref = minimize(objective, np.zeros(Xa.shape[1]), jac=gradient, method="BFGS", options={"gtol": 1e-12}).x
    glm = _glm(np.zeros(Xa.shape[1]))
    moved = mustat.newton_recentre(glm, _summed_bce, (torch.tensor(X), torch.tensor(y)), weight_decay=wd, steps=6)
    np.testing.assert_allclose(_beta(moved), ref, atol=1e-8)


def test_params_restricts_what_moves_and_dtypes_are_kept():
    X, y = _data()
    glm = _glm(np.zeros(X.shape[1] + 1), dtype=torch.float32)
    moved = mustat.newton_recentre(glm, _summed_bce, (torch.tensor(X, dtype=torch.float32), torch.tensor(y)),
                                   params=["bias"])
    assert set(moved) == {"bias"} and moved["bias"].dtype == torch.float32
    # with the weights held at 0 the bias's Newton step from 0 is the logit's score over its information
    p = y.mean()
    assert float(moved["bias"]) == pytest.approx((p - 0.5) / 0.25, rel=1e-6)


def test_bad_input_is_refused_before_work():
    X, y = _data()
    glm = _glm(np.zeros(X.shape[1] + 1))
    data = (torch.tensor(X), torch.tensor(y))
    with pytest.raises(ValueError, match="steps"):
        mustat.newton_recentre(glm, _summed_bce, data, steps=0)
    with pytest.raises(ValueError, match="weight_decay"):
        mustat.newton_recentre(glm, _summed_bce, data, weight_decay=-1.0)
    # a hidden layer at the origin: a flat, singular Hessian, where no Newton step exists
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    with pytest.raises(ValueError, match="not positive definite"):
        mustat.newton_recentre(net, _summed_bce, data)


@pytest.mark.parametrize("how", ["torch-prune", "mustat"])
def test_pruned_entries_stay_at_zero_and_the_rest_reach_the_reduced_mle(how):
    X, y = _data()
    keep = np.array([True, True, False, True, True, False])
    mle = sm.Logit(y, sm.add_constant(X[:, keep], prepend=False)).fit(disp=0, tol=1e-12).params
    glm = _glm(np.zeros(X.shape[1] + 1))
    mask = torch.tensor(keep, dtype=torch.float64)[None]
    torch.nn.utils.prune.custom_from_mask(glm, "weight", mask)
    if how == "mustat":
        mustat.from_torch_prune(glm)        # mustat's own mask parametrization
    moved = mustat.newton_recentre(glm, _summed_bce, (torch.tensor(X), torch.tensor(y)), steps=25)
    w = moved["weight"].flatten().numpy()
    assert np.all(w[~keep] == 0)
    beta = np.r_[w[keep], moved["bias"].numpy()]
    Xa = np.c_[X[:, keep], np.ones(len(y))]
    score = Xa.T @ (1 / (1 + np.exp(-Xa @ beta)) - y)       # the reduced model's score: 0 at its MLE
    assert np.abs(score).max() < 1e-8
    np.testing.assert_allclose(beta, mle, atol=1e-6)        # statsmodels stops earlier on this near-separated fit
