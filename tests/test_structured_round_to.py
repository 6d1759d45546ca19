"""Structured widths in multiples of ``round_to`` and the copy-free width search: the kept widths,
which channels go (the lowest-scored, in whole chunks), the budget, equality with the copy-based
search, the MAC count from layer shapes against Torch-Pruning's count of cut copies, and the
import order of the structured modules."""

import ast
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mustat.models import build
from mustat.structured import (
    count,
    dependency_graph,
    groups,
    output_layers,
    prune_channels,
    prune_channels_fdr,
    surgery,
    unit_statistics,
)
from mustat.structured.groups import baseline, channel_cost, channel_scores
from mustat.structured.macs import MacModel, Unsupported, record_outputs

VGG = (3, 32, 32)


def _vgg(seed=0):
    torch.manual_seed(seed)
    return build("vgg", VGG, 10).eval()


def _se(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.05 + torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("importance", ["magnitude", "wald-chi2"])
@pytest.mark.parametrize("speedup", [2.0, 4.0])
def test_round_to_keeps_multiples_and_cuts_the_lowest_scored_chunks(importance, speedup):
    dense = _vgg()
    x = torch.zeros(1, *VGG)
    st = unit_statistics(dense, _se(dense))
    imp = baseline("magnitude") if importance == "magnitude" else surgery._importance(importance, dense, st, x)
    graph = dependency_graph(dense, x)
    found = groups(dense, graph)
    scores = {g.root: s for g, s in zip(found, channel_scores(dense, graph, found, imp))}
    cost = max(channel_cost(dense, x, g.root) for g in found)      # a channel at the dense widths: the most it costs
    macs0 = count(dense, x)[0]
    target = int(macs0 / speedup)
    small = copy.deepcopy(dense)
    rep = prune_channels(small, x, importance, speedup=speedup, stats=st, round_to=8)
    assert target - 8 * cost < rep.macs_after <= target
    assert rep.macs_after == count(small, x)[0]
    assert small(torch.randn(3, *VGG)).shape == (3, 10)
    layers, dense_layers = _convs(small), _convs(dense)
    for g in found:
        n, kept = g.size, rep.kept[g.root]
        assert kept % 8 == 0 and kept >= 8
        assert layers[g.root].bias.shape == (kept,)
        # the removed channels are the group's lowest-scored ones (by bias: only outputs index it)
        low = np.argsort(scores[g.root], kind="stable")[:n - kept]
        survivors = np.setdiff1d(np.arange(n), low)
        torch.testing.assert_close(layers[g.root].bias, dense_layers[g.root].bias[survivors])
    assert any(rep.removed.values())


def test_round_to_chunks_are_whole_and_ordered_by_mean_score():
    m = _vgg()
    x = torch.zeros(1, *VGG)
    graph = dependency_graph(m, x)
    found = groups(m, graph)
    scores = channel_scores(m, graph, found, baseline("magnitude"))
    chunks = surgery._chunks(scores, found, 1, 8)
    means = [np.mean([scores[gi][c] for gi, c in ch]) for ch in chunks]
    assert means == sorted(means)
    for gi, g in enumerate(found):
        mine = [ch for ch in chunks if ch[0][0] == gi]
        assert all(len(ch) == 8 and {c[0] for c in ch} == {gi} for ch in mine)  # widths 32..256: all multiples
        assert len(mine) == g.size // 8 - 1                                     # down to 8 kept
    # a 13-wide group: first chunk 5 (to 8), then nothing; min_channels=9 keeps 16 of a 21-wide one
    odd = [type(found[0])("a", (), 13, None), type(found[0])("b", (), 21, None)]
    s = [np.arange(13.0)[::-1] + 0.5, np.arange(21.0)]     # first chunks' means 2.5 and 2, then 8.5
    assert surgery._chunks(s, odd, 1, 8) == [[(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)],
                                             [(0, c) for c in (12, 11, 10, 9, 8)],
                                             [(1, c) for c in range(5, 13)]]
    assert surgery._chunks(s, odd, 9, 8) == [[(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]]


@pytest.mark.parametrize("name,shape,importance", [("lenet5", (1, 16, 16), "wald-chi2"), ("resnet", (1, 12, 12), "wald"),
                                                   ("vgg", VGG, "magnitude")])
@pytest.mark.parametrize("round_to", [None, 8])
def test_the_search_without_copies_equals_the_copy_search(name, shape, importance, round_to, monkeypatch):
    torch.manual_seed(0)
    m = build(name, shape, 5)
    x = torch.zeros(1, *shape)
    st = unit_statistics(m, _se(m))
    old = copy.deepcopy(m)
    with monkeypatch.context() as patch:      # before: every bisection step cut a copy
        patch.setattr(surgery, "MacModel", lambda *a: (_ for _ in ()).throw(Unsupported("old search")))
        rep_old = prune_channels(old, x, importance, speedup=1.5, stats=st, round_to=round_to)
    new = copy.deepcopy(m)
    rep = prune_channels(new, x, importance, speedup=1.5, stats=st, round_to=round_to)
    assert rep == rep_old
    for (k, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_the_width_search_makes_no_copy_per_step(monkeypatch):
    m = _vgg()
    x = torch.zeros(1, *VGG)
    calls = {"models": 0, "copies": 0}
    real = copy.deepcopy

    def counting(obj, memo=None, _nil=[]):       # noqa: B006 (copy.deepcopy's own signature)
        if memo is None and isinstance(obj, nn.Module):
            calls["models"] += 1
        return real(obj, memo)

    monkeypatch.setattr(copy, "deepcopy", counting)
    monkeypatch.setattr(surgery, "_macs_after", lambda *a: calls.__setitem__("copies", calls["copies"] + 1))
    steps = []
    monkeypatch.setattr(MacModel, "after", lambda self, plan, f=MacModel.after: steps.append(1) or f(self, plan))
    prune_channels(m, x, "magnitude", speedup=3.0)
    assert calls["copies"] == 0 and len(steps) >= 8
    # two counts by Torch-Pruning's counter (which copies the model): the dense and the cut model
    assert calls["models"] == 2


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("lenet5", (1, 16, 16)), ("cnn1d", (24,)),
                                        ("resnet", (1, 12, 12)), ("vgg", VGG), ("torch-example", (1, 28, 28))])
def test_macs_from_layer_shapes_equal_torch_prunings_count_of_the_cut_copy(name, shape):
    torch.manual_seed(0)
    m = build(name, shape, 5)
    x = torch.zeros(1, *shape)
    with record_outputs(m) as seen:
        graph = dependency_graph(m, x)
    found = groups(m, graph)
    macs = MacModel(m, x, graph, found, seen)
    assert (macs.dense, macs.params) == count(m, x)
    ignored = [n for n, mod in m.named_modules() if mod is output_layers(m)[0]]
    rng = np.random.default_rng(0)
    for _ in range(3):
        plan = [(gi, int(c)) for gi, g in enumerate(found)
                for c in rng.choice(g.size, rng.integers(0, g.size), replace=False)]
        assert macs.after(plan) == surgery._macs_after(m, x, found, plan, ignored)


def test_a_grouped_convolution_falls_back_to_copies():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 4))
    x = torch.zeros(1, 3, 10, 10)
    with record_outputs(m) as seen:
        graph = dependency_graph(m, x)
    with pytest.raises(Unsupported, match="grouped convolution"):
        MacModel(m, x, graph, groups(m, graph), seen)


@pytest.mark.parametrize("bad,err,msg", [(0, ValueError, r"round_to must be in \[1, inf\], got 0"),
                                         (-1, ValueError, r"round_to must be in \[1, inf\], got -1"),
                                         (2.5, TypeError, "round_to must be an integer, got 2.5"),
                                         (True, TypeError, "round_to must be an integer")])
def test_bad_round_to_is_refused_before_any_change(bad, err, msg):
    m = _vgg()
    x = torch.zeros(1, *VGG)
    st = unit_statistics(m, _se(m))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(err, match=msg):
        prune_channels(m, x, "magnitude", speedup=2.0, round_to=bad)
    with pytest.raises(err, match=msg):
        prune_channels_fdr(m, x, st, round_to=bad)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_a_budget_out_of_reach_with_round_to_names_it():
    m = _vgg()
    with pytest.raises(ValueError, match=r"out of reach.*but 8 per group \(round_to=8\)"):
        prune_channels(m, torch.zeros(1, *VGG), "magnitude", speedup=1000.0, round_to=8)


def test_fdr_with_round_to_rounds_the_discoveries_up():
    m = _vgg()
    x = torch.zeros(1, *VGG)
    se = _se(m)
    se["0.weight"] = se["0.weight"] * 1e-4        # layer 0: every channel a discovery
    st = unit_statistics(m, se)
    small = copy.deepcopy(m)
    rep, tests = prune_channels_fdr(small, x, st, fdr=0.05, round_to=8)
    for root, rows in tests.groupby("group"):
        kept = int((rows["keep"] | rows["forced"]).sum())
        assert rep.kept[root] == kept
        found = int(rows["keep"].sum())
        assert kept == min(len(rows), max(8, -(-found // 8) * 8))   # discoveries rounded up, never dropped
        forced = rows[rows["forced"]]["pvalue"]
        if len(forced):                                         # the extra channels: the most significant rest
            assert forced.max() <= rows[~rows["keep"] & ~rows["forced"]]["pvalue"].min()
    assert rep.kept["0"] == 32
    assert small(torch.randn(2, *VGG)).shape == (2, 10)


def test_groups_and_macs_never_import_surgery():
    """The circle groups -> surgery -> groups: the MAC counter lives in macs.py, which imports no
    other structured module."""
    root = Path(__file__).resolve().parents[1] / "mustat" / "structured"
    for name, banned in (("groups.py", {"mustat.structured.surgery"}),
                         ("macs.py", {"mustat.structured.surgery", "mustat.structured.groups"})):
        tree = ast.parse((root / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & banned, (name, imported & banned)


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("lenet5", (1, 16, 16)), ("resnet", (1, 12, 12)),
                                        ("vgg", VGG)])
def test_wald_per_mac_costs_from_shapes_equal_the_copies(name, shape, monkeypatch):
    """``wald`` divides by each group's channel cost: from the layer shapes once per model, equal
    to :func:`channel_cost`'s count on a cut copy, and no copy made for it."""
    from mustat.structured import WaldImportance
    torch.manual_seed(0)
    m = build(name, shape, 5)
    x = torch.zeros(1, *shape)
    imp = WaldImportance(unit_statistics(m, _se(m)), "chi2-per-mac", x)
    graph = dependency_graph(m, x)
    found = groups(m, graph)
    expected = {g.root: channel_cost(m, x, g.root) for g in found if g.size > 1}
    copies = []
    monkeypatch.setattr(sys.modules["mustat.structured.groups"], "channel_cost", lambda *a: copies.append(a))
    assert {r: imp._cost(m, r) for r in expected} == expected
    assert not copies
