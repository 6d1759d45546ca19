import numpy as np
import pytest
import statsmodels.api as sm
import torch
from torch import nn

import mustat
from mustat.data import glm_design
from mustat.models import GLM
from validation.bootstrap import bootstrap_replicates, bootstrap_replicates_loop, bootstrap_se


def mean_nll(model):
    return lambda out, t: model.nll(out, t) / len(t)


@pytest.mark.parametrize("optimizer, batch_size", [("adam", 16), ("sgd", 25)])
def test_vectorized_equals_loop_replicate_by_replicate(optimizer, batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (50,))

    def loss(out, t):
        return nn.functional.cross_entropy(out, t)

    kw = dict(B=6, epochs=3, lr=0.05, batch_size=batch_size, optimizer=optimizer, momentum=0.9, seed=7)
    fast = bootstrap_replicates(model, loss, (X, y), **kw)
    slow = bootstrap_replicates_loop(model, loss, (X, y), **kw)
    assert set(fast) == set(slow) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(fast["0.weight"][0], fast["0.weight"][1])  # replicates differ
    assert torch.equal(model[0].weight, model[0].weight.detach())  # model untouched (a smoke check)


def test_bootstrap_se_of_logistic_glm_matches_statsmodels():
    X, y, _ = glm_design("logistic", n=2000, coef=(1.0, -0.5, 0.0), scales=(1.0, 2.0, 0.5), seed=3)
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    fit = mustat.fit_glm(GLM(3), Xt, yt)
    B = 400
    se = bootstrap_se(fit, mean_nll(fit), (Xt, yt), B=B, epochs=300, lr=0.05, seed=0)
    ref = sm.Logit(y, sm.add_constant(X)).fit(disp=0).bse
    ours = np.r_[se["linear.bias"].numpy(), se["linear.weight"].numpy().ravel()]
    # An SD from B draws has relative standard error ~ 1/sqrt(2 (B - 1)) = 0.035 here; allow
    # 3.5 of them (4 coefficients) for Monte Carlo error. Bootstrap and observed-information SEs
    # differ by O(1/n) beyond that, negligible at n = 2000.
    tol = 3.5 / np.sqrt(2 * (B - 1))
    np.testing.assert_allclose(ours, ref, rtol=tol)
