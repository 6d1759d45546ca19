import numpy as np
import pytest
import statsmodels.api as sm
import torch
from torch import nn

import mustat
from mustat.data import glm_design
from mustat.models import GLM
from mustat.uncertainty import FitContext, bootstrap_replicates, bootstrap_se, make_estimator
from validation.bootstrap import bootstrap_replicates_loop
from validation.glm import fit_glm


def mean_nll(model):
    return lambda out, t: model.nll(out, t) / len(t)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("optimizer, batch_size", [("adam", 16), ("sgd", 25)])
def test_vectorized_equals_loop_replicate_by_replicate(optimizer, batch_size, weight_decay):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (50,))

    def loss(out, t):
        return nn.functional.cross_entropy(out, t)

    kw = dict(B=6, epochs=3, lr=0.05, batch_size=batch_size, optimizer=optimizer, momentum=0.9, seed=7,
              weight_decay=weight_decay)
    fast = bootstrap_replicates(model, loss, (X, y), **kw).params
    slow = bootstrap_replicates_loop(model, loss, (X, y), **kw)
    assert set(fast) == set(slow) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(fast["0.weight"][0], fast["0.weight"][1])  # replicates differ
    assert torch.equal(model[0].weight, model[0].weight.detach())  # model untouched (a smoke check)


def test_bootstrap_se_of_logistic_glm_matches_statsmodels():
    X, y, _ = glm_design("logistic", n=2000, coef=(1.0, -0.5, 0.0), scales=(1.0, 2.0, 0.5), seed=3)
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    fit = fit_glm(GLM(3), Xt, yt)
    B = 400
    se = bootstrap_se(fit, mean_nll(fit), (Xt, yt), B=B, epochs=300, lr=0.05, seed=0)
    ref = sm.Logit(y, sm.add_constant(X)).fit(disp=0).bse
    ours = np.r_[se["linear.bias"].numpy(), se["linear.weight"].numpy().ravel()]
    # An SD from B draws has relative standard error ~ 1/sqrt(2 (B - 1)) = 0.035 here; allow
    # 3.5 of them (4 coefficients) for Monte Carlo error. Bootstrap and observed-information SEs
    # differ by O(1/n) beyond that, negligible at n = 2000.
    tol = 3.5 / np.sqrt(2 * (B - 1))
    np.testing.assert_allclose(ours, ref, rtol=tol)


def test_penalised_bootstrap_matches_penalised_sandwich_and_converges():
    """With weight decay the refits target the penalised estimator; its sampling SE is the
    penalised sandwich (hessian_se with weight_decay), not the unpenalised Wald SE."""
    X, y, _ = glm_design("logistic", n=1000, coef=(1.0, -0.5, 0.0), scales=(1.0, 2.0, 0.5), seed=4)
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    wd = 0.05  # strong enough to move the SEs well beyond the Monte Carlo tolerance
    fit = fit_glm(GLM(3), Xt, yt, weight_decay=wd)
    B = 400
    est = make_estimator("bootstrap", fit, B=B, epochs=300, lr=0.05, seed=1, gtol=1e-4)
    est.fit(FitContext(X=Xt, y=yt, loss=mean_nll(fit), weight_decay=wd))
    d = est.diagnostics()
    assert d["converged_frac"] == 1.0 and d["grad_max"] <= 1e-4
    assert d["mc_rel_error"] == pytest.approx(1 / np.sqrt(2 * (B - 1)))
    boot = est.se()["linear.weight"].numpy().ravel()
    sandwich = mustat.hessian_se(fit, fit.nll, (Xt, yt), kind="sandwich", weight_decay=wd)["linear.weight"].numpy().ravel()
    unpen = mustat.hessian_se(fit_glm(GLM(3), Xt, yt), fit.nll, (Xt, yt))["linear.weight"].numpy().ravel()
    tol = 3.5 / np.sqrt(2 * (B - 1))  # Monte Carlo error of an SD from B draws, 3.5 of them
    np.testing.assert_allclose(boot, sandwich, rtol=tol)
    assert np.max(np.abs(boot / unpen - 1)) > tol  # the penalty matters at this size: the test can fail


def test_unconverged_refits_warn():
    X, y, _ = glm_design("logistic", n=200, coef=(1.0, -0.5), seed=5)
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    glm = GLM(2).double()
    est = make_estimator("bootstrap", glm, B=4, epochs=1, lr=1e-4, gtol=1e-6)
    with pytest.warns(UserWarning, match="did not converge"):
        est.fit(FitContext(X=Xt, y=yt, loss=mean_nll(glm)))
    assert est.diagnostics()["converged_frac"] < 1


def test_pruned_entries_stay_pruned_in_every_refit():
    """The bootstrap refitted every entry of a finalized copy (SE 0.11-0.14 on pruned ones, where
    wald gives 0): refits go through the functional view, so masked entries stay 0."""
    X, y, _ = glm_design("logistic", n=400, coef=(1.0, -0.5, 0.25, 0.0), seed=2)
    Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    glm = GLM(4)
    mustat.prune(glm, {"linear.weight": torch.tensor([[5.0, 0.0, 5.0, 0.0]])}, sparsity=0.5)
    est = make_estimator("bootstrap", glm, B=8, epochs=3, lr=0.05)
    with pytest.warns(UserWarning, match="did not converge"):
        est.fit(FitContext(X=Xt, y=yt, loss=mean_nll(glm)))
    se = est.se()["linear.weight"][0]
    assert (se[[1, 3]] == 0).all() and (se[[0, 2]] > 0).all()
    assert (glm.linear.weight[0, [1, 3]] == 0).all()


def test_a_reused_activation_module_keeps_the_fast_path_honest():
    """named_children() lists a reused module once: the hand-batched MLP dropped the second Tanh."""
    from mustat._functional import FunctionalModel
    from mustat.uncertainty.bootstrap import _batched_mlp

    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 1))
    assert _batched_mlp(model, FunctionalModel(model)) is None
    X = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(20, generator=torch.Generator().manual_seed(1))
    reps = bootstrap_replicates(model, lambda o, t: (o.squeeze(-1) - t).square().mean(), (X, y), B=2, epochs=1)
    loop = bootstrap_replicates_loop(model, lambda o, t: (o.squeeze(-1) - t).square().mean(), (X, y), B=2, epochs=1)
    for k in reps.params:
        torch.testing.assert_close(reps.params[k], loop[k], rtol=1e-5, atol=1e-6)
