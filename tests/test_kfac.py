"""K-FAC's Kronecker factors against curvlinops' KFACLinearOperator (type-2 Fisher, KFAC-expand,
bias joined to the weight), in float64, on an MLP and a CNN."""

import pytest
import torch
from torch import nn

from mustat.uncertainty import FitContext, make_estimator

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
