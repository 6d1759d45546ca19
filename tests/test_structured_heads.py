"""Attention-head removal on a tiny BERT: Gram, scores, refit and the OBS identity against a numpy
re-implementation of the attention; dead heads removed without changing the function."""

import copy

import numpy as np
import pytest
import torch

from mustat.layerwise.hf import TokenIds
from mustat.structured.heads import (
    attention_blocks,
    head_grams,
    head_scores,
    prune_heads,
    remove_heads,
)
from mustat.structured.reconstruction import group_scores, least_squares_refit

transformers = pytest.importorskip("transformers")

D, HEADS = 16, 4


def _bert(seed=0, attn="sdpa"):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                                  intermediate_size=32, attn_implementation=attn)
    model = transformers.BertModel(cfg, add_pooling_layer=False).double().eval()
    ids = torch.randint(5, 30, (3, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return model, [dict(input_ids=ids, attention_mask=mask)]


def _inputs(model, batch):
    """The hidden states entering each attention block (captured from the model)."""
    seen = {}
    handles = [att.register_forward_pre_hook(lambda m, a, kw, n=name: seen.__setitem__(n, (kw.get("hidden_states",
                                             a[0] if a else None)).detach().numpy()), with_kwargs=True)
               for name, att in ((n, model.get_submodule(n)) for n, _, _ in attention_blocks(model))]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return seen


def _contexts(att, x, mask):
    """numpy float64 attention contexts (tokens, heads * d) of the real tokens."""
    w = {p: (getattr(att, p).weight.detach().numpy(), getattr(att, p).bias.detach().numpy())
         for p in ("query", "key", "value")}
    d = att.attention_head_size
    out = []
    for b in range(len(x)):
        n = int(mask[b].sum())
        q, k, v = ((x[b, :n] @ w[p][0].T + w[p][1]).reshape(n, -1, d).transpose(1, 0, 2)
                   for p in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out.append((a @ v).transpose(1, 0, 2).reshape(n, -1))
    return np.vstack(out)


def _close_ls(actual, desired, A):
    """Normwise agreement of a normal-equations solve with numpy's lstsq on the design ``A``:
    relative error below 10 eps cond(A)^2, the forward-error bound of the normal equations."""
    bound = 10 * np.finfo(np.float64).eps * np.linalg.cond(A) ** 2
    assert np.linalg.norm(actual - desired) <= bound * np.linalg.norm(desired)


def _setup(seed=0):
    model, batches = _bert(seed)
    blocks = attention_blocks(model)
    xs = _inputs(model, batches[0])
    mask = batches[0]["attention_mask"].numpy()
    name, att, proj = blocks[0]
    z = _contexts(att, xs[name], mask)
    return model, batches, blocks, np.hstack([z, np.ones((len(z), 1))])


def test_gram_and_scores_match_numpy():
    model, batches, blocks, z = _setup()
    assert [b[0] for b in blocks] == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    name, att, proj = blocks[0]
    H = head_grams(model, batches, blocks, damping=0.0)[name]
    np.testing.assert_allclose(H.numpy(), z.T @ z, rtol=1e-10, atol=1e-12)
    wo = proj.weight.detach().numpy()
    rows = sum((getattr(att, p).weight.detach().numpy() ** 2).sum(1) for p in ("query", "key", "value"))
    chans = rows + (wo ** 2).sum(0)
    np.testing.assert_allclose(head_scores(att, proj, H, "magnitude").numpy(),
                               chans.reshape(HEADS, -1).sum(1) / 4, rtol=1e-12)
    d = D // HEADS
    act = [np.trace(wo[:, h * d:(h + 1) * d] @ (z.T @ z)[h * d:(h + 1) * d, h * d:(h + 1) * d]
                    @ wo[:, h * d:(h + 1) * d].T) for h in range(HEADS)]
    np.testing.assert_allclose(head_scores(att, proj, H, "activation").numpy(), act, rtol=1e-10)


def test_obs_score_is_the_refitted_error_increase():
    model, batches, blocks, z = _setup(1)
    name, att, proj = blocks[0]
    H = head_grams(model, batches, blocks, damping=0.0)[name]
    obs = head_scores(att, proj, H, "obs").numpy()
    target = z @ np.vstack([proj.weight.detach().numpy().T, proj.bias.detach().numpy()])
    d = D // HEADS
    for h in range(HEADS):
        keep = [j for j in range(D + 1) if not h * d <= j < (h + 1) * d]
        coef, *_ = np.linalg.lstsq(z[:, keep], target, rcond=None)
        assert obs[h] == pytest.approx(((z[:, keep] @ coef - target) ** 2).sum(), rel=1e-6)


def test_removal_refits_the_output_projection_and_updates_the_head_count():
    model, batches, blocks, z = _setup(2)
    name, att, proj = blocks[0]
    H = head_grams(model, batches, blocks, damping=0.0)[name]
    target = z @ np.vstack([proj.weight.detach().numpy().T, proj.bias.detach().numpy()])
    keep = [*range(4), *range(8, 17)]                 # heads 0, 2, 3 and the bias
    coef, *_ = np.linalg.lstsq(z[:, keep], target, rcond=None)
    remove_heads(att, proj, [1], H)
    assert (att.num_attention_heads, att.all_head_size, att.query.out_features, proj.in_features) == (3, 12, 12, 12)
    fitted = np.vstack([proj.weight.detach().numpy().T, proj.bias.detach().numpy()])
    _close_ls(fitted, coef, z[:, keep])
    xs = _inputs(model, batches[0])                   # the pruned block reproduces the fit on its own input
    z_new = _contexts(att, xs[name], batches[0]["attention_mask"].numpy())
    np.testing.assert_allclose(z_new, z[:, keep[:-1]], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dead_heads_go_first_and_the_function_is_unchanged(attn):
    model, batches = _bert(3, attn)
    d = D // HEADS
    with torch.no_grad():
        for _, _, proj in attention_blocks(model):   # head 2 writes nothing to the residual stream
            proj.weight[:, 2 * d:3 * d] = 0.0
    before = model(**batches[0]).last_hidden_state
    small = copy.deepcopy(model)
    kept = prune_heads(small, batches, 1 / HEADS, "obs", damping=1e-12)
    assert kept == {"encoder.layer.0.attention": 3, "encoder.layer.1.attention": 3}
    after = small(**batches[0]).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-8, atol=1e-8)
    ids = batches[0]["input_ids"]
    torch.testing.assert_close(TokenIds(small)(ids), small(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    att = small.encoder.layer[0].attention.self
    idx = [*range(0, 2 * d), *range(3 * d, D)]
    assert torch.equal(att.value.weight, model.encoder.layer[0].attention.self.value.weight[idx])


def test_bias_free_projection_is_refitted_without_a_bias():
    model, batches, blocks, z = _setup(4)
    name, att, proj = blocks[0]
    H = head_grams(model, batches, blocks, damping=0.0)[name]
    W = proj.weight.detach().numpy()
    free = torch.nn.Linear(D, D, bias=False).double()
    with torch.no_grad():
        free.weight.copy_(proj.weight)
    keep = list(range(4, 16))
    weight, bias = least_squares_refit(free, H, keep)
    coef, *_ = np.linalg.lstsq(z[:, keep], z[:, :D] @ W.T, rcond=None)
    assert bias is None
    _close_ls(weight.numpy().T, coef, z[:, keep])
    lost = [list(range(4))]
    resid = ((z[:, keep] @ coef - z[:, :D] @ W.T) ** 2).sum()
    assert float(group_scores(free, H, lost, "obs")[0]) == pytest.approx(resid, rel=1e-6)


def test_bad_input():
    model, batches, blocks, _ = _setup()
    _, att, proj = blocks[0]
    with pytest.raises(ValueError, match="method='wanda' is not valid"):
        prune_heads(model, batches, 0.5, "wanda")
    with pytest.raises(ValueError, match=r"fraction must be in \[0.0, 1.0\)"):
        prune_heads(model, batches, 1.0)
    with pytest.raises(ValueError, match="no self-attention block"):
        attention_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs the block's Gram"):
        head_scores(att, proj, None, "obs")
    with pytest.raises(ValueError, match="every head"):
        remove_heads(att, proj, list(range(HEADS)))
    with pytest.raises(ValueError, match=r"distinct head indices in \[0, 4\)"):
        remove_heads(att, proj, [1, 1])
    with pytest.raises(ValueError, match=r"H must be \(17, 17\)"):
        head_scores(att, proj, torch.eye(16, dtype=torch.float64), "obs")
    with pytest.raises(ValueError, match="no calibration input reached"):
        head_grams(model, [], blocks)
    assert att.num_attention_heads == HEADS and proj.in_features == D


def _mask_attention(model, seed=0, dead=None):
    """Random masks on every attention block's query/key/value (weights and biases) and output
    projection; with ``dead``, that head's output-projection columns fully masked."""
    from mustat._params import install_mask
    g = torch.Generator().manual_seed(seed)
    keeps = {}
    d = D // HEADS
    for name, _, _ in attention_blocks(model):
        for p in ("self.query", "self.key", "self.value", "output.dense"):
            for attr, shape in (("weight", (D, D)), ("bias", (D,))):
                keep = (torch.rand(shape, generator=g) > 0.3).double()
                if dead is not None and p == "output.dense" and attr == "weight":
                    keep[:, dead * d:(dead + 1) * d] = 0.0
                keeps[f"{name}.{p}.{attr}"] = keep
                install_mask(model, f"{name}.{p}.{attr}", keep)
    return keeps


def test_masked_heads_are_cut_with_their_masks_baked_in_and_kept():
    """Before: cutting a masked block raised KeyError from Torch-Pruning half-way through the cut.
    Now a head whose output columns are all masked is removed without changing the function, and
    the kept rows and columns keep their masks."""
    from mustat._params import mask_of
    model, batches = _bert(5)
    keeps = _mask_attention(model, 5, dead=2)
    before = model(**batches[0]).last_hidden_state.detach()
    kept = prune_heads(model, batches, 1 / HEADS, "magnitude", refit=False)
    assert kept == {"encoder.layer.0.attention": 3, "encoder.layer.1.attention": 3}
    torch.testing.assert_close(model(**batches[0]).last_hidden_state, before, rtol=1e-12, atol=1e-12)
    d = D // HEADS
    idx = [*range(0, 2 * d), *range(3 * d, D)]
    for name, keep in keeps.items():
        out = ".output.dense." in name
        want = keep if (out and name.endswith("bias")) else keep[:, idx] if out else keep[idx]
        assert torch.equal(mask_of(model, name), want), name
    att = model.encoder.layer[1].attention.self
    assert (att.num_attention_heads, att.query.weight.shape) == (3, (12, D))


def test_prune_heads_of_a_masked_model_equals_pruning_its_finalized_copy():
    import mustat
    model, batches = _bert(6)
    _mask_attention(model, 6)
    plain = mustat.finalize(copy.deepcopy(model))
    kept = prune_heads(model, batches, 0.5, "obs")
    assert kept == prune_heads(plain, batches, 0.5, "obs")
    torch.testing.assert_close(model(**batches[0]).last_hidden_state, plain(**batches[0]).last_hidden_state,
                               rtol=1e-12, atol=1e-12)


def test_a_fraction_rounding_to_every_head_keeps_one():
    model, batches = _bert(7)
    assert prune_heads(model, batches, 0.9, "magnitude", refit=False) == {
        "encoder.layer.0.attention": 1, "encoder.layer.1.attention": 1}
    assert model(**batches[0]).last_hidden_state.shape == (3, 11, D)
