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


def _masked(seed=0, dead=(1, 4)):
    """``_setup``'s block with random masks on both layers (weights and biases) and the down
    projection's columns ``dead`` fully masked: those neurons write nothing."""
    from mustat._params import install_mask
    m, batches, x = _setup(seed)
    g = torch.Generator().manual_seed(seed + 10)
    keeps = {"intermediate.dense.weight": (torch.rand(6, 4, generator=g) > 0.3).double(),
             "intermediate.dense.bias": (torch.rand(6, generator=g) > 0.3).double(),
             "output.dense.weight": (torch.rand(4, 6, generator=g) > 0.3).double(),
             "output.dense.bias": (torch.rand(4, generator=g) > 0.3).double()}
    keeps["output.dense.weight"][:, list(dead)] = 0.0
    for name, keep in keeps.items():
        install_mask(m, name, keep)
    return m, batches, x, keeps


def test_masked_block_is_cut_with_its_masks_baked_in_and_kept():
    """Before: Torch-Pruning cut ``up`` and then raised KeyError on the parametrized ``down``,
    leaving 4 neurons feeding 6 inputs. Now the masks are baked in, the cut is made, and the kept
    entries' masks are re-installed: cutting neurons whose outputs are all masked changes nothing."""
    from mustat._params import mask_of
    m, _, x, keeps = _masked()
    before = m(x).detach()
    values = {n: getattr(m.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]).detach().clone()
              for n in keeps}                       # the effective (masked) values
    _, up, down = ffn_blocks(m)[0]
    remove_neurons(up, down, [1, 4])
    kept = [0, 2, 3, 5]
    assert (up.weight.shape, up.bias.shape, down.weight.shape) == ((4, 4), (4,), (4, 4))
    assert torch.equal(m(x).detach(), before)
    expect = {"intermediate.dense.weight": kept, "intermediate.dense.bias": kept,
              "output.dense.weight": (slice(None), kept), "output.dense.bias": slice(None)}
    for name, idx in expect.items():
        assert torch.equal(mask_of(m, name), keeps[name][idx]), name
        mod = m.get_submodule(name.rpartition(".")[0])
        assert torch.equal(getattr(mod, name.rpartition(".")[2]), values[name][idx]), name


@pytest.mark.parametrize(("method", "refit"), [("obs", True), ("magnitude", False)])
def test_prune_ffn_of_a_masked_model_equals_pruning_its_finalized_copy(method, refit):
    """The masked model is pruned as the plain model with its masks applied (``mustat.finalize``):
    same neurons, same refit, same outputs; with the refit, ``down`` is refitted densely."""
    import mustat
    from mustat._params import masked_names
    m, batches, x, _ = _masked(1, dead=())
    plain = mustat.finalize(copy.deepcopy(m))
    kept = prune_ffn(m, batches, 2 / 6, method, refit=refit)
    assert kept == prune_ffn(plain, batches, 2 / 6, method, refit=refit) == {"": 4}
    torch.testing.assert_close(m(x), plain(x), rtol=1e-12, atol=1e-12)
    expect = ["intermediate.dense.bias", "intermediate.dense.weight"]
    expect += [] if refit else ["output.dense.bias", "output.dense.weight"]
    assert sorted(masked_names(m)) == expect


def test_removing_nothing_from_a_masked_model_changes_nothing():
    from mustat._params import masked_names
    m, batches, x, keeps = _masked(2)
    before = m(x).detach()
    assert prune_ffn(m, batches, 0.0, "obs") == {"": 6}
    assert torch.equal(m(x).detach(), before) and sorted(masked_names(m)) == sorted(keeps)


def test_a_fraction_rounding_to_every_neuron_keeps_one():
    """Before: round(0.95 * 6) = 6 made prune_ffn raise 'would remove every neuron'; now it caps
    at n - 1 removed, as prune_heads does."""
    m, batches, x = _setup(4)
    kept = prune_ffn(m, batches, 0.95, "obs")
    assert kept == {"": 1}
    assert m.intermediate.dense.weight.shape == (1, 4) and m.output.dense.weight.shape == (4, 1)
    assert m(x).shape == (60, 4)


def test_a_layer_under_another_parametrization_is_refused_before_any_cut():
    """Weight norm is no mask: Torch-Pruning cannot cut it, so nothing is cut (before: ``up`` was
    cut, then ``down`` raised KeyError, leaving 4 neurons feeding 6 inputs)."""
    m, _, x = _setup(5)
    _, up, down = ffn_blocks(m)[0]
    torch.nn.utils.parametrizations.weight_norm(down)
    before = m(x).detach()
    with pytest.raises(ValueError, match=r"Linear.weight .* parametrization that is not a mask"):
        remove_neurons(up, down, [1, 4])
    assert (up.out_features, up.weight.shape, down.weight.shape) == (6, (6, 4), (4, 6))
    assert torch.equal(m(x).detach(), before)
