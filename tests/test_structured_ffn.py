"""Feed-forward neuron removal: scores, refit and OBS identity against numpy; a tiny BERT end to end."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mustat.structured.ffn import ffn_blocks, ffn_grams, ffn_scores, prune_ffn, remove_neurons


class _Block(nn.Module):
    def __init__(self, d=4, n=6):
        super().__init__()
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, n)
        self.output = nn.Module()
        self.output.dense = nn.Linear(n, d)

    def forward(self, input_ids, attention_mask=None):
        return self.output.dense(torch.relu(self.intermediate.dense(input_ids)))


def _setup(seed=0, dead=()):
    torch.manual_seed(seed)
    m = _Block().double()
    with torch.no_grad():
        for u in dead:                          # a neuron that never fires
            m.intermediate.dense.weight[u] = 0.0
            m.intermediate.dense.bias[u] = -1.0
    x = torch.randn(3, 20, 4, dtype=torch.float64)
    return m, [dict(input_ids=x[i:i + 1]) for i in range(3)], x.reshape(-1, 4)


def _hidden(m, x):
    return torch.relu(m.intermediate.dense(x)).detach().numpy()


def test_scores_match_numpy():
    m, batches, x = _setup()
    blocks = ffn_blocks(m)
    H = ffn_grams(m, batches, blocks, damping=0.0)[""]
    h = np.hstack([_hidden(m, x), np.ones((len(x), 1))])
    np.testing.assert_allclose(H.numpy(), h.T @ h, rtol=1e-10)
    w1, w2 = m.intermediate.dense.weight.detach().numpy(), m.output.dense.weight.detach().numpy()
    np.testing.assert_allclose(ffn_scores(*blocks[0][1:], H, "magnitude").numpy(),
                               ((w1 ** 2).sum(1) + (w2 ** 2).sum(0)) / 2, rtol=1e-12)
    np.testing.assert_allclose(ffn_scores(*blocks[0][1:], H, "activation").numpy(),
                               (w2 ** 2).sum(0) * np.diag(h.T @ h)[:6], rtol=1e-10)


def test_obs_score_is_the_refitted_error_increase():
    m, batches, x = _setup(1)
    _, up, down = ffn_blocks(m)[0]
    H = ffn_grams(m, batches, ffn_blocks(m), damping=0.0)[""]
    obs = ffn_scores(up, down, H, "obs").numpy()
    h = np.hstack([_hidden(m, x), np.ones((len(x), 1))])
    target = m(x).detach().numpy()
    for u in range(6):
        keep = [j for j in range(7) if j != u]
        coef, *_ = np.linalg.lstsq(h[:, keep], target, rcond=None)
        increase = ((h[:, keep] @ coef - target) ** 2).sum()
        assert obs[u] == pytest.approx(increase, rel=1e-6)


def test_refit_is_least_squares_and_removal_is_torch_prunings():
    m, batches, x = _setup(2)
    target = m(x).detach().numpy()
    _, up, down = ffn_blocks(m)[0]
    H = ffn_grams(m, batches, ffn_blocks(m), damping=0.0)[""]
    h = np.hstack([_hidden(m, x), np.ones((len(x), 1))])
    keep = [0, 2, 3, 5]
    coef, *_ = np.linalg.lstsq(h[:, [*keep, 6]], target, rcond=None)
    remove_neurons(up, down, [1, 4], H)
    assert (up.out_features, down.in_features) == (4, 4) and up.weight.shape == (4, 4)
    np.testing.assert_allclose(down.weight.detach().numpy(), coef[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(down.bias.detach().numpy(), coef[-1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(m(x).detach().numpy(), h[:, [*keep, 6]] @ coef, rtol=1e-8, atol=1e-10)


def test_dead_neurons_go_first_and_the_function_is_unchanged():
    m, batches, x = _setup(3, dead=(1, 4))
    before = m(x).detach()
    with pytest.raises(ValueError, match="singular"):
        prune_ffn(copy.deepcopy(m), batches, 2 / 6, "obs", damping=0.0)
    small = copy.deepcopy(m)
    kept = prune_ffn(small, batches, 2 / 6, "obs", damping=1e-12)
    assert kept == {"": 4}
    torch.testing.assert_close(small(x).detach(), before, rtol=1e-8, atol=1e-8)
    assert torch.equal(small.intermediate.dense.weight, m.intermediate.dense.weight[[0, 2, 3, 5]])


def test_bad_input():
    m, batches, _ = _setup()
    with pytest.raises(ValueError, match="method='wanda' is not valid"):
        prune_ffn(m, batches, 0.5, "wanda")
    with pytest.raises(ValueError, match=r"fraction must be in \[0.0, 1.0\)"):
        prune_ffn(m, batches, 1.0)
    with pytest.raises(ValueError, match="no feed-forward block"):
        ffn_blocks(nn.Linear(2, 2))
    _, up, down = ffn_blocks(m)[0]
    with pytest.raises(ValueError, match="needs the block's Gram"):
        ffn_scores(up, down, None, "obs")
    with pytest.raises(ValueError, match="every neuron"):
        remove_neurons(up, down, list(range(6)))
    with pytest.raises(ValueError, match=r"distinct neuron indices in \[0, 6\)"):
        remove_neurons(up, down, [1, 1])
    with pytest.raises(ValueError, match="distinct neuron indices"):
        remove_neurons(up, down, [6])
    assert up.out_features == 6 and down.in_features == 6


def test_tiny_bert_end_to_end_with_padding_left_out():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(5, 30, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = [dict(input_ids=ids, attention_mask=mask)]
    rows = [dict(input_ids=ids[i:i + 1, : int(mask[i].sum())], attention_mask=mask[i:i + 1, : int(mask[i].sum())])
            for i in range(4)]
    blocks = ffn_blocks(model)
    assert [b[0] for b in blocks] == ["encoder.layer.0", "encoder.layer.1"]
    g_pad, g_rows = ffn_grams(model, padded, blocks), ffn_grams(model, rows, blocks)
    for k in g_pad:
        torch.testing.assert_close(g_pad[k], g_rows[k], rtol=1e-5, atol=1e-6)
    small = copy.deepcopy(model)
    kept = prune_ffn(small, padded, 0.5, "obs")
    assert kept == {"encoder.layer.0": 16, "encoder.layer.1": 16}
    assert small.encoder.layer[0].intermediate.dense.weight.shape == (16, 16)
    out = small(**padded[0]).last_hidden_state
    assert out.shape == (4, 9, 16) and torch.isfinite(out).all()
