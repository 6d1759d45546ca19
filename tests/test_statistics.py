"""The input-statistics collector and the Damping type, against numpy float64."""

import numpy as np
import pytest
import torch
from torch import nn

from mustat._params import entries
from mustat.layers import find_targets
from mustat.statistics import (
    Collector,
    Damping,
    Gram,
    causal_lm_loss,
    damped,
    layer_grams,
    output_fisher,
)


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


def test_output_fisher_is_the_squared_gradient_of_the_loss_at_each_layers_output():
    """Against autograd on the layers' outputs made leaves by hand (no hooks): an MLP on
    sequences (positions are tokens) and a CNN; parameters' .grad untouched, the mode restored."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().train()
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).double().train()
    g = torch.Generator().manual_seed(1)
    cases = [(mlp, [torch.randn(4, 6, 5, generator=g, dtype=torch.float64) for _ in range(2)]),
             (cnn, [torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)])]
    for model, batches in cases:
        def loss(m, x):
            return m(x).pow(2).sum(-1).sin().mean()
        targets, _ = find_targets(model, entries(model), None, ())
        got = output_fisher(model, batches, targets, loss)
        assert model.training and all(p.grad is None for p in model.parameters())
        first, last = model[0], model[-1]
        expected = {t.name: 0 for t in targets}
        for x in batches:
            y0 = first(x).detach().requires_grad_()
            h = model[1](y0)
            if model is cnn:
                h = model[2](h)
            y1 = last(h)
            y1_leaf = y1.detach().requires_grad_()
            value = y1_leaf.pow(2).sum(-1).sin().mean()
            (g1,) = torch.autograd.grad(value, y1_leaf)
            (g0,) = torch.autograd.grad(y1, y0, g1)
            rows = 1 if model is cnn else g0.dim() - 1      # output channels, or the last axis
            expected["0.weight"] += g0.square().sum([d for d in range(g0.dim()) if d != rows])
            expected[f"{len(model) - 1}.weight"] += g1.square().sum([d for d in range(g1.dim() - 1)])
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-12, atol=0)
        assert all(p.requires_grad for p in model.parameters())       # turned off for the pass, put back
        # a frozen model (no parameter requires a gradient) gives the same factor and stays frozen
        for p in model.parameters():
            p.requires_grad_(False)
        frozen = output_fisher(model, batches, targets, loss)
        assert not any(p.requires_grad for p in model.parameters())
        for name in expected:
            torch.testing.assert_close(frozen[name], got[name], rtol=0, atol=0)
        for p in model.parameters():
            p.requires_grad_(True)



def test_output_fisher_collects_the_input_grams_of_the_same_forward():
    """A collector riding on the loss's pass: the same factor, and Grams equal to numpy's ``X^T X``
    of each layer's real tokens (padding left out), with no autograd graph kept for them."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.b = nn.Embedding(11, 4), nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask=None):
            return self.b(torch.tanh(self.a(self.emb(input_ids))))

    model = Net().double()
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batches = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:, :3]}]

    def loss(m, batch):
        return m(**batch).pow(2).mean()

    targets, _ = find_targets(model, entries(model), None, ())
    collector = Collector(targets, False, torch.device("cpu"))
    got = output_fisher(model, batches, targets, loss, collector)
    alone = output_fisher(model, batches, targets, loss)
    for name in alone:
        torch.testing.assert_close(got[name], alone[name], rtol=0, atol=0)
    with torch.no_grad():
        xa = [model.emb(ids)[mask.bool()], model.emb(ids[:, :3]).reshape(-1, 4)]
        xb = [torch.tanh(model.a(x)) for x in xa]
    for name, xs in (("a.weight", xa), ("b.weight", xb)):
        X = torch.cat(xs).numpy()
        g = collector.grams[(name, 0)]
        np.testing.assert_allclose(g.H.numpy(), X.T @ X, rtol=1e-12)
        assert g.n == 14 and not g.H.requires_grad

def test_causal_lm_loss_leaves_padding_out():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 20, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        got = causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask})
        logits = model(input_ids=ids, attention_mask=mask).logits
    # next-token cross-entropy over the pairs whose target is a real token
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    real = mask[:, 1:].bool()
    torch.testing.assert_close(got.double(), nll[real].mean(), rtol=1e-5, atol=0)
