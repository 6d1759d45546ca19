"""Structured pruning: unit and group Wald statistics against numpy references, the chi-square
null distribution on an exact linear-Gaussian layer, physical removal through Torch-Pruning
(coupled residual groups, budgets, FDR), interoperability and export."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from scipy import stats as sps
from torch import nn

from mustat._params import entry, mask_of, masked_names
from mustat.models import build
from mustat.structured import (
    StructuredReport,
    WaldImportance,
    count,
    dependency_graph,
    export,
    fdr_keep,
    group_tests,
    groups,
    output_layers,
    prune_channels,
    prune_channels_fdr,
    surgery,
    unit_statistics,
)
from mustat.structured.groups import channel_scores
from mustat.uncertainty import FitContext, make_estimator


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3))


def _se(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.05 + torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def test_diagonal_unit_statistics_match_numpy():
    m = _mlp()
    se = _se(m)
    se["0.weight"][2, 1] = float("inf")          # unidentified: no contribution, no degree of freedom
    st = unit_statistics(m, se)
    assert st.structure == "diagonal"
    for layer in ("0", "2", "4"):
        w = m.get_submodule(layer).weight.detach().double().numpy()
        b = m.get_submodule(layer).bias.detach().double().numpy()
        sw, sb = se[f"{layer}.weight"].double().numpy(), se[f"{layer}.bias"].double().numpy()
        finite = np.isfinite(sw)
        ref = np.where(finite, (w / np.where(finite, sw, 1.0)) ** 2, 0.0).sum(1) + (b / sb) ** 2
        np.testing.assert_allclose(st.chi2[layer], ref, rtol=1e-12)
        np.testing.assert_array_equal(st.dof[layer], finite.sum(1) + 1)
    assert st.dof["0"][2] == 5 and st.dof["0"][0] == 6
    p = st.pvalues()["2"]
    np.testing.assert_allclose(p, sps.chi2.sf(st.chi2["2"], st.dof["2"]), rtol=1e-12)


def test_zero_se_of_a_nonzero_weight_is_infinite_evidence():
    m = _mlp()
    se = _se(m)
    se["2.weight"][1, 3] = 0.0
    st = unit_statistics(m, se)
    assert np.isinf(st.chi2["2"][1]) and st.pvalues()["2"][1] == 0.0
    assert np.isfinite(np.delete(st.chi2["2"], 1)).all()


def test_unit_statistics_arguments():
    m = _mlp()
    with pytest.raises(ValueError, match="exactly one"):
        unit_statistics(m)
    bad = _se(m)
    bad["0.weight"] = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"se\['0.weight'\] has shape \(2, 2\)"):
        unit_statistics(m, bad)
    bad = _se(m)
    bad["2.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN or negative"):
        unit_statistics(m, bad)
    with pytest.raises(ValueError, match="covers no weight"):
        unit_statistics(m, {"nothing": torch.ones(1)})


def _kfac(model, X, y, *, weight_decay=1e-2, loss=F.cross_entropy, params=None):
    params = params or [n for n, _ in model.named_parameters() if n.endswith("weight")]
    est = make_estimator("kfac", model, params=params)
    return est.fit(FitContext(X=X, y=y, loss=loss, weight_decay=weight_decay))


def test_kfac_block_is_the_exact_marginal_block_of_the_damped_kronecker_inverse():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    est = _kfac(m, X, y)
    st = unit_statistics(m, estimator=est)
    assert st.structure == "block"
    for layer in ("0", "2"):
        _, _, _, A, B = est._factors[f"{layer}.weight"]
        A, B, d = A.numpy(), B.numpy(), float(est._d)
        cov = np.linalg.inv(np.kron(B, A) + d * np.eye(B.shape[0] * A.shape[0]))   # vec(W) row-major
        mod = m.get_submodule(layer)
        W = torch.cat([mod.weight, mod.bias[:, None]], 1).detach().double().numpy()
        f = W.shape[1]
        for o in range(W.shape[0]):
            block = cov[o * f:(o + 1) * f, o * f:(o + 1) * f]
            ref = W[o] @ np.linalg.solve(block, W[o])
            np.testing.assert_allclose(st.chi2[layer][o], ref, rtol=1e-8)
        np.testing.assert_array_equal(st.dof[layer], np.full(W.shape[0], f))


def _linear_gaussian(rng, n, d, live_rows, dead):
    X = rng.standard_normal((n, d))
    W = np.zeros((len(live_rows) + dead, d))
    W[: len(live_rows)] = live_rows
    Y = X @ W.T + rng.standard_normal((n, W.shape[0]))
    return X, Y, W


def _ols_layer(X, Y):
    Xt = np.hstack([X, np.ones((len(X), 1))])
    coef = np.linalg.lstsq(Xt, Y, rcond=None)[0].T
    layer = nn.Linear(X.shape[1], Y.shape[1]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(coef[:, :-1]))
        layer.bias.copy_(torch.from_numpy(coef[:, -1]))
    return layer


def _half_sse(out, t):
    return 0.5 * (out - t).square().sum(1).mean()


def test_group_chi2_of_dead_units_is_chi2_on_an_exact_linear_gaussian_layer():
    # y = W x + b + N(0, I): K-FAC is exact (B = n I, A the inputs' second moment), so the block
    # statistic of a dead unit is exactly chi-square with d + 1 degrees of freedom
    rng = np.random.default_rng(0)
    null = []
    for _ in range(300):
        X, Y, _ = _linear_gaussian(rng, 80, 3, [[0.5, 0.0, -0.5], [0.3, 0.3, 0.3]], dead=4)
        layer = _ols_layer(X, Y)
        m = nn.Sequential(layer)
        est = _kfac(m, torch.from_numpy(X), torch.from_numpy(Y), weight_decay=0.0, loss=_half_sse,
                    params=["0.weight"])
        null.extend(unit_statistics(m, estimator=est).chi2["0"][2:])
    null = np.asarray(null)
    rate = float(np.mean(sps.chi2.sf(null, 4) < 0.05))
    sd = np.sqrt(0.05 * 0.95 / len(null))
    assert abs(rate - 0.05) < 3 * sd, rate
    assert sps.kstest(null, sps.chi2(4).cdf).pvalue > 0.001


def test_fdr_on_a_planted_layer_keeps_live_units_and_controls_false_discoveries():
    rng = np.random.default_rng(1)
    false = kept = 0
    live = np.zeros(3)
    for _ in range(60):
        X, Y, W = _linear_gaussian(rng, 100, 3, [[1.0, 0, 0], [0, 1.0, 0], [0.4, 0.0, 0.0]], dead=5)
        m = nn.Sequential(_ols_layer(X, Y))
        est = _kfac(m, torch.from_numpy(X), torch.from_numpy(Y), weight_decay=0.0, loss=_half_sse,
                    params=["0.weight"])
        tests = fdr_keep(group_tests(m, torch.from_numpy(X[:1]), unit_statistics(m, estimator=est),
                                     ignored_layers=[]), fdr=0.05)
        dead = np.abs(W).sum(1) == 0
        keep = tests["keep"].to_numpy()
        false += int((keep & dead).sum())
        kept += int(keep.sum())
        live += keep[:3]
    # effects of 1.0 give z = 10 (always found); 0.4 gives z = 4 on 4 dof (chi2 noncentrality 16:
    # power about 0.8 at BH's thresholds)
    assert live[0] == live[1] == 60 and 30 <= live[2] < 60
    assert false / kept < 0.05 + 3 * np.sqrt(0.05 * 0.95 / kept)


def test_groups_follow_the_residual_couplings():
    m = build("resnet", (1, 12, 12), 10).eval()
    graph = dependency_graph(m, torch.zeros(1, 1, 12, 12))
    found = {g.root: g for g in groups(m, graph)}
    # the stem and block 1's second conv feed one identity sum; blocks 2-3 share block 2's shortcut
    assert set(found["0"].producers) >= {"0", "1", "3.conv2", "3.bn2"}
    assert set(found["4.shortcut.0"].producers) >= {"4.conv2", "4.shortcut.0", "5.conv2"}
    assert "9" not in found                     # the output layer is not pruned by default
    sizes = {k: g.size for k, g in found.items()}
    assert sizes == {"0": 16, "3.conv1": 16, "4.conv1": 32, "4.shortcut.0": 32, "5.conv1": 32}


def test_group_statistic_sums_the_producers_of_a_coupled_channel():
    m = build("resnet", (1, 12, 12), 10).eval()
    se = _se(m)
    st = unit_statistics(m, se)
    t = group_tests(m, torch.zeros(1, 1, 12, 12), st)
    row = t[(t["group"] == "4.shortcut.0") & (t["channel"] == 5)].iloc[0]
    layers = ["4.conv2", "4.bn2", "4.shortcut.0", "4.shortcut.1", "5.conv2", "5.bn2"]
    assert set(row["producers"].split(",")) == set(layers)
    assert row["chi2"] == pytest.approx(sum(st.chi2[n][5] for n in layers), rel=1e-12)
    assert row["dof"] == sum(st.dof[n][5] for n in layers)
    assert row["pvalue"] == pytest.approx(sps.chi2.sf(row["chi2"], row["dof"]), rel=1e-10)


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("lenet5", (1, 16, 16)), ("cnn1d", (24,)),
                                        ("resnet", (1, 12, 12))])
def test_prune_channels_meets_the_budget_with_the_fewest_channels(name, shape):
    m = build(name, shape, 5)
    x = torch.randn(4, *shape)
    st = unit_statistics(m, _se(m))
    macs0 = count(m, x[:1])[0]
    small = copy.deepcopy(m)
    rep = prune_channels(small, x[:1], "wald-chi2", speedup=2.0, stats=st)
    assert isinstance(rep, StructuredReport)
    assert rep.macs_before == macs0 and rep.macs_after <= macs0 / 2
    assert rep.macs_after == count(small, x[:1])[0] and small(x).shape == (4, 5)
    # one channel fewer would miss the budget: the bisection found the smallest cut
    graph = dependency_graph(m, x[:1])
    found = groups(m, graph)
    order = surgery._order(channel_scores(m, graph, found, WaldImportance(st, "chi2")), found, 1)
    ignored = [n for n, mod in m.named_modules() if mod is output_layers(m)[0]]
    total = sum(rep.removed.values())
    assert surgery._macs_after(m, x[:1], found, order[:total], ignored) == rep.macs_after
    assert surgery._macs_after(m, x[:1], found, order[:total - 1], ignored) > macs0 / 2
    assert all(k >= 1 for k in rep.kept.values())


def test_lowest_statistics_go_first_across_layers():
    m = _mlp()
    se = _se(m)
    st = unit_statistics(m, se)
    x = torch.randn(1, 5)
    t = group_tests(m, x, st)
    small = copy.deepcopy(m)
    rep = prune_channels(small, x, "wald-chi2", target_macs=count(m, x)[0] - 1, stats=st)
    lowest = t.sort_values("chi2").iloc[0]
    assert sum(rep.removed.values()) == 1 and rep.removed[lowest["group"]] == 1
    keep = [c for c in range(7 if lowest["group"] == "0" else 4) if c != lowest["channel"]]
    ref = m.get_submodule(lowest["group"]).weight[keep]
    torch.testing.assert_close(small.get_submodule(lowest["group"]).weight, ref)


def test_pvalue_and_chi2_scores_differ_by_degrees_of_freedom():
    # equal statistics, different sizes: the p-value calls the wider unit less significant
    m = _mlp()
    st = unit_statistics(m, _se(m))
    st.chi2["0"][:] = 10.0
    st.chi2["2"][:] = 10.0
    graph = dependency_graph(m, torch.zeros(1, 5))
    found = {g.root: g for g in groups(m, graph)}
    by_p = {k: WaldImportance(st, "pvalue")(g.tp_group) for k, g in found.items()}
    by_chi2 = {k: WaldImportance(st, "chi2")(g.tp_group) for k, g in found.items()}
    assert by_chi2["0"][0] == by_chi2["2"][0] == 10.0
    assert by_p["2"][0] < by_p["0"][0]          # layer 2's units have 8 dof (7 inputs + bias), layer 0's 6
    assert by_p["2"][0] == pytest.approx(-sps.chi2.logsf(10.0, 8))


def test_chi2_per_mac_divides_by_each_channels_cost():
    m = _mlp()
    st = unit_statistics(m, _se(m))
    x = torch.zeros(1, 5)
    graph = dependency_graph(m, x)
    g0 = next(g for g in groups(m, graph) if g.root == "0")
    per = WaldImportance(st, "chi2-per-mac", x)(g0.tp_group)
    # a unit of layer 0 costs what the same network one unit narrower saves
    narrow = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    cost = count(m, x)[0] - count(narrow, x)[0]
    assert cost > 9
    np.testing.assert_allclose(per.numpy(), st.chi2["0"] / cost, rtol=1e-12)
    with pytest.raises(ValueError, match="needs example_inputs"):
        WaldImportance(st, "chi2-per-mac")


def test_wald_importance_drives_torch_prunings_own_pruner():
    m = _mlp()
    st = unit_statistics(m, _se(m))
    x = torch.zeros(1, 5)
    ours = copy.deepcopy(m)
    pruner = tp.pruner.MetaPruner(m, x, importance=WaldImportance(st, "chi2"), pruning_ratio=0.5,
                                  global_pruning=True, ignored_layers=[m[4]])
    pruner.step()
    removed = {"0": 7 - m[0].out_features, "2": 4 - m[2].out_features}
    rep = prune_channels(ours, x, "wald-chi2", target_macs=count(m, x)[0], stats=st)
    assert rep.removed == removed
    torch.testing.assert_close(ours[0].weight, m[0].weight)


def test_torch_nn_utils_prune_with_wald_importance_scores():
    # z = w / se as importance_scores: ln_structured's row L2 norm is sqrt of the diagonal chi2
    m = _mlp()
    se = _se(m)
    z = m[0].weight.detach() / se["0.weight"]
    torch.nn.utils.prune.ln_structured(m[0], "weight", amount=3, n=2, dim=0, importance_scores=z)
    gone = set(np.flatnonzero((m[0].weight == 0).all(1).numpy()))
    chi2_w = (z ** 2).sum(1).numpy()
    assert gone == set(np.argsort(chi2_w)[:3])


def test_prune_channels_refuses_bad_input_before_any_change():
    m = _mlp()
    x = torch.zeros(1, 5)
    before = copy.deepcopy(m.state_dict())
    st = unit_statistics(m, _se(m))
    with pytest.raises(ValueError, match="exactly one"):
        prune_channels(m, x, "magnitude")
    with pytest.raises(ValueError, match="importance='bogus' is not valid; choose one of: wald"):
        prune_channels(m, x, "bogus", speedup=2.0)
    with pytest.raises(ValueError, match="needs stats="):
        prune_channels(m, x, "wald", speedup=2.0)
    with pytest.raises(ValueError, match=r"speedup must be in \[1.0, inf\]"):
        prune_channels(m, x, "wald", speedup=0.5, stats=st)
    with pytest.raises(ValueError, match="out of reach"):
        prune_channels(m, x, "magnitude", speedup=1000.0)
    with pytest.raises(ValueError, match="reads the loss gradient"):
        prune_channels(m, x, "taylor", speedup=1.5)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])


def _masked_mlp():
    """``_mlp()`` pruned to half its weights, with unit 1 of layer "2" (its row and bias) fully
    masked: it outputs relu(0) = 0, so removing it changes nothing."""
    import mustat
    from mustat._params import install_mask
    m = _mlp()
    se = _se(m)
    mustat.prune(m, mustat.score(m, "magnitude"), sparsity=0.5)
    keep = mask_of(m, "2.weight").clone()
    keep[1] = 0.0
    install_mask(m, "2.weight", keep)
    install_mask(m, "2.bias", torch.tensor([1.0, 0.0, 1.0, 1.0]))
    return m, se


def test_masked_models_are_cut_as_their_effective_weights():
    """Before: refused ("carry mustat masks"). Now the masks are baked in for the cut and the
    surviving entries keep theirs; removing a fully masked unit leaves the outputs identical."""
    m, se = _masked_mlp()
    x = torch.randn(16, 5)
    before = m(x).detach()
    keeps = {n: mask_of(m, n).clone() for n in masked_names(m)}
    st = unit_statistics(m, {n: torch.full_like(v, 1e-6) for n, v in se.items()})   # every live unit significant
    assert st.dof["2"][1] == 0
    rep, tests = prune_channels_fdr(m, x[:1], st)
    assert rep.removed == {"0": 0, "2": 1}
    assert (m[2].weight.shape, m[2].bias.shape, m[4].weight.shape) == ((3, 7), (3,), (3, 3))
    assert torch.equal(m(x).detach(), before)
    rows = [0, 2, 3]
    assert torch.equal(mask_of(m, "2.weight"), keeps["2.weight"][rows])
    assert torch.equal(mask_of(m, "2.bias"), keeps["2.bias"][rows])
    assert torch.equal(mask_of(m, "4.weight"), keeps["4.weight"][:, rows])
    assert torch.equal(mask_of(m, "0.weight"), keeps["0.weight"])


def test_prune_channels_of_a_masked_model_equals_cutting_its_finalized_copy():
    import mustat
    m, _ = _masked_mlp()
    x = torch.randn(16, 5)
    plain = mustat.finalize(copy.deepcopy(m))
    rep = prune_channels(m, x[:1], "magnitude", speedup=1.5)
    assert rep == prune_channels(plain, x[:1], "magnitude", speedup=1.5)
    assert torch.equal(m(x), plain(x))
    for name in masked_names(m):
        assert mask_of(m, name).shape == entry(m, name).leaf.shape
        assert torch.equal(entry(m, name).effective(), plain.get_parameter(name).detach())


def test_a_refused_budget_leaves_a_masked_model_as_it_came():
    m, _ = _masked_mlp()
    x = torch.randn(16, 5)
    before, names = m(x).detach(), masked_names(m)
    keeps = {n: mask_of(m, n).clone() for n in names}
    with pytest.raises(ValueError, match="out of reach"):
        prune_channels(m, x[:1], "magnitude", speedup=1000.0)
    assert masked_names(m) == names and torch.equal(m(x).detach(), before)
    for n in names:
        assert torch.equal(mask_of(m, n), keeps[n])


def test_taylor_uses_the_gradient():
    m = _mlp()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    F.cross_entropy(m(x), y).backward()
    rep = prune_channels(m, x[:1], "taylor", speedup=1.3)
    assert rep.flop_speedup >= 1.3


def test_fdr_pruning_removes_the_dead_units_and_keeps_min_channels():
    m = _mlp()
    se = _se(m)
    with torch.no_grad():
        m[0].weight[[1, 4]] = 0.0
        m[0].bias[[1, 4]] = 0.0
        m[2].weight.mul_(1e-6)
        m[2].bias.mul_(1e-6)
    for k in ("0.weight", "0.bias"):
        se[k] = se[k] * 1e-3                       # layer 0's live units: overwhelming evidence
    st = unit_statistics(m, se)
    x = torch.randn(3, 5)
    rep, tests = prune_channels_fdr(m, x[:1], st, fdr=0.05)
    assert m[0].out_features == 5 and rep.removed["0"] == 2
    assert m[2].out_features == 1 and tests[tests["group"] == "2"]["forced"].sum() == 1
    assert m(x).shape == (3, 3)


def test_export_reloads_in_a_fresh_process_without_mustat(tmp_path):
    torch.manual_seed(0)
    m = build("resnet", (1, 12, 12), 4)
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():                         # non-trivial BatchNorm statistics
        m.train()(torch.randn(16, 1, 12, 12))
    prune_channels(m, x[:1], "magnitude", speedup=2.0)
    m.train()
    path = tmp_path / "small.pt2"
    export(m, x[:1], path)
    assert m.training                              # mode restored
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(m.eval()(x), tmp_path / "ref.pt")
    code = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); x = torch.load(sys.argv[2]); "
            "ref = torch.load(sys.argv[3]); assert 'mustat' not in sys.modules; "
            "assert torch.equal(m(x), ref), 'outputs differ'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "ref.pt")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok"


def test_state_dict_round_trip_of_a_pruned_module(tmp_path):
    m = build("lenet5", (1, 16, 16), 4)
    x = torch.randn(2, 1, 16, 16)
    prune_channels(m, x[:1], "magnitude", speedup=2.0)
    torch.save(m, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), m.eval()(x))


def test_a_group_down_to_one_channel_is_skipped_not_emptied():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 1), nn.ReLU(), nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.zeros(1, 5)
    st = unit_statistics(m, _se(m))
    rep = prune_channels(m, x, "wald", speedup=1.2, stats=st)
    assert rep.kept["0"] == 1 and rep.removed["2"] >= 1 and m[0].out_features == 1


def test_kfac_block_of_a_convolution_without_bias():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    X, y = torch.randn(40, 2, 6), torch.randint(0, 2, (40,))
    est = _kfac(m, X, y)
    st = unit_statistics(m, estimator=est)
    _, _, _, A, B = est._factors["0.weight"]
    A, B, d = A.numpy(), B.numpy(), float(est._d)
    cov = np.linalg.inv(np.kron(B, A) + d * np.eye(B.shape[0] * A.shape[0]))
    W = m[0].weight.detach().double().reshape(3, -1).numpy()
    f = W.shape[1]
    ref = [W[o] @ np.linalg.solve(cov[o * f:(o + 1) * f, o * f:(o + 1) * f], W[o]) for o in range(3)]
    np.testing.assert_allclose(st.chi2["0"], ref, rtol=1e-8)
    assert (st.dof["0"] == 6).all()


def test_groups_without_statistics_or_with_stale_ones_are_refused():
    m = _mlp()
    x = torch.zeros(1, 5)
    se = {k: v for k, v in _se(m).items() if not k.startswith("2.")}
    st = unit_statistics(m, se)
    with pytest.raises(ValueError, match="group rooted at '2' .* has no statistics"):
        group_tests(m, x, st)
    with pytest.raises(ValueError, match="rooted at '2' has no statistics for any layer"):
        prune_channels(copy.deepcopy(m), x, "wald-chi2", speedup=1.5, stats=st)
    full = unit_statistics(m, _se(m))
    prune_channels(m, x, "magnitude", speedup=1.5)
    with pytest.raises(ValueError, match="belong to another version of the model"):
        group_tests(m, x, full)


def test_submodule_modes_are_restored():
    m = build("resnet", (1, 12, 12), 4)
    m.train()
    m[1].eval()                                    # a mixed state: one BatchNorm frozen
    x = torch.randn(2, 1, 12, 12)
    count(m, x[:1])
    dependency_graph(m, x[:1])
    from mustat.structured import latency
    latency(m, x, min_run_time=0.01)
    assert m.training and not m[1].training and m[3].bn1.training


def test_paired_latency_sees_a_64x_smaller_layer_and_checks_repeats():
    from mustat.structured import paired_latency
    big, small = nn.Linear(512, 512), nn.Linear(512, 8)
    t_big, t_small = paired_latency(big, small, torch.randn(128, 512), repeats=2, min_run_time=0.05)
    assert 0 < t_small < t_big
    with pytest.raises(ValueError, match="repeats must be"):
        paired_latency(big, small, torch.randn(1, 512), repeats=0)


def _live_masks(seed=5):
    """Keep-masks of ``_mlp()``'s first layer: row 0 keeps one weight, row 1 nothing (its bias
    masked too), row 2 keeps all, the rest at random."""
    g = torch.Generator().manual_seed(seed)
    keep_w = (torch.rand(7, 5, generator=g) > 0.4).float()
    keep_w[0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    keep_w[1] = 0.0
    keep_w[2] = 1.0
    keep_b = torch.ones(7)
    keep_b[[0, 1]] = 0.0
    return keep_w, keep_b


@pytest.mark.parametrize("mechanism", ["mustat", "torch-prune"])
def test_diagonal_unit_statistics_count_only_the_live_weights(mechanism):
    """A unit's chi2 is over its unmasked entries and has one degree of freedom per unmasked entry
    (before: every entry of the row counted, so a lone live weight at z = 2 got p = 0.68 on 6 dof, not 0.046)."""
    from mustat._params import install_mask, masked_names
    m = _mlp()
    se = _se(m)
    keep_w, keep_b = _live_masks()
    if mechanism == "mustat":
        install_mask(m, "0.weight", keep_w)
        install_mask(m, "0.bias", keep_b)
    else:
        torch.nn.utils.prune.custom_from_mask(m[0], "weight", keep_w)
        torch.nn.utils.prune.custom_from_mask(m[0], "bias", keep_b)
    assert sorted(masked_names(m)) == ["0.bias", "0.weight"]
    w = m[0].weight.detach().double().numpy()
    b = m[0].bias.detach().double().numpy()
    se["0.weight"][0, 2] = abs(float(w[0, 2])) / 2        # the lone live weight of row 0 at z = 2
    for name, k in (("0.weight", keep_w), ("0.bias", keep_b)):   # estimators give masked entries se 0
        se[name] = torch.where(k.bool(), se[name], torch.zeros_like(se[name]))
    st = unit_statistics(m, se)
    sw, sb = se["0.weight"].double().numpy(), se["0.bias"].double().numpy()
    lw, lb = keep_w.numpy().astype(bool), keep_b.numpy().astype(bool)
    ref_chi2 = np.where(lw, (w / np.where(lw, sw, 1.0)) ** 2, 0.0).sum(1) + np.where(lb, (b / np.where(lb, sb, 1)) ** 2, 0)
    ref_dof = lw.sum(1) + lb
    np.testing.assert_allclose(st.chi2["0"], ref_chi2, rtol=1e-12)
    np.testing.assert_array_equal(st.dof["0"], ref_dof)
    assert st.dof["0"][0] == 1 and st.chi2["0"][0] == pytest.approx(4.0, rel=1e-12)
    p = st.pvalues()["0"]
    assert p[0] == pytest.approx(sps.chi2.sf(4.0, 1), rel=1e-12)      # 0.0455
    assert st.dof["0"][1] == 0 and p[1] == 1.0                          # a fully pruned unit
    np.testing.assert_allclose(p[2:], sps.chi2.sf(ref_chi2[2:], ref_dof[2:]), rtol=1e-12)
    np.testing.assert_array_equal(st.dof["2"], np.full(4, 8))          # unmasked layers as before


def test_kfac_block_of_a_masked_layer_is_the_block_of_its_live_entries():
    """Masked entries are left out of the block: chi2 = w_L' Sigma_LL^-1 w_L over the live entries
    L of the row (weights and bias) with |L| degrees of freedom, so a lone live weight gets
    (w / se)^2 with the estimator's own se, on 1 dof (before: 5 dof, and a full-row quadratic form)."""
    from mustat._params import install_mask
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    keep_w = torch.ones(5, 4)
    keep_w[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])   # one live weight, bias masked below
    keep_w[1] = 0.0                                   # nothing live
    keep_w[2, 3] = 0.0                                # one entry of five masked
    keep_w[3, :2] = 0.0
    keep_b = torch.ones(5)
    keep_b[[0, 1]] = 0.0
    install_mask(m, "0.weight", keep_w)
    install_mask(m, "0.bias", keep_b)
    X, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    est = _kfac(m, X, y, params=["0.weight", "2.weight"])
    st = unit_statistics(m, estimator=est)
    _, _, _, A, B = est._factors["0.weight"]
    A, B, d = A.numpy(), B.numpy(), float(est._d)
    cov = np.linalg.inv(np.kron(B, A) + d * np.eye(B.shape[0] * A.shape[0]))
    W = torch.cat([m[0].weight, m[0].bias[:, None]], 1).detach().double().numpy()
    live = torch.cat([keep_w, keep_b[:, None]], 1).numpy().astype(bool)
    f = W.shape[1]
    for o in range(5):
        L = np.flatnonzero(live[o])
        block = cov[o * f:(o + 1) * f, o * f:(o + 1) * f][np.ix_(L, L)]
        ref = W[o, L] @ np.linalg.solve(block, W[o, L]) if len(L) else 0.0
        np.testing.assert_allclose(st.chi2["0"][o], ref, rtol=1e-8, atol=1e-300)
    np.testing.assert_array_equal(st.dof["0"], live.sum(1))
    z = float(m[0].weight[0, 1].detach().double() / est.se()["0.weight"][0, 1].double())    # se() in the model's float32
    assert st.chi2["0"][0] == pytest.approx(z ** 2, rel=1e-6)
    assert st.pvalues()["0"][0] == pytest.approx(sps.chi2.sf(z ** 2, 1), rel=1e-6)
    assert st.pvalues()["0"][1] == 1.0
    np.testing.assert_array_equal(st.dof["2"], np.full(3, 6))
