"""Structured pruning of tiny LLaMA models: grouped-query key/value groups and gated-MLP neurons.

References: removing a unit without a refit must give the very function of the dense model with
that unit's output columns zeroed (any wrongly coupled row would change it); the OBS scores and the
refit against numpy least squares on the captured inputs; the gated products recomputed in numpy;
the pruned model saved with save_pretrained and rebuilt by from_pretrained from its config alone.
"""

import copy
import json

import numpy as np
import pytest
import torch
from tiny_llama import SHAPES, tiny_llama, token_batches

from mustat.structured.ffn import ffn_blocks, ffn_grams, ffn_scores, prune_ffn, remove_neurons
from mustat.structured.heads import (
    attention_blocks,
    head_grams,
    head_scores,
    prune_heads,
    query_heads,
    remove_heads,
    sync_config,
)

transformers = pytest.importorskip("transformers")


def _captured(model, batches, layers):
    """The real-token inputs of each named module (float64 numpy, tokens x features)."""
    seen, mods = {n: [] for n in layers}, dict(model.named_modules())
    current = {}

    def hook(name):
        return lambda m, a: seen[name].append(a[0][current["mask"]].detach().numpy())

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"].bool()
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: np.vstack(v) for n, v in seen.items()}


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def _close_ls(actual, desired, A):
    """Normwise agreement with numpy's lstsq within the normal equations' forward-error bound."""
    bound = 10 * np.finfo(np.float64).eps * np.linalg.cond(A) ** 2
    assert np.linalg.norm(actual - desired) <= bound * np.linalg.norm(desired)


def _group_cols(shape, u):
    hidden, heads, kv, _ = SHAPES[shape]
    g, d = heads // kv, hidden // heads
    return list(range(u * g * d, (u + 1) * g * d))


def test_blocks_are_found_with_their_groups():
    model = tiny_llama("9q3kv")
    blocks = attention_blocks(model)
    assert [b[0] for b in blocks] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(proj is att.o_proj for _, att, proj in blocks)
    assert query_heads(blocks[0][1]) == 9
    ffn = ffn_blocks(model)
    assert [b[0] for b in ffn] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    mlp = model.model.layers[0].mlp
    assert ffn[0][1] == (mlp.gate_proj, mlp.up_proj) and ffn[0][2] is mlp.down_proj


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_removing_a_group_is_zeroing_its_query_heads_output(shape, attn):
    model, batches = tiny_llama(shape, seed=1, attn=attn), token_batches(1)
    hidden, heads, kv, _ = SHAPES[shape]
    u = kv - 1 if kv > 1 else 0
    if kv == 1:
        pytest.skip("one group: nothing to remove")
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in zeroed.model.layers:
            layer.self_attn.o_proj.weight[:, _group_cols(shape, u)] = 0.0
    for _, att, proj in attention_blocks(model):
        remove_heads(att, proj, [u])
    att = model.model.layers[0].self_attn
    d, g = hidden // heads, heads // kv
    assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.o_proj.in_features) == (
        (kv - 1) * g * d, (kv - 1) * d, (kv - 1) * d, (kv - 1) * g * d)
    assert att.num_key_value_groups == g
    torch.testing.assert_close(_logits(model, batches), _logits(zeroed, batches), rtol=1e-12, atol=1e-12)


def test_wrong_coupling_would_show():
    """The reference above is sensitive: removing key/value rows of another group changes the logits."""
    model, batches = tiny_llama("6q3kv", seed=2), token_batches(2)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[0].self_attn.o_proj.weight[:, _group_cols("6q3kv", 0)] = 0.0
    att = model.model.layers[0].self_attn
    d = 8
    from mustat.structured.reconstruction import cut_channels, cut_outputs
    cut_outputs([att.k_proj, att.v_proj], list(range(d, 2 * d)))          # group 1's key/value head
    cut_channels([att.q_proj], att.o_proj, _group_cols("6q3kv", 0))        # group 0's query heads
    assert not torch.allclose(_logits(model, batches), _logits(zeroed, batches), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", ["6q3kv", "9q3kv", "6q2kv"])
def test_group_scores_match_numpy(shape):
    model, batches = tiny_llama(shape, seed=3), token_batches(3, n=6)
    blocks = attention_blocks(model)
    name, att, proj = blocks[0]
    z = _captured(model, batches, [f"{name}.o_proj"])[f"{name}.o_proj"]
    z1 = np.hstack([z, np.ones((len(z), 1))])
    H = head_grams(model, batches, blocks, damping=0.0)[name]
    np.testing.assert_allclose(H.numpy(), z1.T @ z1, rtol=1e-10, atol=1e-10)
    hidden, heads, kv, _ = SHAPES[shape]
    d = hidden // heads
    w = {p: getattr(att, p).weight.detach().numpy() for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mag = [((w["q_proj"][_group_cols(shape, u)] ** 2).sum() + (w["k_proj"][u * d:(u + 1) * d] ** 2).sum()
            + (w["v_proj"][u * d:(u + 1) * d] ** 2).sum() + (w["o_proj"][:, _group_cols(shape, u)] ** 2).sum()) / 4
           for u in range(kv)]
    np.testing.assert_allclose(head_scores(att, proj, H, "magnitude").numpy(), mag, rtol=1e-12)
    target = z @ w["o_proj"].T
    act, obs = [], []
    for u in range(kv):
        c = _group_cols(shape, u)
        act.append(((z[:, c] @ w["o_proj"][:, c].T) ** 2).sum())
        keep = [j for j in range(z.shape[1]) if j not in c]           # no bias: LLaMA's o_proj has none
        coef, *_ = np.linalg.lstsq(z[:, keep], target, rcond=None)
        obs.append(((z[:, keep] @ coef - target) ** 2).sum())
    np.testing.assert_allclose(head_scores(att, proj, H, "activation").numpy(), act, rtol=1e-9)
    np.testing.assert_allclose(head_scores(att, proj, H, "obs").numpy(), obs, rtol=1e-6)


def test_group_removal_refits_o_proj_by_least_squares():
    model, batches = tiny_llama("9q3kv", seed=4), token_batches(4, n=6)
    blocks = attention_blocks(model)
    name, att, proj = blocks[1]
    z = _captured(model, batches, [f"{name}.o_proj"])[f"{name}.o_proj"]
    target = z @ proj.weight.detach().numpy().T
    H = head_grams(model, batches, blocks, damping=0.0)[name]
    keep = [j for j in range(72) if j not in _group_cols("9q3kv", 1)]
    coef, *_ = np.linalg.lstsq(z[:, keep], target, rcond=None)
    remove_heads(att, proj, [1], H)
    assert proj.bias is None and proj.weight.shape == (72, 48)
    _close_ls(proj.weight.detach().numpy().T, coef, z[:, keep])
    z_new = _captured(model, batches, [f"{name}.o_proj"])[f"{name}.o_proj"]   # the kept heads' contexts are unchanged
    np.testing.assert_allclose(z_new, z[:, keep], rtol=1e-10, atol=1e-12)


def _gated(model, batches, name):
    x = _captured(model, batches, [name])[name]
    mlp = model.get_submodule(name)
    g, u = x @ mlp.gate_proj.weight.detach().numpy().T, x @ mlp.up_proj.weight.detach().numpy().T
    return g / (1 + np.exp(-g)) * u                 # silu(gate) * up


def test_gated_neuron_scores_and_refit_match_numpy():
    model, batches = tiny_llama("6q2kv", seed=5), token_batches(5, n=8)
    blocks = ffn_blocks(model)
    name, up, down = blocks[0]
    h = _gated(model, batches, name)
    h1 = np.hstack([h, np.ones((len(h), 1))])
    H = ffn_grams(model, batches, blocks, damping=0.0)[name]
    np.testing.assert_allclose(H.numpy(), h1.T @ h1, rtol=1e-9, atol=1e-9)
    wg, wu, wd = (p.weight.detach().numpy() for p in (*up, down))
    np.testing.assert_allclose(ffn_scores(up, down, H, "magnitude").numpy(),
                               ((wg ** 2).sum(1) + (wu ** 2).sum(1) + (wd ** 2).sum(0)) / 3, rtol=1e-12)
    target = h @ wd.T
    obs = ffn_scores(up, down, H, "obs").numpy()
    for j in (0, 17, 95):
        keep = [i for i in range(96) if i != j]
        coef, *_ = np.linalg.lstsq(h[:, keep], target, rcond=None)
        assert obs[j] == pytest.approx(((h[:, keep] @ coef - target) ** 2).sum(), rel=1e-6)
    gone = [3, 40, 41]
    keep = [i for i in range(96) if i not in gone]
    coef, *_ = np.linalg.lstsq(h[:, keep], target, rcond=None)
    remove_neurons(up, down, gone, H)
    assert (up[0].out_features, up[1].out_features, down.in_features) == (93, 93, 93)
    _close_ls(down.weight.detach().numpy().T, coef, h[:, keep])
    np.testing.assert_allclose(_gated(model, batches, name), h[:, keep], rtol=1e-10, atol=1e-12)


def test_removing_neurons_is_zeroing_their_down_columns():
    model, batches = tiny_llama("6q3kv", seed=6), token_batches(6)
    zeroed = copy.deepcopy(model)
    gone = [0, 5, 63]
    with torch.no_grad():
        for layer in zeroed.model.layers:
            layer.mlp.down_proj.weight[:, gone] = 0.0
    for _, up, down in ffn_blocks(model):
        remove_neurons(up, down, gone)
    torch.testing.assert_close(_logits(model, batches), _logits(zeroed, batches), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, fraction, round_to, heads, kv, inter", [
    ("9q3kv", 1 / 3, None, 6, 2, 85),
    ("9q3kv", 1 / 3, 8, 6, 2, 88),
    ("6q2kv", 1 / 3, 8, 3, 1, 64),
    ("6q3kv", 0.5, None, 2, 1, 32),
])
@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_pruned_model_saves_and_reloads_with_identical_logits(tmp_path, shape, fraction, round_to, heads, kv, inter,
                                                              method):
    model = tiny_llama(shape, seed=7, dtype=torch.float32, attn="sdpa")
    batches = token_batches(7, n=4)
    kept = prune_heads(model, batches, fraction, method, round_to=round_to)
    assert set(kept.values()) == {heads}
    kept = prune_ffn(model, batches, fraction, method, round_to=round_to)
    assert set(kept.values()) == {inter}
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        heads, kv, 8, inter)
    assert cfg.hidden_size == SHAPES[shape][0]
    before = _logits(model, batches)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"],
            saved["intermediate_size"]) == (heads, kv, 8, inter)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True,
                                                               dtype=torch.float32).eval()
    assert type(again) is type(model)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    assert torch.equal(_logits(again, batches), before)


def test_unequal_blocks_are_refused_by_the_config():
    model = tiny_llama("9q3kv", seed=8)
    _, att, proj = attention_blocks(model)[0]
    remove_heads(att, proj, [0])
    with pytest.raises(ValueError, match="different .query heads, key/value heads, head_dim.*torch.save"):
        sync_config(model)
    assert model.config.num_attention_heads == 9
    model = tiny_llama("9q3kv", seed=8)
    name, up, down = ffn_blocks(model)[0]
    remove_neurons(up, down, [0, 1])
    with pytest.raises(ValueError, match="different widths"):
        prune_ffn(model, [], 0.0, "magnitude", refit=False)


def test_bad_input():
    model = tiny_llama("6q3kv", seed=9)
    _, att, proj = attention_blocks(model)[0]
    with pytest.raises(ValueError, match="every key/value group"):
        remove_heads(att, proj, [0, 1, 2])
    with pytest.raises(ValueError, match=r"distinct key/value group indices in \[0, 3\)"):
        remove_heads(att, proj, [3])
    with pytest.raises(ValueError, match="round_to must be in"):
        prune_heads(model, [], 0.5, "magnitude", refit=False, round_to=0)
    with pytest.raises(TypeError, match="round_to must be an integer"):
        prune_ffn(model, [], 0.5, "magnitude", refit=False, round_to=8.0)
    assert att.q_proj.out_features == 48 and model.config.num_key_value_heads == 3


def test_masked_grouped_query_blocks_are_cut_with_their_masks():
    """A one-shot-pruned (masked) model: the key/value rows are cut by cut_outputs with their masks
    kept, and the result equals pruning the finalized copy."""
    import mustat
    from mustat._params import install_mask, mask_of

    model, batches = tiny_llama("9q3kv", seed=10), token_batches(10)
    g = torch.Generator().manual_seed(10)
    keeps = {}
    for name, p in list(model.named_parameters()):
        if name.endswith("proj.weight"):
            keeps[name] = (torch.rand(p.shape, generator=g) > 0.4).double()
            install_mask(model, name, keeps[name])
    plain = mustat.finalize(copy.deepcopy(model))
    assert prune_heads(model, batches, 1 / 3, "magnitude", refit=False) == prune_heads(
        plain, batches, 1 / 3, "magnitude", refit=False)
    torch.testing.assert_close(_logits(model, batches), _logits(plain, batches), rtol=1e-12, atol=1e-12)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        got = mask_of(model, name)
        assert got is not None and got.shape == (16, 72)
        full = keeps[name]
        assert any(torch.equal(got, full[rows]) for rows in (list(range(0, 16)), [*range(0, 8), *range(16, 24)],
                                                            list(range(8, 24))))
