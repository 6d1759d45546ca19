"""N:M patterns: the keep rule against numpy references (a convolution's groups in NVIDIA apex ASP's
``(K, R, S, C)`` layout), prune(pattern=...) and the checker."""

import numpy as np
import pytest
import torch
from torch import nn

import mustat
from mustat.patterns import (
    Pattern,
    check_groups,
    check_pattern,
    from_groups,
    nm_keep,
    parse_pattern,
    pattern_violations,
    to_groups,
)


def _numpy_nm(scores: np.ndarray, n: int, m: int, alive: np.ndarray) -> np.ndarray:
    keep = np.zeros(scores.shape, dtype=bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            s = np.where(alive[r, g:g + m], scores[r, g:g + m], -np.inf)
            top = np.argsort(-s, kind="stable")[:n]
            keep[r, g + top] = alive[r, g + top]
    return keep


def _numpy_conv2d_nm(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask of a conv weight (K, C, R, S): the n highest of every m consecutive input channels
    at each tap, found in apex ASP's layout (K, R, S, C) = weight.permute(0, 2, 3, 1)."""
    krsc = scores.transpose(0, 2, 3, 1)
    keep = np.zeros(krsc.shape, dtype=bool)
    K, R, S, C = krsc.shape
    for k in range(K):
        for r in range(R):
            for s in range(S):
                for c in range(0, C, m):
                    top = np.argsort(-krsc[k, r, s, c:c + m], kind="stable")[:n]
                    keep[k, r, s, c + top] = True
    return keep.transpose(0, 3, 1, 2)  # back to (K, C, R, S)


def _numpy_conv2d_violations(values: np.ndarray, n: int, m: int) -> int:
    krsc = values.transpose(0, 2, 3, 1)
    K, R, S, C = krsc.shape
    return sum(int(np.count_nonzero(krsc[k, r, s, c:c + m]) > n)
               for k in range(K) for r in range(R) for s in range(S) for c in range(0, C, m))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_keep_matches_numpy(pattern):
    p = parse_pattern(pattern)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 24, generator=g, dtype=torch.float64)
    alive = torch.rand(7, 24, generator=g) > 0.2
    keep = nm_keep(s, p, alive)
    np.testing.assert_array_equal(keep.numpy(), _numpy_nm(s.numpy(), p.n, p.m, alive.numpy()))
    assert pattern_violations(keep.double(), p) == 0
    assert not keep[~alive].any()  # pruned weights stay pruned


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:4"])
def test_nm_keep_ties_go_to_the_earlier_position(pattern):
    # few distinct values, so most groups tie across the cut; -inf and 0 scores too
    p = parse_pattern(pattern)
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 3, (64, 32), generator=g).to(torch.float64)
    s[torch.rand(64, 32, generator=g) < 0.1] = float("-inf")
    for alive in (torch.ones(64, 32, dtype=torch.bool), torch.rand(64, 32, generator=g) > 0.3):
        keep = nm_keep(s, p, alive)
        np.testing.assert_array_equal(keep.numpy(), _numpy_nm(s.numpy(), p.n, p.m, alive.numpy()))
    np.testing.assert_array_equal(nm_keep(torch.zeros(2, 8), p).numpy(),
                                  np.tile(np.arange(8) % p.m < p.n, (2, 1)))  # all tied: the first N


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_conv2d_groups_are_input_channels_at_each_tap(pattern):
    p = parse_pattern(pattern)
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    s = torch.rand(conv.weight.shape, dtype=torch.float64)
    keep = nm_keep(s, p)
    assert keep.shape == conv.weight.shape
    np.testing.assert_array_equal(keep.numpy(), _numpy_conv2d_nm(s.numpy(), p.n, p.m))
    # every group of M input channels at each (k, r, s) keeps exactly N, in apex's (K, R, S, C) layout
    krsc = keep.permute(0, 2, 3, 1).reshape(-1, p.m)
    assert (krsc.sum(-1) == p.n).all()
    assert pattern_violations(keep.double(), p) == 0
    assert _numpy_conv2d_violations(keep.double().numpy(), p.n, p.m) == 0
    # the grouping of (out, in * kernel) rows (taps of one channel together) is a different one
    flat = keep.reshape(4, -1, p.m).sum(-1)
    assert (flat != p.n).any()


def test_conv1d_and_conv3d_groups_are_input_channels_at_each_tap():
    p = parse_pattern("2:4")
    g = torch.Generator().manual_seed(2)
    s1 = torch.rand(5, 8, 3, generator=g, dtype=torch.float64)  # Conv1d(8, 5, 3): (K, C, T)
    keep = nm_keep(s1, p).numpy()
    want = np.zeros(s1.shape, dtype=bool)
    for k in range(5):
        for t in range(3):
            for c in range(0, 8, 4):
                top = np.argsort(-s1[k, c:c + 4, t].numpy(), kind="stable")[:2]
                want[k, c + top, t] = True
    np.testing.assert_array_equal(keep, want)
    s3 = torch.rand(3, 4, 2, 2, 2, generator=g, dtype=torch.float64)  # Conv3d(4, 3, 2): one group per tap
    keep3 = nm_keep(s3, p)
    assert (keep3.sum(1) == 2).all()
    ranks = s3.argsort(1, descending=True).argsort(1)  # distinct scores: the two highest of the 4 channels
    assert torch.equal(keep3, ranks < 2)


@pytest.mark.parametrize("shape", [(12,), (3, 8), (4, 8, 3), (4, 8, 3, 2), (2, 4, 2, 3, 2)])
def test_to_groups_round_trip(shape):
    t = torch.arange(int(np.prod(shape))).reshape(shape)
    g = to_groups(t, 4)
    assert g.shape[-1] == 4 and torch.equal(from_groups(g, shape), t)
    if len(shape) > 2:  # a group: 4 consecutive channels of one output at one tap
        first = t.movedim(1, -1)[(0,) * (len(shape) - 1)][:4]
        assert torch.equal(g[0, 0], first)


def test_pattern_violations_on_conv_matches_apex_layout():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(4, 8, 3, 3, generator=g) * (torch.rand(4, 8, 3, 3, generator=g) < 0.5)
    for n, m in [(2, 4), (1, 4), (4, 8)]:
        want = _numpy_conv2d_violations(values.numpy(), n, m)
        assert want > 0
        assert pattern_violations(values, f"{n}:{m}") == want
    with pytest.raises(ValueError, match="in_channels"):
        pattern_violations(torch.ones(4, 6, 3, 3), "2:4")


def test_parse_and_errors():
    assert parse_pattern("2:4") == Pattern(2, 4) and parse_pattern("unstructured") == Pattern()
    assert parse_pattern(" 4 : 8 ").sparsity == 0.5
    for bad in ["4:2", "0:4", "2-4", "2:2"]:
        with pytest.raises(ValueError, match="pattern="):
            parse_pattern(bad)
    with pytest.raises(TypeError, match="pattern must be"):
        parse_pattern(24)


def test_prune_nm_on_linear_and_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 8), nn.ReLU(), nn.Linear(8, 4))
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}
    report = mustat.prune(model, scores, pattern="2:4")
    assert report.sparsity == pytest.approx(0.5)
    assert check_pattern(model, "2:4") == {}
    # the largest |w| of each group of 4 along a row survive
    w = model[2].parametrizations.weight.original.detach()
    keep = mustat.pruning.mask_of(model, "2.weight").bool()
    np.testing.assert_array_equal(keep.numpy(), _numpy_nm(w.abs().numpy(), 2, 4, np.ones(w.shape, bool)))
    # the conv's: of each 4 consecutive input channels at one kernel tap
    w = model[0].parametrizations.weight.original.detach()
    keep = mustat.pruning.mask_of(model, "0.weight").bool()
    np.testing.assert_array_equal(keep.numpy(), _numpy_conv2d_nm(w.abs().numpy(), 2, 4))
    # a denser pattern would be broken by a dense tensor; a sparser one is obeyed
    assert check_pattern(model, "3:4") == {}
    assert set(check_pattern(model, "1:4")) == {"0.weight", "2.weight", "4.weight"}


def test_check_pattern_reads_conv_groups_across_input_channels():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(8, 4, 3))
    w = model[0].weight.detach()
    old = nm_keep(w.abs().reshape(4, -1), Pattern(2, 4)).reshape(w.shape)  # 2:4 along (out, in * kernel) rows
    with torch.no_grad():
        model[0].weight.mul_(old)
    want = _numpy_conv2d_violations(model[0].weight.detach().numpy(), 2, 4)
    assert want > 0 and check_pattern(model, "2:4") == {"0.weight": want}
    with pytest.raises(ValueError, match="in_channels"):
        check_pattern(nn.Sequential(nn.Conv2d(3, 4, 3)), "2:4")


def test_prune_nm_errors():
    model = nn.Sequential(nn.Linear(6, 4))
    scores = {"0.weight": torch.rand(4, 6)}
    with pytest.raises(ValueError, match="multiple of 4"):
        mustat.prune(model, scores, pattern="2:4")
    conv = nn.Sequential(nn.Conv2d(2, 4, 2))  # in * kernel = 8, but 2 input channels: no group of 4
    with pytest.raises(ValueError, match="in_channels .* multiple of 4"):
        mustat.prune(conv, {"0.weight": torch.rand(4, 2, 2, 2)}, pattern="2:4")
    check_groups((4, 8, 2, 2), Pattern(2, 4), "w")
    check_groups((4, 6, 2, 2), Pattern(2, 3), "w")
    model = nn.Sequential(nn.Linear(8, 4))
    scores = {"0.weight": torch.rand(4, 8)}
    with pytest.raises(ValueError, match="contradicts pattern='2:4'"):
        mustat.prune(model, scores, sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match="max_tensor_sparsity does not apply"):
        mustat.prune(model, scores, pattern="2:4", max_tensor_sparsity=0.9)
    with pytest.raises(ValueError, match="sparsity is required"):
        mustat.prune(model, scores)


def test_hf_conv1d_groups_run_along_inputs():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    layer = Conv1D(12, 8)  # 8 inputs -> 12 outputs, weight stored (8, 12)
    model = nn.Sequential(layer)
    mustat.prune(model, {"0.weight": layer.weight.detach().abs()}, pattern="2:4")
    w = model[0].weight.detach()
    assert pattern_violations(w.T, "2:4") == 0
    assert pattern_violations(w, "2:4") > 0  # the stored rows are outputs: not the grouped ones
    assert check_pattern(model, "2:4") == {}
