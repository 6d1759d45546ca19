"""K-FAC's Kronecker factors against curvlinops' KFACLinearOperator (type-2 Fisher, KFAC-expand,
bias joined to the weight), in float64, on an MLP and a CNN."""

import warnings

import pytest
import torch
from architectures import log_softmax_pair
from torch import nn

from mustat.uncertainty import DegenerateSEWarning, FitContext, make_estimator

curvlinops = pytest.importorskip("curvlinops")


def _nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    g = torch.Generator().manual_seed(1)
    return [(mlp, torch.randn(50, 6, generator=g, dtype=torch.float64)),
            (cnn, torch.randn(50, 2, 5, 5, generator=g, dtype=torch.float64))]


@pytest.mark.parametrize("index", [0, 1])
def test_factors_equal_curvlinops(index):
    model, X = _nets()[index]
    y = torch.randint(0, 4, (len(X),), generator=torch.Generator().manual_seed(2))
    est = make_estimator("kfac", model).fit(FitContext(X=X, y=y, loss=nn.functional.cross_entropy,
                                                       weight_decay=1e-3))
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ref = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()),
                                        [(X, y)], fisher_type="type-2", kfac_approx="expand",
                                        separate_weight_and_bias=False, check_deterministic=False)
    ref.compute_kronecker_factors()
    for layer in layers:
        *_, A, B = est._factors[f"{layer}.weight"]
        torch.testing.assert_close(A, ref._input_covariances[layer], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B, ref._gradient_covariances[layer], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "fisher"])
def test_log_softmax_with_nll_loss_equals_logits_with_cross_entropy(name):
    """The Kronecker factors (and fisher's dense GGN) of a log-softmax network under nll_loss are the
    logit network's under cross_entropy: the output Hessian is taken through the log-softmax."""
    logp, logits, X, y = log_softmax_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateSEWarning)   # an ordinary fit does not warn
        nll = make_estimator(name, logp).fit(FitContext(X=X, y=y, loss=nn.functional.nll_loss,
                                                        weight_decay=1e-3)).se()
        ce = make_estimator(name, logits).fit(FitContext(X=X, y=y, loss=nn.functional.cross_entropy,
                                                         weight_decay=1e-3)).se()
    for n in ("conv.weight", "fc.weight"):
        torch.testing.assert_close(nll[n], ce[n], rtol=1e-10, atol=0)
        assert nll[n].unique().numel() == nll[n].numel()  # not 1/sqrt(n * wd) for every weight


def test_nll_loss_on_logits_warns():
    """nll_loss on logits has a zero output Hessian: K-FAC's factors B are 0, every SE 1/sqrt(n * wd)
    up to rounding (7 distinct values before the warning existed), and both warnings say so."""
    _, logits, X, y = log_softmax_pair()
    with pytest.warns(DegenerateSEWarning) as record:
        se = make_estimator("kfac", logits).fit(FitContext(X=X, y=y, loss=nn.functional.nll_loss,
                                                           weight_decay=1e-3)).se()
    messages = [str(w.message) for w in record if issubclass(w.category, DegenerateSEWarning)]
    assert len(messages) == 2
    assert "output space is identically 0" in messages[0]
    assert "estimator 'kfac'" in messages[1] and "1/sqrt(n*weight_decay) (n=60, weight_decay=0.001)" in messages[1]
    for v in se.values():
        torch.testing.assert_close(v, torch.full_like(v, (60 * 1e-3) ** -0.5), rtol=1e-12, atol=0)
