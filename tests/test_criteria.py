import numpy as np
import pytest
import torch
from conftest import Trajectory
from torch import nn

import mustat
from mustat import PseudoBootstrap


def _trajectories(seed=0, n=200):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((6, 5)) + np.cumsum(rng.standard_normal((n, 6, 5)), 0) * rng.uniform(0.01, 0.1, (6, 5))
    w1 = rng.standard_normal((3, 6)) + np.cumsum(rng.standard_normal((n, 3, 6)), 0) * rng.uniform(0.01, 0.1, (3, 6))
    return w0, w1


def _tracked(w0, w1):
    model = Trajectory((6, 5), (3, 6), dtype=torch.float64)
    tr = PseudoBootstrap(model)
    for a, b in zip(w0, w1):
        model.set(a, b)
        tr.update()
    return model, tr


@pytest.mark.parametrize("c", [4.0, 3.7])
@pytest.mark.filterwarnings("ignore::mustat.LayerCollapseWarning")  # magnitude empties the shrunken layer: the point
def test_mu_is_scale_invariant_and_magnitude_is_not(c):
    # W_k -> c W_k, W_{k+1} -> W_{k+1} / c leaves a ReLU net's function unchanged.
    w0, w1 = _trajectories()
    model_a, tr_a = _tracked(w0, w1)
    model_b, tr_b = _tracked(c * w0, w1 / c)
    mu_a = mustat.score(model_a, "mu", se=tr_a.std())
    mu_b = mustat.score(model_b, "mu", se=tr_b.std())
    for k in mu_a:
        torch.testing.assert_close(mu_b[k], mu_a[k], rtol=1e-12, atol=0)
    rep_a = mustat.prune(model_a, mu_a, sparsity=0.5)
    rep_b = mustat.prune(model_b, mu_b, sparsity=0.5)
    assert rep_a.pruned == rep_b.pruned
    for la, lb in zip(model_a.layers, model_b.layers):
        assert torch.equal(la.parametrizations.weight[0].mask, lb.parametrizations.weight[0].mask)

    model_a, _ = _tracked(w0, w1)
    model_b, _ = _tracked(c * w0, w1 / c)
    mag_a = mustat.prune(model_a, mustat.score(model_a, "magnitude"), sparsity=0.5)
    mag_b = mustat.prune(model_b, mustat.score(model_b, "magnitude"), sparsity=0.5)
    assert mag_a.pruned != mag_b.pruned  # magnitude moves pruning to the shrunken layer


def test_mu_values_and_special_cases():
    model = Trajectory((1, 4), dtype=torch.float64)
    model.set([[2.0, -3.0, 0.0, 5.0]])
    se = {"layers.0.weight": torch.tensor([[0.5, 1.5, 0.0, 0.0]], dtype=torch.float64)}
    z = mustat.score(model, "mu", se=se)["layers.0.weight"]
    assert z.tolist() == [[4.0, 2.0, 0.0, float("inf")]]


def test_pruned_weights_score_below_every_unpruned(mlp):
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.3)
    for crit, kw in [("magnitude", {}), ("random", {"seed": 0})]:
        for name, s in mustat.score(mlp, crit, **kw).items():
            mask = mlp.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight[0].mask
            assert torch.all(s[mask == 0] == float("-inf"))
            assert torch.all(torch.isfinite(s[mask == 1]))


def test_random_is_seeded(mlp):
    a = mustat.score(mlp, "random", seed=3)
    b = mustat.score(mlp, "random", seed=3)
    c = mustat.score(mlp, "random", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_registry_adds_a_criterion_in_one_function(mlp):
    @mustat.register_criterion("test-squared")
    def squared(weight, *, se=None, generator=None):
        return weight.square()

    try:
        s = mustat.score(mlp, "test-squared")
        torch.testing.assert_close(s["0.weight"], mlp[0].weight.detach().square())
    finally:
        del mustat.CRITERIA["test-squared"]


def test_score_uses_given_weights(mlp):
    w = {k: torch.ones_like(v) for k, v in mustat.score(mlp, "magnitude").items()}
    s = mustat.score(mlp, "magnitude", weights=w)
    assert all(torch.all(v == 1) for v in s.values())


def test_bad_input(mlp):
    with pytest.raises(ValueError, match="lamp, magnitude, mu, obs, random"):
        mustat.score(mlp, "wald-ish")
    with pytest.raises(ValueError, match="needs se="):
        mustat.score(mlp, "mu")
    se = {"0.weight": torch.ones(16, 8), "2.weight": torch.ones(12, 16)}
    with pytest.raises(ValueError, match="se has no entry '4.weight'"):
        mustat.score(mlp, "mu", se=se)
    se["4.weight"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"se\['4.weight'\] has shape \(3, 3\)"):
        mustat.score(mlp, "mu", se=se)
    se["4.weight"] = torch.full((3, 12), float("nan"))
    with pytest.raises(ValueError, match="NaN or negative"):
        mustat.score(mlp, "mu", se=se)
    with pytest.raises(ValueError, match="nothing to prune"):
        mustat.score(nn.Sequential(nn.ReLU()), "magnitude")
