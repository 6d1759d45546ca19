"""Sparse model files: smaller on disk, bit-exact on load; sparse inference equals dense."""

import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

import mustat
from mustat.models import build


def _pruned(name, sparsity, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build(name, (1, 28, 28), 10)
    # layer-wise, as the benchmark: global ranking of untrained weights empties whole layers
    mustat.prune(model, mustat.score(model, "magnitude"), sparsity=sparsity, scope="layer")
    return model


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
@pytest.mark.parametrize("sparsity, limit", [(0.95, 0.10), (0.98, 0.05)])
def test_file_shrinks_and_loads_bit_exact(tmp_path, name, sparsity, limit):
    model = _pruned(name, sparsity)
    x = torch.randn(16, 1, 28, 28)
    dense_file = tmp_path / "dense.pt"
    torch.save(mustat.finalize(_pruned(name, sparsity)).state_dict(), dense_file)
    path = mustat.save_sparse(model, tmp_path / "model.safetensors")
    ratio = path.stat().st_size / dense_file.stat().st_size
    assert ratio <= limit, ratio
    for masks in (True, False):
        fresh = build(name, (1, 28, 28), 10)
        mustat.load_sparse(path, fresh, masks=masks)
        assert torch.equal(fresh(x), model(x))
        assert mustat.sparsity(fresh) == mustat.sparsity(model)
        assert bool(mustat.pruning.masked_names(fresh)) is masks
    # with masks restored, retraining keeps pruned weights at zero, as before saving
    fresh = mustat.load_sparse(path, build(name, (1, 28, 28), 10))
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    nn.functional.cross_entropy(fresh(x), torch.zeros(16, dtype=torch.long)).backward()
    opt.step()
    assert mustat.sparsity(fresh) >= mustat.sparsity(model)


def test_kept_zero_stays_kept_and_unpruned_models_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    mustat.prune(model, {"0.weight": torch.rand(30, 40)}, sparsity=0.9, scope="layer")
    with torch.no_grad():  # a kept weight that is exactly zero must come back kept
        kept = torch.nonzero(model[0].parametrizations.weight[0].mask)[0]
        model[0].parametrizations.weight.original[tuple(kept)] = 0.0
    path = mustat.save_sparse(model, tmp_path / "m.safetensors")
    fresh = mustat.load_sparse(path, nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5)))
    assert torch.equal(fresh[0].parametrizations.weight[0].mask, model[0].parametrizations.weight[0].mask)
    dense = nn.Sequential(nn.Linear(4, 3))
    back = mustat.load_sparse(mustat.save_sparse(dense, tmp_path / "d.safetensors"), nn.Sequential(nn.Linear(4, 3)))
    assert torch.equal(back[0].weight, dense[0].weight)


def test_wrong_architecture_and_wrong_file(tmp_path):
    path = mustat.save_sparse(_pruned("mlp", 0.9), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="same architecture"):
        mustat.load_sparse(path, build("mlp", (1, 20, 20), 10))
    with pytest.raises(ValueError, match="does not fit this model"):
        mustat.load_sparse(path, build("lenet5", (1, 28, 28), 10))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a mustat sparse model"):
        mustat.load_sparse(tmp_path / "other.safetensors", build("mlp", (1, 28, 28), 10))
    with pytest.raises(FileNotFoundError, match="no sparse model file"):
        mustat.load_sparse(tmp_path / "missing.safetensors", build("mlp", (1, 28, 28), 10))


@pytest.mark.parametrize("batch", [1, 7])
def test_sparse_inference_equals_dense(batch):
    model = _pruned("mlp", 0.95).eval()
    fast = mustat.sparse_inference(model, min_params=0, min_sparsity=0.5)
    sparse_enough = [m for m in mustat.finalize(_pruned("mlp", 0.95)).modules()
                     if isinstance(m, nn.Linear) and (m.weight == 0).double().mean() >= 0.5]
    # by default only large layers are converted (small ones are faster dense)
    big = mustat.sparse_inference(model)
    assert [type(m).__name__ for m in big if not isinstance(m, (nn.ReLU, nn.Flatten))] == ["SparseLinear", "Linear", "Linear"]
    assert sum(isinstance(m, mustat.sparse.SparseLinear) for m in fast.modules()) == len(sparse_enough) >= 2
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(fast(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert mustat.pruning.masked_names(model)  # the user's model keeps its masks
    assert not any(isinstance(m, mustat.sparse.SparseLinear) for m in mustat.sparse_inference(model, min_sparsity=1.0).modules())


def test_cli_saves_each_final_model_sparse(tmp_path):
    from mustat.cli import main

    assert main(["prune", "--criteria", "magnitude,mu[curvature]", "--epochs", "2", "--retrain-epochs", "1",
                 "--target-sparsity", "0.9", "--quiet", "--save-sparse", "--out", str(tmp_path)]) == 0
    data = mustat.data.load("digits")
    for stem in ("seed0-magnitude", "seed0-mu-curvature"):
        path = tmp_path / "models" / f"{stem}.safetensors"
        from_file = mustat.load_sparse(path, build("mlp", data.input_shape, 10))
        from_ckpt = build("mlp", data.input_shape, 10)
        mustat.load_pruned_state_dict(from_ckpt, torch.load(tmp_path / "checkpoints" / f"{stem}.pt")["model"])
        assert torch.equal(from_file(data.X_test), from_ckpt(data.X_test))
        assert path.stat().st_size < 0.2 * (tmp_path / "checkpoints" / f"{stem}.pt").stat().st_size


def test_a_lightly_pruned_tensor_keeps_its_mask_through_a_file(tmp_path):
    """2% pruned: dense values are the smallest encoding, but the mask must come back (it did not:
    three SGD steps then revived the 200 pruned weights)."""
    model = nn.Sequential(nn.Linear(100, 100))
    mustat.prune(model, mustat.score(model, "magnitude"), sparsity=0.02)
    fresh = mustat.load_sparse(mustat.save_sparse(model, tmp_path / "m.safetensors"), nn.Sequential(nn.Linear(100, 100)))
    opt = torch.optim.SGD(fresh.parameters(), lr=0.5)
    x = torch.randn(8, 100)
    for _ in range(3):
        opt.zero_grad()
        fresh(x).square().sum().backward()
        opt.step()
    assert int((fresh[0].weight == 0).sum()) == 200


def test_bad_files_are_named_and_a_wrong_architecture_leaves_the_model_untouched(tmp_path):
    path = mustat.save_sparse(_pruned("mlp", 0.9), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model"):
        mustat.load_sparse(path, other)
    assert not mustat.pruning.masked_names(other)  # no mask installed
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    for name, data in [("truncated", path.read_bytes()[:300]), ("garbage", b"\x00" * 64)]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=str(bad)):
            mustat.load_sparse(bad, build("mlp", (1, 28, 28), 10))


def test_sparse_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = mustat.save_sparse(_pruned("mlp", 0.9), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
