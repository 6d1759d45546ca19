import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from conftest import train_steps
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mustat


def masks(model):
    return {n: model.get_submodule(n.rsplit(".", 1)[0]).parametrizations.weight[0].mask.clone()
            for n in ["0.weight", "2.weight", "4.weight"]}


# random sizes at high sparsity may empty a tiny layer: that warning is tested on its own below
@pytest.mark.filterwarnings("ignore::mustat.LayerCollapseWarning")
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**16),
)
def test_exact_count_global_and_layer(sizes, sparsity, seed):
    layers = [nn.Linear(i, o) for o, i in sizes]
    model = nn.Sequential(*layers)
    scores = mustat.score(model, "random", seed=seed)
    n = sum(o * i for o, i in sizes)
    rep = mustat.prune(copy.deepcopy(model), scores, sparsity=sparsity, scope="global")
    assert rep.total_pruned == round(sparsity * n)
    rep = mustat.prune(model, scores, sparsity=sparsity, scope="layer")
    assert list(rep.pruned) == [round(sparsity * o * i) for o, i in sizes]
    assert mustat.sparsity(model) == pytest.approx(rep.sparsity)


def test_global_prunes_lowest_scores_and_breaks_ties_by_position():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    scores = {"0.weight": torch.tensor([[3.0, 1.0], [1.0, 5.0]]), "1.weight": torch.tensor([[1.0, 0.5], [9.0, 1.0]])}
    mustat.prune(model, scores, sparsity=0.5)  # 4 of 8: 0.5 then the four 1.0s in flat order -> first three
    m0 = model[0].parametrizations.weight[0].mask
    m1 = model[1].parametrizations.weight[0].mask
    assert m0.tolist() == [[1, 0], [0, 1]]
    assert m1.tolist() == [[0, 0], [1, 1]]


@pytest.mark.filterwarnings("ignore::mustat.LayerCollapseWarning")  # "favour" scores empty layer 0 on purpose
def test_cumulative_semantics_and_no_revival(mlp):
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5)
    first = masks(mlp)
    # scores that favour the pruned weights must not revive them
    favour = {k: (m == 0).double() * 100 for k, m in first.items()}
    rep = mustat.prune(mlp, favour, sparsity=0.75)
    n = sum(m.numel() for m in first.values())
    assert rep.total_pruned == round(0.75 * n)
    second = masks(mlp)
    for k in first:
        assert torch.all(second[k][first[k] == 0] == 0)
    with pytest.warns(UserWarning, match="never revived"):
        rep = mustat.prune(mlp, favour, sparsity=0.25)
    assert rep.total_pruned == round(0.75 * n)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd", "momentum", "adam", "adamw"],
)
def test_pruned_weights_stay_zero_through_training(mlp, batch, make_opt):
    opt = make_opt(mlp.parameters())  # created before pruning, as in a real loop
    train_steps(mlp, opt, batch, 5)  # build optimizer state (momentum, Adam moments)
    mustat.prune(mlp, mustat.score(mlp, "random", seed=0), sparsity=0.6)
    before = mustat.sparsity(mlp)
    train_steps(mlp, opt, batch, 20)
    for k, m in masks(mlp).items():
        w = mlp.get_submodule(k.rsplit(".", 1)[0]).weight
        assert torch.all(w[m == 0] == 0)
    assert mustat.sparsity(mlp) == before == pytest.approx(0.6, abs=1e-2)


def test_state_dict_into_fresh_model_and_deepcopy(mlp, batch):
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.7, scope="layer")
    buf = io.BytesIO()
    torch.save(mlp.state_dict(), buf)
    buf.seek(0)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    mustat.load_pruned_state_dict(fresh, torch.load(buf))
    X, _ = batch
    assert torch.equal(fresh(X), mlp(X))
    assert all(torch.equal(a, b) for a, b in zip(masks(fresh).values(), masks(mlp).values()))
    clone = copy.deepcopy(mlp)
    assert torch.equal(clone(X), mlp(X))
    clone[0].parametrizations.weight.original.data.add_(1.0)
    assert not torch.equal(clone(X), mlp(X))  # an independent copy
    doubled = copy.deepcopy(mlp).to(torch.float64)
    assert doubled[0].parametrizations.weight[0].mask.dtype == torch.float64
    assert mustat.sparsity(doubled) == mustat.sparsity(mlp)


def test_load_pruned_state_dict_rejects_other_architecture(mlp):
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5)
    other = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="same architecture"):
        mustat.load_pruned_state_dict(other, mlp.state_dict())


def test_finalize_leaves_plain_zero_weights(mlp, batch):
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5)
    X, _ = batch
    out = mlp(X)
    mustat.finalize(mlp)
    assert not any("parametrizations" in k or k.endswith("mask") for k in mlp.state_dict())
    assert torch.equal(mlp(X), out)
    assert mustat.sparsity(mlp) == pytest.approx(0.5, abs=1e-2)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    fresh.load_state_dict(mlp.state_dict())  # plain PyTorch from here on


def test_report_frame_and_ratio(mlp):
    rep = mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.75)
    df = rep.to_frame()
    assert list(df["tensor"]) == ["0.weight", "2.weight", "4.weight", "total"]
    assert df["pruned"].iloc[-1] == rep.total_pruned == round(0.75 * 356)
    assert rep.compression_ratio == pytest.approx(356 / (356 - rep.total_pruned))
    assert "compression ratio" in str(rep) and "<table" in rep._repr_html_()


@pytest.mark.parametrize("value, exc", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (True, TypeError), ("0.5", TypeError)])
def test_bad_sparsity(mlp, value, exc):
    with pytest.raises(exc, match="sparsity"):
        mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=value)


def test_bad_scores(mlp):
    s = mustat.score(mlp, "magnitude")
    s["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"scores\['0.weight'\] contains NaN"):
        mustat.prune(mlp, s, sparsity=0.5)
    with pytest.raises(ValueError, match=r"scores\['2.weight'\] has shape"):
        mustat.prune(mlp, {"2.weight": torch.ones(3)}, sparsity=0.5)
    with pytest.raises(ValueError, match="'7.weight' is not a parameter"):
        mustat.prune(mlp, {"7.weight": torch.ones(3)}, sparsity=0.5)
    with pytest.raises(ValueError, match="non-empty dict"):
        mustat.prune(mlp, {}, sparsity=0.5)
    with pytest.raises(ValueError, match="global, layer"):
        mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5, scope="row")


def test_finalizing_a_deepcopy_leaves_the_original_intact(mlp, batch):
    # parametrize shares its generated class between a module and its deep copy
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5)
    X, _ = batch
    out = mlp(X)
    clone = mustat.finalize(copy.deepcopy(mlp))
    assert torch.equal(clone(X), out)
    assert torch.equal(mlp(X), out)
    assert mlp[0].weight.shape == (16, 8)
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.7)
    assert mustat.sparsity(mlp) == pytest.approx(0.7, abs=1e-2)


def test_global_prune_warns_when_a_tensor_would_vanish_and_the_cap_prevents_it():
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))
    # a criterion whose scale differs between layers: the small layer scores lowest everywhere
    scores = {"0.weight": torch.rand(10, 20) + 1.0, "2.weight": torch.rand(4, 10)}
    with pytest.warns(mustat.LayerCollapseWarning, match="removes every weight of 2.weight") as rec:
        mustat.prune(copy.deepcopy(model), scores, sparsity=0.3)
    assert rec[0].message.tensors == ["2.weight"]
    capped = copy.deepcopy(model)
    # the cap keeps the layer alive; pruned 90% at a 30% target it is still gutted, and says so
    with pytest.warns(mustat.ScoreScaleWarning, match=r"2.weight \(0.9000 pruned: 4 of 40 kept\)") as rec:
        report = mustat.prune(capped, scores, sparsity=0.3, max_tensor_sparsity=0.9)
    assert [w.category for w in rec] == [mustat.ScoreScaleWarning]
    frame = report.to_frame().set_index("tensor")
    assert frame.loc["2.weight", "pruned"] == 36  # floor(0.9 * 40): the 4 highest-scoring survive
    assert frame.loc["total", "pruned"] == round(0.3 * 240)  # the target is still met exactly
    kept = capped[2].parametrizations.weight[0].mask.bool()
    assert torch.equal(kept.flatten().nonzero().flatten().sort().values,
                       torch.topk(scores["2.weight"].flatten(), 4).indices.sort().values)


def test_empty_tensors_are_counted_in_pipeline_rows():
    from mustat.pipeline import _row
    from mustat.results import RESULT_COLUMNS

    class Data:
        input_shape = (20,)
        X_test = X_val = torch.randn(5, 20)
        y_test = y_val = torch.zeros(5, dtype=torch.long)

    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))
    scores = {"0.weight": torch.rand(10, 20) + 1.0, "2.weight": torch.rand(4, 10)}
    with pytest.warns(mustat.LayerCollapseWarning):
        mustat.prune(model, scores, sparsity=0.3)
    row = _row(model, Data, prune=None, seed=0, rnd=1, target=0.3)
    assert set(row) == set(RESULT_COLUMNS) and row["empty_tensors"] == 1


def test_unreachable_cap_is_an_error():
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))
    scores = mustat.score(model, "magnitude")
    with pytest.raises(ValueError, match="cannot be reached with max_tensor_sparsity=0.5: the cap allows at most 0.5"):
        mustat.prune(model, scores, sparsity=0.6, max_tensor_sparsity=0.5)
    with pytest.raises(ValueError, match="scope='layer'"):
        mustat.prune(model, scores, sparsity=0.6, scope="layer", max_tensor_sparsity=0.5)
    with pytest.raises(ValueError, match="max_tensor_sparsity must be in"):
        mustat.prune(model, scores, sparsity=0.6, max_tensor_sparsity=0.0)


@pytest.mark.filterwarnings("ignore::mustat.ScoreScaleWarning")  # 0.weight is pruned 90% at a 50% target on purpose
def test_cap_holds_when_other_tensors_score_infinite():
    # frozen weights (se = 0) score +inf under mu; the cap must still keep its share of a low-scoring tensor
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    scores = {"0.weight": torch.rand(10, 10), "2.weight": torch.full((10, 10), float("inf"))}
    scores["2.weight"][0, :5] = 2.0
    rep = mustat.prune(model, scores, sparsity=0.5, max_tensor_sparsity=0.9)
    frame = rep.to_frame().set_index("tensor")
    assert frame.loc["0.weight", "pruned"] == 90  # floor(0.9 * 100), not all 100
    assert frame.loc["total", "pruned"] == 100
    kept = model[0].parametrizations.weight[0].mask.bool().flatten()
    assert torch.equal(kept.nonzero().flatten().sort().values,
                       torch.topk(scores["0.weight"].flatten(), 10).indices.sort().values)


def test_layer_scope_respects_the_cap():
    """n = 5, s = c = 0.3: the target prunes round(1.5) = 2, the cap allows floor(1.5) = 1."""
    model = nn.Sequential(nn.Linear(5, 1, bias=False))
    with pytest.raises(ValueError, match="'0.weight' has 5 entries, so the target prunes 2 and the cap allows 1"):
        mustat.prune(model, {"0.weight": torch.rand(1, 5)}, sparsity=0.3, scope="layer", max_tensor_sparsity=0.3)
    assert not mustat.pruning.masked_names(model)  # refused before any mask


def test_global_cap_holds_when_live_entries_score_minus_inf():
    """Live -inf entries used to tie with dead ones in the protected set: cap 0.5 on 10 entries pruned 7."""
    model = nn.Sequential(nn.Linear(10, 1, bias=False), nn.Linear(1, 40, bias=False))
    mustat.prune(model, {"0.weight": torch.tensor([[0.0, 0, 0, 5, 5, 5, 5, 5, 5, 5]]), "1.weight": torch.rand(40, 1)},
                 sparsity=0.2, scope="layer")  # 2 of the first tensor dead
    scores = {"0.weight": torch.full((1, 10), float("-inf")), "1.weight": torch.rand(40, 1) + 1}
    rep = mustat.prune(model, scores, sparsity=0.5, max_tensor_sparsity=0.5)
    assert rep.pruned[0] == 5


def test_tied_linears_get_one_mask_and_finalize_keeps_the_outputs():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(7, 7), nn.Linear(7, 7)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, x = Tied(), torch.randn(5, 7)
    rep = mustat.prune(model, mustat.score(model, "random", seed=1), sparsity=0.5)
    assert rep.names == ("a.weight",) and rep.sizes == (49,) and rep.pruned == (24,)  # counted once
    assert torch.equal(model.a.weight, model.b.weight)
    out = model(x)
    mustat.finalize(model)
    assert torch.equal(model(x), out) and model.a.weight is model.b.weight


def test_a_target_equal_to_the_cap_is_reachable_despite_float_error():
    """0.29 * 100 is 28.999... in floating point: the cap allowed 28 of the target's 29."""
    model = nn.Sequential(nn.Linear(100, 1, bias=False))
    for scope in ("layer", "global"):
        fresh = nn.Sequential(nn.Linear(100, 1, bias=False))
        rep = mustat.prune(fresh, {"0.weight": torch.rand(1, 100)}, sparsity=0.29, max_tensor_sparsity=0.29, scope=scope)
        assert rep.pruned == (29,)
    del model


def test_layer_collapse_warnings_cross_process_boundaries():
    import pickle

    w = pickle.loads(pickle.dumps(mustat.LayerCollapseWarning("empty", ["a.weight"])))
    assert w.tensors == ["a.weight"] and str(w) == "empty"


def _mnist_example_scores(scale: float):
    """PyTorch's MNIST-example CNN (``mustat.models.torch_example``: conv1 1->32 3x3, conv2 32->64 3x3,
    max-pool, fc1 9216->128, fc2 128->10) at its initial weights, and M&U scores ``|w| / se`` whose
    SEs are ``rms(w_t) * r_t`` times log-normal noise, with ``r_t = scale`` for conv2 and fc2 and 1 for
    conv1 and fc1: a trajectory SE whose scale differs by layer, made by hand."""
    from mustat.models import torch_example

    torch.manual_seed(0)
    net = torch_example((1, 28, 28), 10)
    g = torch.Generator().manual_seed(0)
    ratio = {"0.weight": 1.0, "2.weight": scale, "7.weight": 1.0, "10.weight": scale}
    se = {n: p.detach().pow(2).mean().sqrt() * ratio[n] * torch.exp(0.5 * torch.randn(p.shape, generator=g))
          for n, p in net.named_parameters() if n in ratio}
    return net, mustat.score(net, "mu", se=se)


def test_global_prune_warns_when_the_score_scale_guts_a_tensor_without_emptying_it():
    net, scores = _mnist_example_scores(2.0)
    with pytest.warns(mustat.ScoreScaleWarning) as rec:
        report = mustat.prune(copy.deepcopy(net), scores, sparsity=0.9)
    frame = report.to_frame().set_index("tensor")
    # conv2 and fc2 keep 161 of 18432 and 10 of 1280 (< 2.5% each): gutted, but no tensor is empty;
    # conv1 is 92% pruned (magnitude: 5%), fc1 89.85%
    assert frame.loc["2.weight", "kept"] == 161 and frame.loc["10.weight", "kept"] == 10
    assert (frame["kept"] > 0).all() and frame.loc["0.weight", "sparsity"] <= 0.975
    assert [w.category for w in rec] == [mustat.ScoreScaleWarning]  # no LayerCollapseWarning proper
    w = rec[0].message
    assert w.tensors == ["2.weight", "10.weight"]
    assert w.kept == pytest.approx({"2.weight": 161 / 18432, "10.weight": 10 / 1280}, rel=0, abs=1e-15)
    msg = str(w)
    assert "2.weight (0.9913 pruned: 161 of 18432 kept), 10.weight (0.9922 pruned: 10 of 1280 kept)" in msg
    assert "scope='layer'" in msg and "max_tensor_sparsity=0.975" in msg and "'kfac'" in msg
    assert isinstance(w, mustat.LayerCollapseWarning)  # one filter silences both
    back = pickle.loads(pickle.dumps(w))
    assert (str(back), back.tensors, back.kept) == (msg, w.tensors, w.kept)
    # each remedy the message names is quiet, and the cap holds every tensor to at most 97.5%
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped = mustat.prune(copy.deepcopy(net), scores, sparsity=0.9, max_tensor_sparsity=0.975)
        mustat.prune(copy.deepcopy(net), scores, sparsity=0.9, scope="layer")
    assert all(p <= math.floor(0.975 * s) for s, p in zip(capped.sizes, capped.pruned))
    assert capped.total_pruned == round(0.9 * capped.total)


def test_score_scale_warning_threshold_is_the_cap_it_suggests():
    """Target 0.5 -> gutted beyond (3 + 0.5)/4 = 0.875: of 20 weights, 17 pruned is allowed, 18 is not."""
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    big = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) + 0.2  # in [0.2, 1.2)
    for low, warns in [(17, False), (18, True)]:
        small = torch.full((2, 10), 10.0)
        small.view(-1)[:low] = torch.arange(low) / 100  # below every weight of the big layer
        scores = {"0.weight": big, "2.weight": small}
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            report = mustat.prune(copy.deepcopy(model), scores, sparsity=0.5)
        assert report.pruned == (60 - low, low)
        assert [w.category for w in rec] == ([mustat.ScoreScaleWarning] if warns else [])


@pytest.mark.parametrize("arch", ["mnist-example-cnn", "mlp-784-300-100-10"])
def test_magnitude_global_pruning_does_not_raise_the_score_scale_warning(arch):
    """Magnitude at 90% on ordinary nets shares the cuts unevenly (the big layer pruned a little
    beyond 90%: 91.3% of the CNN's fc1, 94.2% of the MLP's first layer; small ones far less) but guts
    nothing: no warning."""
    from mustat.models import torch_example

    torch.manual_seed(0)
    net = (torch_example((1, 28, 28), 10) if arch == "mnist-example-cnn" else
           nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = mustat.prune(net, mustat.score(net, "magnitude"), sparsity=0.9)
    share = report.to_frame().set_index("tensor")["sparsity"]
    assert share.drop("total").max() > 0.9  # uneven: global ranking did move cuts between tensors
    assert share.drop("total").max() <= 0.95
