"""Five architectures the library was not written for go through score -> prune -> finalize ->
save_sparse -> load_sparse bit-exactly, and every registered estimator works on them or refuses
with a clear error (the functional view: no deep copies, tied and frozen tensors handled once)."""

import warnings

import pytest
import torch
from architectures import ARCHITECTURES, make

import mustat
from mustat._functional import FunctionalModel, clone_model, eval_mode
from mustat._params import entries
from mustat.uncertainty import ESTIMATORS, FitContext, make_estimator

# wald at an untrained point needs damping beyond its negative curvature (refused without: below)
OPTIONS = {"batch-means": dict(batch_steps=2), "bootstrap": dict(B=3, epochs=1), "wald": dict(damping=100.0)}
# Kronecker factors exist for Linear and Conv layers only: the others are refused up front
REFUSED = {(e, a): "factors the weights of nn.Linear" for e in ("kfac", "ekfac") for a in ("lstm", "tied-lm", "transformer")}


def _outputs(model, X):
    with torch.no_grad(), eval_mode(model):
        return model(X)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_score_prune_finalize_save_load_bit_exact(arch, tmp_path):
    model, (X, y), _ = make(arch)
    report = mustat.prune(model, mustat.score(model, "magnitude"), sparsity=0.5)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    before = _outputs(model, X)
    path = mustat.save_sparse(model, tmp_path / "m.safetensors")
    for masks in (True, False):
        fresh, _, _ = make(arch, seed=1)
        mustat.load_sparse(path, fresh, masks=masks)
        assert torch.equal(_outputs(fresh, X), before)
        assert mustat.sparsity(fresh) == mustat.sparsity(model)
    finalized = mustat.finalize(clone_model(model))
    assert not mustat.pruning.masked_names(finalized)
    assert torch.equal(_outputs(finalized, X), before)
    # CSR kernels sum in another order: equal up to float rounding
    sparse = mustat.sparse_inference(model, min_params=1, min_sparsity=0.0)
    assert any(isinstance(m, mustat.sparse.SparseLinear) for m in sparse.modules())
    torch.testing.assert_close(_outputs(sparse, X), before, rtol=1e-5, atol=1e-6)


def test_tied_weights_are_one_tensor_pruned_together():
    model, (X, y), _ = make("tied-lm")
    table = entries(model)
    assert [s.path for s in table["emb.weight"].slots] == ["emb.weight", "head.weight"]
    # counted once, under the first name; the head's name is accepted for it
    assert mustat.PruningReport.from_model(model).names == ("emb.weight", "mix.weight")
    assert mustat.pruning.select(model, ["head.weight"]) == ["emb.weight"]
    mustat.prune(model, mustat.score(model, "random", seed=0), sparsity=0.5)
    assert torch.equal(model.emb.weight, model.head.weight)  # the embedding is pruned with the head
    expected = _outputs(model, X)
    mustat.finalize(model)
    assert model.emb.weight is model.head.weight  # still tied after finalizing
    assert torch.equal(_outputs(model, X), expected)
    with pytest.raises(ValueError, match="tied"):
        mustat.prune(model, {"emb.weight": torch.rand(11, 6), "head.weight": torch.rand(11, 6)}, sparsity=0.6)


def test_frozen_tensors_are_not_pruned_by_default_and_trajectory_estimators_refuse_them():
    model, (X, y), _ = make("frozen")
    assert mustat.pruning.select(model, None) == ["body.2.weight", "head.weight"]
    with pytest.raises(ValueError, match="frozen .requires_grad=False."):
        make_estimator("pseudo", model, params=["body.0.weight", "head.weight"])
    # an estimator that reads data can measure them: the functional view differentiates any tensor
    est = make_estimator("curvature", model, params=["body.0.weight"])
    est.fit(FitContext(X=X, y=y, loss=torch.nn.functional.cross_entropy))
    assert torch.isfinite(est.se()["body.0.weight"]).all()
    grads = mustat.loss_gradient(model, (X, y), torch.nn.functional.cross_entropy, params=["body.0.weight"])
    assert grads["body.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_works_or_refuses_clearly(arch, name):
    model, (X, y), loss = make(arch)
    mustat.prune(model, mustat.score(model, "magnitude"), sparsity=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    if (name, arch) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[name, arch]):
            make_estimator(name, model, **OPTIONS.get(name, {}))
        return
    est = make_estimator(name, model, **OPTIONS.get(name, {}))
    if est.trajectory:
        est.attach(opt)
        for _ in range(6):
            opt.zero_grad()
            loss(model(X), y).backward()
            opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # window and convergence warnings: these runs are tiny on purpose
        est.fit(FitContext(X=X, y=y, loss=loss, optimizer=opt, batch_size=8))
    se = est.se()
    assert set(se) == set(est.names)
    unidentified = est.diagnostics().get("unidentified")
    if unidentified is not None:      # the se = 0 policy: each weight that never moved is an inf, counted
        assert sum(int(torch.isinf(s).sum()) for s in se.values()) >= unidentified, name
    for n, s in se.items():
        mask = mustat._params.mask_of(model, n)
        # inf is a legitimate answer (a weight with no data gradient is unidentified); NaN is not
        assert not torch.isnan(s).any() and (s >= 0).all()
        assert torch.isfinite(s).double().mean() > (0.0 if unidentified else 0.5), (name, n)
        if mask is not None and name != "curvature":  # pruned entries are known exactly: 0
            assert (s[mask == 0] == 0).all(), (name, n)
    # the model is read, never changed (fit on trajectory estimators only reads the window)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wald_refuses_a_singular_hessian_with_its_remedies():
    model, (X, y), loss = make("resnet")
    with pytest.raises(ValueError, match="not positive definite.*damping"):
        make_estimator("wald", model).fit(FitContext(X=X, y=y, loss=loss))


def test_the_functional_view_casts_without_copying_modules():
    model, (X, y), _ = make("lstm")
    mustat.prune(model, mustat.score(model, "magnitude"), sparsity=0.5)
    fm = FunctionalModel(model, dtype=torch.float64)
    out = fm(fm.params(), X.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), model(X), rtol=1e-5, atol=1e-6)
    assert next(model.parameters()).dtype == torch.float32
    # masked entries are held at zero whatever is passed for them
    w = fm.params(["lstm.weight_ih_l0"])["lstm.weight_ih_l0"]
    changed = fm({"lstm.weight_ih_l0": torch.ones_like(w)}, X.double())
    pruned = torch.where(fm.mask("lstm.weight_ih_l0") != 0, torch.ones_like(w), torch.zeros_like(w))
    torch.testing.assert_close(changed, fm({"lstm.weight_ih_l0": pruned}, X.double()))
