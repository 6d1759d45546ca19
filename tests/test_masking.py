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


def test_a_mask_on_a_later_use_of_a_tied_tensor_is_the_tensors_mask():
    """torch.nn.utils.prune on a tied head: the report, further pruning and finalize see it."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(self.emb(t))

    torch.manual_seed(0)
    model = LM()
    torch_prune.l1_unstructured(model.head, "weight", 0.5)
    old = model.head.weight_mask.clone()
    assert mustat.PruningReport.from_model(model).pruned == (20,)
    mustat.prune(model, {"emb.weight": torch.rand(10, 4)}, sparsity=0.6)
    now = mask_of(model, "emb.weight")
    assert int((now == 0).sum()) == 24 and bool(((old == 0) <= (now == 0)).all())  # never revived
    t = torch.tensor([[1, 2, 3]])
    out = model(t)
    mustat.finalize(model)
    assert model.emb.weight is model.head.weight and torch.equal(model(t), out)


def test_shared_modules_with_buffers_save_and_functional_calls_leave_no_traces(tmp_path):
    bn = nn.BatchNorm1d(4)
    shared = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn).eval()
    mustat.prune(shared, mustat.score(shared, "magnitude"), sparsity=0.5)
    other = nn.BatchNorm1d(4)
    fresh = nn.Sequential(nn.Linear(4, 4), other, nn.Linear(4, 4), other).eval()
    x = torch.randn(3, 4)
    mustat.load_sparse(mustat.save_sparse(shared, tmp_path / "s.safetensors"), fresh)
    assert torch.equal(fresh(x), shared(x))
    # torch prune's pre-hook writes its computed weight during a functional call: it is put back
    model = _mlp()
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    model(X)
    before = model[0].__dict__["weight"]
    fm = mustat.FunctionalModel(model, dtype=torch.float64)
    fm(fm.params(), X.double())
    assert model[0].__dict__["weight"] is before and model[0].weight.dtype == torch.float32
    assert isinstance(mustat.sparse_inference(model, min_params=1, min_sparsity=0.0)[0], mustat.sparse.SparseLinear)


def test_a_torch_prune_state_dict_loads_as_mustat_masks():
    model = _mlp()
    mustat.prune(model, mustat.score(model, "random", seed=3), sparsity=0.5)
    out = model(X)
    state = mustat.to_torch_prune(model).state_dict()
    fresh = _mlp(5)
    mustat.load_pruned_state_dict(fresh, state)
    assert torch.equal(fresh(X), out) and mustat.pruning.masked_names(fresh) == ["0.weight", "2.weight"]
