"""The study's references: numpy GLM references against mustat's torch Wald code and
statsmodels; hidden-layer gauge fixing (matching, balance) and teacher replicates."""

import numpy as np
import pytest
import statsmodels.api as sm
import torch

import mustat
from mustat.models import GLM
from validation import references as R
from validation.designs import get_design
from validation.glm import fit_glm


def _stack(family, reps=3, n=500, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((reps, n, 3)) * np.array([0.5, 1.0, 2.0])
    eta = X @ np.array([1.0, 0.0, -0.4]) + 0.2
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float) if family == "logistic" else eta + rng.standard_normal(eta.shape)
    return X, y


@pytest.mark.parametrize("family", ["logistic", "linear"])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_glm_references_equal_mustat_torch_wald(family, wd):
    X, y = _stack(family)
    ref = R.glm_references(family, X, y, weight_decay=wd)
    for r in range(len(X)):
        Xt, yt = torch.tensor(X[r]), torch.tensor(y[r])
        fit = fit_glm(GLM(3, family).double(), Xt, yt, weight_decay=wd)
        np.testing.assert_allclose(ref["coef"][r], fit.linear.weight.detach().numpy().ravel(), rtol=0, atol=1e-8)
        for kind, key in (("observed", "se_observed"), ("sandwich", "se_sandwich")):
            se = mustat.hessian_se(fit, fit.nll, (Xt, yt), kind=kind, weight_decay=wd)["linear.weight"]
            np.testing.assert_allclose(ref[key][r], se.numpy().ravel(), rtol=1e-7)
    assert (ref["inv_sqrt_vif"] > 0).all() and (ref["inv_sqrt_vif"] <= 1 + 1e-12).all()


def test_glm_references_equal_statsmodels_without_penalty():
    X, y = _stack("logistic", reps=2)
    ref = R.glm_references("logistic", X, y)
    for r in range(2):
        res = sm.Logit(y[r], sm.add_constant(X[r], prepend=False)).fit(disp=0)
        np.testing.assert_allclose(ref["coef"][r], res.params[:3], rtol=1e-8)
        np.testing.assert_allclose(ref["se_observed"][r], res.bse[:3], rtol=1e-8)
        hc0 = sm.Logit(y[r], sm.add_constant(X[r], prepend=False)).fit(disp=0, cov_type="HC0")
        np.testing.assert_allclose(ref["se_sandwich"][r], hc0.bse[:3], rtol=1e-8)


def test_separable_logistic_design_is_an_error():
    X = np.linspace(-1, 1, 40)[None, :, None]
    y = (X[..., 0] > 0).astype(float)
    with pytest.raises(RuntimeError, match="did not converge.*separable"):
        R.glm_fit("logistic", X, y)
    _, grad = R.glm_fit("logistic", X, y, strict=False)  # a bootstrap reports it instead
    assert grad[0] == np.inf
    with pytest.raises(ValueError, match="family='poisson' is not valid"):
        R.glm_fit("poisson", X, y)


def test_matching_undoes_a_permutation_and_keeps_the_function():
    torch.manual_seed(0)
    net = get_design("teacher-regression").teacher()
    params = {k: v.detach() for k, v in net.named_parameters()}
    perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
    shuffled = R.permute_units(params, perm, "0", "2")
    x = torch.randn(20, 6, dtype=torch.float64)
    out = torch.func.functional_call(net, shuffled, (x,))
    torch.testing.assert_close(out, net(x))  # a permutation of hidden units is the same function
    found = R.match_units(R.unit_vectors(shuffled, "0", "2"), R.unit_vectors(params, "0", "2"))
    back = R.permute_units(shuffled, found, "0", "2")
    for k in params:
        torch.testing.assert_close(back[k], params[k])


def test_penalised_optimum_is_balanced_and_a_strict_minimum():
    design = get_design("teacher-regression")
    X, y, _ = design.sample(0)
    fitted, fit = R.polish(design.teacher(), design.loss(), torch.tensor(X), torch.tensor(y), weight_decay=1e-2)
    params = {k: v.detach() for k, v in fitted.named_parameters()}
    # the penalty fixes the ReLU rescaling gauge: |w_in|^2 + b^2 = |w_out|^2 at its optimum
    assert R.balance(params, "0", "2").abs().max() < 1e-6
    assert float(fit.min_eig[0]) > 0
    # the teacher itself is not balanced (nothing fixed its gauge)
    teacher = {k: v.detach() for k, v in design.teacher().named_parameters()}
    assert R.balance(teacher, "0", "2").abs().max() > 0.1


def test_teacher_replicates_are_converged_matched_and_balanced():
    design = get_design("teacher-regression")
    data = [design.sample(10_000 + r) for r in range(6)]
    Xs = torch.tensor(np.stack([a[0] for a in data]))
    ys = torch.tensor(np.stack([a[1] for a in data]))
    ref = R.teacher_replicates(design.teacher(), design.loss(), Xs, ys, weight_decay=1e-2)
    # six replicates give a rough SD to measure drift against: at least five of six pass
    assert ref["converged_frac"] >= 5 / 6 and ref["balance_max"] < 1e-6 and ref["swapped"] == 0
    assert ref["params"]["0.weight"].shape == (6, 8, 6)
    sd = torch.cat([v.flatten() for v in ref["sd"].values()])
    assert (sd > 0).all() and torch.isfinite(sd).all()
    # replicate SDs are sampling SDs at n = 2000: of order 1/sqrt(n) times O(1), not 0 or O(1)
    assert 0.005 < float(sd.median()) < 0.5


def test_the_smooth_teacher_polishes_to_a_strict_minimum_that_need_not_be_balanced():
    design = get_design("teacher-softplus")
    assert isinstance(design.teacher()[1], torch.nn.Softplus) and isinstance(design.model(0)[1], torch.nn.Softplus)
    X, y, _ = design.sample(0)
    fitted, fit = R.polish(design.teacher(), design.loss(), torch.tensor(X), torch.tensor(y), weight_decay=1e-2)
    assert float(fit.grad_max[0]) < 1e-9 and float(fit.min_eig[0]) > 0
    # softplus has no rescaling orbit, so the penalty does not balance its units
    params = {k: v.detach() for k, v in fitted.named_parameters()}
    assert R.balance(params, "0", "2").abs().max() > 1e-3
