"""mustat reads and writes the masks of torch.nn.utils.prune and torch.ao.pruning: a model
pruned elsewhere is scored, pruned further, reported and saved; mustat's masks export to
torch.nn.utils.prune's layout and back, bit-exactly."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import mustat
from mustat._params import mask_of


def _mlp(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))


def test_torch_prune_masks_are_read_tightened_and_saved(tmp_path):
    model = _mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.25)
    rep = mustat.PruningReport.from_model(model)
    assert rep.pruned == (32, 0)
    scores = mustat.score(model, "magnitude")
    assert torch.isinf(scores["0.weight"][model[0].weight_mask == 0]).all()
    mustat.prune(model, scores, sparsity=0.5, scope="layer")
    # the mask stays in torch's layout, tightened: the old pattern is kept, and more is pruned
    assert torch_prune.is_pruned(model) and hasattr(model[0], "weight_orig")
    assert int((model[0].weight_mask == 0).sum()) == 64 and int((model[2].weight == 0).sum()) == 32
    out = model(X)
    fresh = mustat.load_sparse(mustat.save_sparse(model, tmp_path / "m.safetensors"), _mlp(1))
    assert torch.equal(fresh(X), out)
    assert torch.equal(mask_of(fresh, "0.weight") != 0, model[0].weight_mask != 0)
    torch_prune.remove(model[0], "weight")  # torch's own finalize still works
    assert torch.equal(model(X), out)


def test_torch_ao_sparsifier_masks_are_read_and_finalized():
    from torch.ao.pruning import WeightNormSparsifier

    model = _mlp()
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    ao = model[0].parametrizations.weight[0].mask.clone()
    assert mustat.PruningReport.from_model(model).pruned[0] == int((ao == 0).sum()) > 0
    mustat.prune(model, mustat.score(model, "magnitude"), sparsity=0.75, scope="layer")
    now = mask_of(model, "0.weight")
    assert int((now == 0).sum()) == 96 and bool(((ao == 0) <= (now == 0)).all())  # never revived
    out = model(X)
    mustat.finalize(model)
    assert not mustat.pruning.masked_names(model) and torch.equal(model(X), out)


def test_mustat_masks_export_to_torch_prune_and_back():
    model = _mlp()
    mustat.prune(model, mustat.score(model, "random", seed=0), sparsity=0.6)
    masks = {n: mask_of(model, n).clone() for n in ("0.weight", "2.weight")}
    leaves = [model[0].parametrizations.weight.original, model[2].parametrizations.weight.original]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(X)
    mustat.to_torch_prune(model)
    assert torch_prune.is_pruned(model) and model[0].weight_orig is leaves[0]
    assert torch.equal(model(X), out)
    assert all(torch.equal(model[int(n[0])].weight_mask, masks[n]) for n in masks)
    mustat.from_torch_prune(model)
    assert not torch_prune.is_pruned(model)
    assert model[0].parametrizations.weight.original is leaves[0] and model[2].parametrizations.weight.original is leaves[1]
    assert all(torch.equal(mask_of(model, n), masks[n]) for n in masks)
    assert torch.equal(model(X), out)
    # the optimizer built before the round trip still trains the same tensors, masked entries stay 0
    nn.functional.cross_entropy(model(X), torch.zeros(10, dtype=torch.long)).backward()
    opt.step()
    assert (model[0].weight[masks["0.weight"] == 0] == 0).all()


def test_tied_tensors_cannot_go_to_torch_prune():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    mustat.prune(model, mustat.score(model, "magnitude"), sparsity=0.5)
    with pytest.raises(ValueError, match="tied"):
        mustat.to_torch_prune(model)
