"""The scale-invariance experiment: the rescaling preserves the function; a curvature SE
measured at the rescaled point makes mu exactly invariant; magnitude is not."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import mustat
from mustat.scaling import rescale, scale_experiment
from mustat.uncertainty import FitContext, make_estimator


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("c", [0.1, 7.0])
@pytest.mark.filterwarnings("ignore::mustat.LayerCollapseWarning")  # magnitude empties the shrunken layer
def test_rescaling_preserves_the_function_and_mu_curvature_is_invariant(c):
    net = _net()
    X = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = net(X).argmax(1)
    other = rescale(copy.deepcopy(net), "0", "2", c)
    torch.testing.assert_close(other(X), net(X), rtol=1e-12, atol=1e-12)
    z = {}
    for name, model in (("base", net), ("scaled", other)):
        est = make_estimator("curvature", model).fit(FitContext(X=X, y=y, loss=nn.functional.cross_entropy))
        z[name] = mustat.score(model, "mu", se=est.se())
    # gradients w.r.t. layer 0 scale by 1/c, its curvature by 1/c^2, its SE by c: z unchanged
    for key in z["base"]:
        torch.testing.assert_close(z["scaled"][key], z["base"][key], rtol=1e-9, atol=1e-12)
    masks = {}
    for name, model in (("base", net), ("scaled", other)):
        m = copy.deepcopy(model)
        mustat.prune(m, mustat.score(m, "magnitude"), sparsity=0.5)
        masks[name] = m[0].parametrizations.weight[0].mask.sum().item()
    assert masks["base"] != masks["scaled"]  # magnitude moves the pruning between layers


def test_scale_experiment_runs_and_checks_the_function(tmp_path):
    cfg = mustat.pipeline.TrainConfig(epochs=2, batch_size=64)
    df = scale_experiment(cs=(0.1, 1.0), labels=("magnitude", "mu[curvature]", "mu[pseudo]"), seeds=(0,),
                          track_epochs=1, config=cfg, out=tmp_path, sparsity=0.9)
    assert len(df) == 2 * 3 and set(df.label) == {"magnitude", "mu[curvature]", "mu[pseudo]"}
    assert (df.output_change < 1e-4).all()  # float32 logits of a rescaled copy
    assert df.layer_pruned.between(0, 1).all() and df.test_accuracy.between(0, 1).all()
    assert (tmp_path / "scale-after.csv").exists()
    with pytest.raises(ValueError, match="mode='sideways' is not valid"):
        scale_experiment(mode="sideways")
    with pytest.raises(ValueError, match="c must be"):
        rescale(_net(), "0", "2", -1.0)
    assert np.isfinite(df.test_accuracy).all()
