"""The input-statistics collector and the Damping type, against numpy float64."""

import numpy as np
import pytest
import torch
from torch import nn

from mustat.statistics import Damping, Gram, damped, layer_grams


def test_damping_units():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((5, 5))
    H = torch.from_numpy(A @ A.T)
    np.testing.assert_allclose(Damping(0.01).add_to(H).numpy(), A @ A.T + 0.01 * np.mean(np.diag(A @ A.T)) * np.eye(5))
    np.testing.assert_allclose(Damping(0.5, "absolute").add_to(H).numpy(), A @ A.T + 0.5 * np.eye(5))
    torch.testing.assert_close(damped(H, 0.01), Damping(0.01).add_to(H))
    # relative damping does not depend on how many tokens were summed; absolute does not scale
    assert Damping(0.01).amount(3 * H) == pytest.approx(3 * Damping(0.01).amount(H))
    with pytest.raises(ValueError, match="unit"):
        Damping(0.01, "percent")
    with pytest.raises(ValueError, match="damping"):
        Damping(-1.0)
    with pytest.raises(ValueError, match="all zero"):
        Damping(0.01).add_to(torch.zeros(3, 3, dtype=torch.float64))


def test_gram_modes_against_numpy():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 6))
    full, diag, bias = (Gram(6, torch.device("cpu"), diagonal=d, bias=b) for d, b in ((False, False), (True, False),
                                                                                        (False, True)))
    for g in (full, diag, bias):
        g.add(torch.from_numpy(X[:25]))
        g.add(torch.from_numpy(X[25:]))
    np.testing.assert_allclose(full.H.numpy(), X.T @ X, rtol=1e-12)
    np.testing.assert_allclose(diag.H.numpy(), (X ** 2).sum(0), rtol=1e-12)
    Xb = np.hstack([X, np.ones((40, 1))])
    np.testing.assert_allclose(bias.H.numpy(), Xb.T @ Xb, rtol=1e-12)
    assert full.n == diag.n == bias.n == 40
    with pytest.raises(ValueError, match="bias coordinate"):
        Gram(6, torch.device("cpu"), diagonal=True, bias=True)


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(20, 4), nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.emb(input_ids))


def test_layer_grams_leave_padding_out_and_restore_the_mode():
    torch.manual_seed(0)
    model = _Tokens().double().train()
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    g = layer_grams(model, [{"input_ids": ids, "attention_mask": mask}], {"p": model.proj}, bias=True)["p"]
    x = model.emb(ids).detach().numpy()[mask.bool().numpy()]
    xb = np.hstack([x, np.ones((len(x), 1))])
    np.testing.assert_allclose(g.H.numpy(), xb.T @ xb, rtol=1e-12)
    assert g.n == 8 and model.training
    with pytest.raises(ValueError, match="not a module of the model"):
        layer_grams(model, [{"input_ids": ids, "attention_mask": mask}], {"p": nn.Linear(4, 3)})
