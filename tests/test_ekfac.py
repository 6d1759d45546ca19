"""EK-FAC against a dense float64 GGN, and the whole-layer K-FAC update against a dense
constrained least-squares solve of the same curvature."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import mustat
from mustat.uncertainty import FitContext, make_estimator

WD = 1e-3


def _nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)).double()
    g = torch.Generator().manual_seed(1)
    return [(mlp, "0", torch.randn(40, 5, generator=g, dtype=torch.float64)),
            (mlp, "2", torch.randn(40, 5, generator=g, dtype=torch.float64)),
            (cnn, "0", torch.randn(40, 2, 5, 5, generator=g, dtype=torch.float64))]


def _layer_ggn(model, layer, X, y):
    """The exact GGN block of the summed cross-entropy for one layer's weight with its bias as
    the last column, in the order of ``cat([W.reshape(out, -1), b[:, None]], 1).reshape(-1)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    w, b = params[f"{layer}.weight"], params[f"{layer}.bias"]
    out = w.shape[0]

    def f(wb, x):
        W = wb[:, :-1].reshape(w.shape)
        return functional_call(model, {**params, f"{layer}.weight": W, f"{layer}.bias": wb[:, -1]}, (x[None],))[0]

    wb = torch.cat([w.detach().reshape(out, -1), b.detach()[:, None]], 1)
    G = torch.zeros(wb.numel(), wb.numel(), dtype=torch.float64)
    for x in X:
        J = jacrev(f)(wb, x).reshape(-1, wb.numel())               # (C, P)
        p = torch.softmax(f(wb, x), 0).detach()
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return G.numpy()


@pytest.mark.parametrize("index", [0, 1, 2])
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_basis(index):
    model, layer, X = _nets()[index]
    y = torch.randint(0, 3, (len(X),), generator=torch.Generator().manual_seed(2))
    ctx = FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=WD)
    ek = make_estimator("ekfac", model).fit(ctx)
    k = make_estimator("kfac", model).fit(ctx)
    name = f"{layer}.weight"
    QA, QB, denom, A, B = (t.numpy() for t in ek._factors[name])
    G = _layer_ggn(model, layer, X, y)
    Q = np.kron(QB, QA)
    np.testing.assert_allclose(ek._eigen[name].numpy().reshape(-1), np.diag(Q.T @ G @ Q), rtol=1e-9, atol=1e-12)
    # George et al.'s Prop. 1: the corrected eigenvalues are the Frobenius-nearest in this basis
    ekfac_err = np.linalg.norm(G - Q @ np.diag(ek._eigen[name].numpy().reshape(-1)) @ Q.T)
    kfac_err = np.linalg.norm(G - np.kron(B, A))
    assert ekfac_err < kfac_err
    # the same basis as K-FAC, and K-FAC's eigenvalues are its factors' products
    torch.testing.assert_close(ek._factors[name][0], k._factors[name][0])
    # se = sqrt(diag((Q diag(s) Q^T + n lambda I)^-1)) on the weight columns, the bias marginalised
    H = Q @ np.diag(ek._eigen[name].numpy().reshape(-1)) @ Q.T + len(X) * WD * np.eye(len(Q))
    var = np.diag(np.linalg.inv(H)).reshape(QB.shape[0], -1)[:, :-1]
    np.testing.assert_allclose(ek.se()[name].reshape(len(var), -1).numpy() ** 2, var, rtol=1e-9)


def test_ekfac_equals_kfac_where_kfac_is_exact():
    # one output and a Gaussian likelihood: the GGN is B (x) A exactly, so the corrections vanish
    g = torch.Generator().manual_seed(3)
    X = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64) + torch.randn(60, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    ctx = FitContext(X=X, y=y[:, None], loss=F.mse_loss, weight_decay=WD)
    torch.testing.assert_close(make_estimator("ekfac", model).fit(ctx).se()["weight"],
                               make_estimator("kfac", model).fit(ctx).se()["weight"], rtol=1e-10, atol=0)


def _dense_curvature(est, name, n):
    """The layer's damped curvature from its Kronecker basis and eigenvalues (both checked against
    references above: curvlinops' factors, the dense GGN's diagonal in the basis); the ridge is
    the penalty's ``n * weight_decay``, written here rather than read from the estimator."""
    QA, QB = (t.numpy() for t in est._factors[name][:2])
    Q = np.kron(QB, QA)
    return Q @ np.diag(est._eigen[name].numpy().reshape(-1)) @ Q.T + n * WD * np.eye(len(Q))


@pytest.mark.parametrize("se", ["kfac", "ekfac"])
def test_the_layer_update_is_the_constrained_optimum_of_the_layer_curvature(se):
    model, _, X = _nets()[0]
    y = torch.randint(0, 3, (len(X),), generator=torch.Generator().manual_seed(2))
    ctx = FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=WD)
    name = "0.weight"
    quad = {}
    for block in ("row", "layer", None):
        copy = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        copy.load_state_dict(model.state_dict())
        est = make_estimator(se, copy, obs_block=block or "row").fit(ctx)
        H = _dense_curvature(est, name, len(X))
        w = copy[0].weight.detach().clone()
        scores = mustat.score(copy, "obs", se=est.se())
        mustat.prune(copy, scores, sparsity=0.5, update=est if block else None)
        new = copy[0].weight.detach()
        cut = (new == 0) & (w != 0)
        # the bias column is held fixed: the update's system is H over the weight columns
        idx = np.arange(H.shape[0]).reshape(6, 6)[:, :5].reshape(-1)
        Hw = H[np.ix_(idx, idx)]
        delta = (new - w).numpy().reshape(-1)
        quad[block] = float(delta @ Hw @ delta)
        if block == "layer":
            K = np.flatnonzero(~cut.numpy().reshape(-1))
            Q = np.flatnonzero(cut.numpy().reshape(-1))
            ref = np.linalg.solve(Hw[np.ix_(K, K)], Hw[np.ix_(K, Q)] @ w.numpy().reshape(-1)[Q])
            np.testing.assert_allclose(delta[K], ref, rtol=1e-7, atol=1e-10)
            iters, residual = est.diagnostics()["cg"][name]
            assert residual <= 1e-10 and iters >= 1
        if block == "row":      # each output row on its own: the diagonal blocks of the same matrix
            for o in range(6):
                rows = np.arange(5 * o, 5 * o + 5)
                c, k = cut[o].numpy(), ~cut[o].numpy()
                if c.any():
                    Hoo = Hw[np.ix_(rows, rows)]
                    ref = np.linalg.solve(Hoo[np.ix_(k, k)], Hoo[np.ix_(k, c)] @ w[o].numpy()[c])
                    np.testing.assert_allclose(delta[rows][k], ref, rtol=1e-8, atol=1e-12)
    # the whole layer's optimum beats both; the row update, which drops the cross-row terms, is here
    # worse than no update on the whole layer's curvature (REPRODUCTION section 4 cites this case)
    assert quad["layer"] < quad["row"] and quad["layer"] < quad[None]
    if se == "kfac":
        assert quad["row"] > quad[None]


@pytest.mark.parametrize("se", ["kfac", "ekfac"])
def test_the_layer_update_leaves_weights_pruned_before_the_fit_out(se):
    # a second step of a gradual prune: entries masked before fit() are neither kept nor cut
    model, _, X = _nets()[0]
    y = torch.randint(0, 3, (len(X),), generator=torch.Generator().manual_seed(2))
    ctx = FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=WD)
    first = make_estimator(se, model).fit(ctx)
    mustat.prune(model, mustat.score(model, "obs", se=first.se()), sparsity=0.3)
    before = model[0].weight.detach().clone()
    est = make_estimator(se, model, obs_block="layer").fit(ctx)
    H = _dense_curvature(est, "0.weight", len(X))
    mustat.prune(model, mustat.score(model, "obs", se=est.se()), sparsity=0.6, update=est)
    after = model[0].weight.detach()
    old, cut = (before == 0).numpy().reshape(-1), ((after == 0) & (before != 0)).numpy().reshape(-1)
    assert old.any() and cut.any()
    idx = np.arange(H.shape[0]).reshape(6, 6)[:, :5].reshape(-1)
    Hw = H[np.ix_(idx, idx)]
    K, Q = np.flatnonzero(~old & ~cut), np.flatnonzero(cut)
    ref = np.linalg.solve(Hw[np.ix_(K, K)], Hw[np.ix_(K, Q)] @ before.numpy().reshape(-1)[Q])
    delta = (after - before).numpy().reshape(-1)
    np.testing.assert_allclose(delta[K], ref, rtol=1e-7, atol=1e-10)
    assert (after.numpy().reshape(-1)[old] == 0).all()


def test_the_layer_update_warns_when_its_iterations_run_out():
    model, _, X = _nets()[0]
    y = torch.randint(0, 3, (len(X),), generator=torch.Generator().manual_seed(2))
    est = make_estimator("kfac", model, obs_block="layer", cg_max_iter=1).fit(
        FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=WD))
    scores = mustat.score(model, "obs", se=est.se())
    with pytest.warns(RuntimeWarning, match="stopped after 1 conjugate-gradient iterations"):
        mustat.prune(model, scores, sparsity=0.5, update=est)


@pytest.mark.parametrize("kwargs, message", [
    ({"obs_block": "column"}, "obs_block='column' is not valid; choose one of: row, layer"),
    ({"cg_tol": 0.0}, "cg_tol"),
    ({"cg_tol": float("inf")}, "cg_tol"),
    ({"cg_max_iter": 0}, "cg_max_iter"),
])
def test_bad_update_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_estimator("ekfac", nn.Linear(3, 2), **kwargs)


def test_variants_resolve():
    from mustat.uncertainty import variant
    assert variant("ekfac-layer") == ("ekfac", {"obs_block": "layer"})
    assert variant("kfac-layer") == ("kfac", {"obs_block": "layer"})
    assert variant("ekfac-sandwich") == ("ekfac", {"kind": "sandwich"})
    assert variant("kfac-damped") == ("kfac", {"damping": 1e-4})
    assert variant("woodfisher-damped") == ("woodfisher", {"damping": 1e-4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_estimator("ekfac", nn.Linear(3, 2)).quantity == "saliency"


def test_the_pipeline_takes_a_variant(tmp_path, monkeypatch):
    # obs[kfac-layer] through `mustat prune`: the variant's options reach the estimator
    import pandas as pd

    from mustat.cli import main
    from mustat.config import expand
    from mustat.uncertainty import KFAC
    assert expand(["obs[kfac-layer]", "mu"], ["ekfac-layer"]) == [("obs", "kfac-layer"), ("mu", "ekfac-layer")]
    for sandwich in ("kfac-sandwich", "ekfac-sandwich", "woodfisher-row-sandwich"):
        with pytest.raises(ValueError, match="needs the curvature H, not a sandwich"):
            expand([f"obs[{sandwich}]"], [])
    calls = []
    layer_solve = KFAC._layer_solve
    monkeypatch.setattr(KFAC, "_layer_solve", lambda self, *a: calls.append(1) or layer_solve(self, *a))
    out = tmp_path / "run"
    assert main(["prune", "--out", str(out), "--dataset", "digits", "--model", "mlp", "--epochs", "2",
                 "--criteria", "obs[kfac-layer],magnitude", "--target-sparsity", "0.8", "--rounds", "2",
                 "--retrain-epochs", "1", "--track-epochs", "1", "--seeds", "0", "--weight-decay", "1e-3", "--quiet"]) == 0
    df = pd.read_csv(out / "results.csv")
    assert set(df[df.criterion == "obs"].se) == {"kfac-layer"}
    assert calls, "the variant's obs_block='layer' did not reach the estimator"
    assert df[df.criterion == "obs"].sparsity.max() == pytest.approx(0.8, abs=1e-3)
