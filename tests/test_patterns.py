"""N:M patterns: the keep rule against a numpy reference, prune(pattern=...) and the checker."""

import numpy as np
import pytest
import torch
from torch import nn

import mustat
from mustat.patterns import Pattern, check_pattern, nm_keep, parse_pattern, pattern_violations


def _numpy_nm(scores: np.ndarray, n: int, m: int, alive: np.ndarray) -> np.ndarray:
    keep = np.zeros(scores.shape, dtype=bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            s = np.where(alive[r, g:g + m], scores[r, g:g + m], -np.inf)
            top = np.argsort(-s, kind="stable")[:n]
            keep[r, g + top] = alive[r, g + top]
    return keep


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
    model = nn.Sequential(nn.Conv2d(1, 4, 2), nn.Flatten(), nn.Linear(4 * 25, 8), nn.ReLU(), nn.Linear(8, 4))
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}
    report = mustat.prune(model, scores, pattern="2:4")
    assert report.sparsity == pytest.approx(0.5)
    assert check_pattern(model, "2:4") == {}
    # the largest |w| of each group of 4 along a row survive (the conv's row: in * kernel = 4)
    w = model[2].parametrizations.weight.original.detach()
    keep = mustat.pruning.mask_of(model, "2.weight").bool()
    np.testing.assert_array_equal(keep.numpy(), _numpy_nm(w.abs().numpy(), 2, 4, np.ones(w.shape, bool)))
    # a denser pattern would be broken by a dense tensor; a sparser one is obeyed
    assert check_pattern(model, "3:4") == {}
    assert set(check_pattern(model, "1:4")) == {"0.weight", "2.weight", "4.weight"}


def test_prune_nm_errors():
    model = nn.Sequential(nn.Linear(6, 4))
    scores = {"0.weight": torch.rand(4, 6)}
    with pytest.raises(ValueError, match="multiple of 4"):
        mustat.prune(model, scores, pattern="2:4")
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
