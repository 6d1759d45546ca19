"""The marginal second-order estimators (fisher, block, kfac, woodfisher) against independent
float64 references: statsmodels-equal Wald SEs on GLMs, numpy inverses of the same blocks, the
exact penalised least-squares refit for the compensating update, and curvlinops' K-FAC factors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mustat
from mustat.models import GLM
from mustat.uncertainty import FitContext, ggn_diagonal, hessian_se, make_estimator
from mustat.uncertainty.marginal import LowRankBlocks

WD = 1e-3


def _logistic(n=300, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, 1] += 0.8 * X[:, 0]                                   # correlated: marginal != conditional
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(X @ torch.linspace(-1, 1, d).double())).double()
    model = GLM(d, "logistic").double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = model.nll(model(X), y) / n + WD / 2 * sum(p.square().sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    return model, X, y, (lambda o, t: model.nll(o, t) / len(t))


def _gaussian(n=200, d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, 2] += 0.9 * X[:, 0]
    y = X @ torch.ones(d, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    model = GLM(d, "linear").double()
    Xc = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    beta = torch.linalg.solve(Xc.T @ Xc + n * WD * torch.eye(d + 1, dtype=torch.float64), Xc.T @ y)
    with torch.no_grad():
        model.linear.weight.copy_(beta[:d][None])
        model.linear.bias.copy_(beta[d:])
    return model, X, y, (lambda o, t: model.nll(o, t) / len(t))


@pytest.mark.parametrize("kind", ["observed", "sandwich"])
def test_fisher_is_the_wald_se_of_a_canonical_glm(kind):
    # the GGN of a canonical-link GLM is its Hessian, so the exact marginal SE is statsmodels' Wald
    model, X, y, loss = _logistic()
    ref = hessian_se(model, lambda o, t: model.nll(o, t), (X, y), weight_decay=WD, kind=kind)
    est = make_estimator("fisher", model, kind=kind).fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    torch.testing.assert_close(est.se()["linear.weight"], ref["linear.weight"], rtol=1e-6, atol=0)
    assert est.quantity == ("saliency" if kind == "observed" else "sampling")


@pytest.mark.parametrize("kind", ["observed", "sandwich"])
def test_kfac_is_exact_for_a_linear_gaussian_layer(kind):
    # one output with Lambda = 1: B (x) A is sum_i a_i a_i^T exactly, bias marginalised as in Wald
    model, X, y, loss = _gaussian()
    ref = hessian_se(model, lambda o, t: model.nll(o, t), (X, y), weight_decay=WD, kind=kind)
    for name in ("kfac", "fisher"):
        est = make_estimator(name, model, kind=kind).fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD))
        torch.testing.assert_close(est.se()["linear.weight"], ref["linear.weight"], rtol=1e-8, atol=0)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def test_fisher_matches_a_numpy_gauss_newton_on_a_hidden_layer():
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    params = dict(model.named_parameters())
    names = list(params)
    sizes = [p.numel() for p in params.values()]

    def out(*flat):
        vals = {n: t.view_as(params[n]) for n, t in zip(names, flat)}
        return torch.func.functional_call(model, vals, (X,))

    jac = torch.autograd.functional.jacobian(out, tuple(p.detach().reshape(-1) for p in params.values()))
    J = np.concatenate([j.numpy().reshape(40, 3, s) for j, s in zip(jac, sizes)], 2)   # (n, C, P)
    p = torch.softmax(model(X), 1).detach().numpy()
    G = sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(40))
    Hinv = np.linalg.inv(G + 40 * WD * np.eye(G.shape[0]))
    est = make_estimator("fisher", model).fit(FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=WD))
    var = np.sqrt(np.diag(Hinv))
    np.testing.assert_allclose(est.se()["0.weight"].numpy().ravel(), var[:35], rtol=1e-8)
    np.testing.assert_allclose(est.se()["2.weight"].numpy().ravel(), var[42:63], rtol=1e-8)


def test_low_rank_blocks_direct_and_woodbury_equal_numpy():
    g = torch.Generator().manual_seed(3)
    U = torch.randn(6, 20, generator=g, dtype=torch.float64)
    c, d = 2.5, 0.7
    for bs in (4, 7, 20):                      # direct (<= m rows), then Woodbury, uneven tail
        blocks = LowRankBlocks(U, c, d, bs)
        ref_diag, ref_sol = [], []
        V = torch.randn(3, 20, generator=g, dtype=torch.float64)
        for s in range(0, 20, bs):
            Ub = U[:, s:s + bs].numpy()
            Hi = np.linalg.inv(c * Ub.T @ Ub + d * np.eye(Ub.shape[1]))
            ref_diag.append(np.diag(Hi))
            ref_sol.append(V[:, s:s + bs].numpy() @ Hi)
        np.testing.assert_allclose(blocks.inverse_diagonal().numpy(), np.concatenate(ref_diag), rtol=1e-10)
        np.testing.assert_allclose(blocks.solve(V).numpy(), np.concatenate(ref_sol, 1), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="singular without a penalty.*damping"):
        LowRankBlocks(U, c, 0.0, 20)


def test_block_is_the_inverse_of_the_penalised_empirical_fisher():
    model, X, y, loss = _logistic()
    n = len(y)
    est = make_estimator("block", model, samples=n, block_size=None).fit(FitContext(X=X, y=y, loss=loss,
                                                                                    weight_decay=WD))
    Xc = X.numpy()
    r = (torch.sigmoid(model(X)) - y).detach().numpy()               # per-sample d loss / d logit
    Gs = r[:, None] * Xc
    Hinv = np.linalg.inv(Gs.T @ Gs + n * WD * np.eye(Xc.shape[1]))
    np.testing.assert_allclose(est.se()["linear.weight"].numpy().ravel(), np.sqrt(np.diag(Hinv)), rtol=1e-8)
    # a subsample of m rows is scaled to n: (n / m) sum over the rows
    sub = make_estimator("block", model, samples=100, block_size=None, seed=4).fit(
        FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(4))[:100].numpy()
    Hs = np.linalg.inv(n / 100 * Gs[idx].T @ Gs[idx] + n * WD * np.eye(Xc.shape[1]))
    np.testing.assert_allclose(sub.se()["linear.weight"].numpy().ravel(), np.sqrt(np.diag(Hs)), rtol=1e-8)


def test_woodfisher_corrects_minibatch_gradients_for_the_batch_size():
    model, X, y, loss = _logistic(d=3)
    est = make_estimator("woodfisher", model, gradients=5, block_size=None)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(1, 3, generator=g, dtype=torch.float64) for _ in range(7)]
    for gr in grads:                         # 7 steps into a ring of 5: the last 5 are kept
        model.linear.weight.grad = gr.clone()
        est.update()
    n, B = 300, 16
    est.fit(FitContext(n=n, batch_size=B, weight_decay=WD))
    G = torch.cat(grads[2:]).numpy()
    F_per_sample = B * np.cov(G.T, ddof=1) + np.outer(G.mean(0), G.mean(0))
    Hinv = np.linalg.inv(n * F_per_sample + n * WD * np.eye(3))
    np.testing.assert_allclose(est.se()["linear.weight"].double().numpy().ravel(), np.sqrt(np.diag(Hinv)),
                               rtol=1e-5)
    state = est.state_dict()
    again = make_estimator("woodfisher", model, gradients=5, block_size=None)
    again.load_state_dict(state)
    again.fit(FitContext(n=n, batch_size=B, weight_decay=WD))
    torch.testing.assert_close(again.se()["linear.weight"], est.se()["linear.weight"])


@pytest.mark.parametrize("name", ["fisher", "kfac"])
def test_the_compensating_update_is_the_constrained_refit(name):
    # the loss is quadratic (Gaussian, bias held), so OBS's update is exactly the penalised
    # least-squares refit with the pruned weights fixed at 0
    model, X, y, loss = _gaussian(d=6)
    n = len(y)
    est = make_estimator(name, model).fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    w0 = model.linear.weight.detach().clone()
    b = model.linear.bias.detach().clone()
    scores = {"linear.weight": torch.tensor([[5.0, 0.0, 4.0, 1.0, 3.0, 2.0]])}
    mustat.prune(model, scores, sparsity=0.5, update=est)
    keep = np.array([True, False, True, False, True, False])
    Xk = X.numpy()[:, keep]
    r = y.numpy() - b.numpy()
    ref = np.linalg.solve(Xk.T @ Xk + n * WD * np.eye(keep.sum()), Xk.T @ r)
    w = model.linear.weight.detach().numpy().ravel()
    np.testing.assert_allclose(w[keep], ref, rtol=1e-8)
    assert (w[~keep] == 0).all() and not np.allclose(w[keep], w0.numpy().ravel()[keep])
    with pytest.raises(mustat.uncertainty.NotFittedError, match="fit"):
        est.obs_update()                     # the curvature has moved: refit first


def _dense_empirical_fisher(model, X, y, name):
    """``sum_i g_i g_i^T`` of the per-sample data-loss gradients of ``name``, by ``torch.func`` (vmap of
    grad of one sample's ``nll``), with no part of any estimator: the block estimator's curvature with
    ``samples = n`` before its penalty."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(w, x, t):
        out = functional_call(model, {**params, name: w}, (x[None],))
        return model.nll(out, t[None])

    G = vmap(grad(one), in_dims=(None, 0, 0))(params[name], X, y).reshape(len(y), -1)
    return G.T @ G


def test_block_update_equals_obs_on_a_dense_empirical_fisher():
    """OBS in blocks of 2 against the documented H_b = (n/m) sum g g^T + n (lambda + delta) I, built
    from torch.func per-sample gradients (m = n) and cut into the same blocks: the kept weight of
    each block moves by -w_q [H_b^-1]_kq / [H_b^-1]_qq."""
    model, X, y, loss = _logistic(d=4)
    n, damping = len(y), 1e-2
    est = make_estimator("block", model, samples=n, block_size=2, damping=damping).fit(
        FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    H = _dense_empirical_fisher(model, X, y, "linear.weight") + n * (WD + damping) * torch.eye(4, dtype=torch.float64)
    w0 = model.linear.weight.detach().clone().reshape(-1)
    mustat.prune(model, {"linear.weight": torch.tensor([[1.0, 4.0, 3.0, 2.0]])}, sparsity=0.5, update=est)
    w = model.linear.weight.detach().reshape(-1)
    for s, (k, q) in ((0, (1, 0)), (2, (2, 3))):   # block {0,1}: 0 cut; block {2,3}: 3 cut
        Hinv = torch.linalg.inv(H[s:s + 2, s:s + 2])
        kk, qq = k - s, q - s
        assert w[k].item() == pytest.approx(w0[k].item() - w0[q].item() * (Hinv[kk, qq] / Hinv[qq, qq]).item(),
                                            rel=1e-10)
        assert w[q].item() == 0
    assert (w[[1, 2]] - w0[[1, 2]]).abs().min() > 1e-3      # the update is not a no-op


def _kronecker_curvature(model, X, layer):
    """K-FAC's ``B (x) A`` for ``model[layer]`` (a Linear, its bias the weight's last column) under
    cross-entropy, from the definition in :mod:`mustat.uncertainty.kfac` and with no part of any
    estimator: ``A`` the mean over the n samples of ``[a_i; 1][a_i; 1]^T`` (``a_i`` the layer's input,
    computed by the layers before it), ``B`` the sum over the samples of ``J_i^T Lambda_i J_i``
    (``J_i`` the Jacobian of the logits in the layer's output, by ``torch.func``; ``Lambda_i =
    diag(p_i) - p_i p_i^T`` cross-entropy's Hessian in the logits, written out in numpy)."""
    from torch.func import jacrev, vmap

    head = model[layer + 1:]
    with torch.no_grad():
        a = model[:layer](X)
        s = model[layer](a)
        J = vmap(jacrev(lambda v: head(v[None])[0]))(s).numpy()               # (n, C, out)
        p = torch.softmax(head(s), 1).numpy()
    Lam = np.stack([np.diag(q) - np.outer(q, q) for q in p])                   # (n, C, C)
    B = np.einsum("ico,icd,idp->op", J, Lam, J)
    a1 = np.hstack([a.numpy(), np.ones((len(X), 1))])
    A = a1.T @ a1 / len(X)
    return np.kron(B, A)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("block", ["layer", "row"])
def test_kfac_update_equals_obs_on_an_independent_kronecker_curvature(block, layer):
    """K-FAC's compensating update against the documented ``H = B (x) A + n (lambda + delta) I``
    (:func:`_kronecker_curvature`), its bias columns held fixed: with ``obs_block='layer'`` the kept
    weights K of the layer move by ``H_KK^-1 H_KQ w_Q`` (the cut ones Q go to 0), with ``'row'`` each
    output row o does so on its diagonal block ``B_oo A + n (lambda + delta) I``. A factor 2 on the
    curvature, or the damping without its n, fails this."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    n, damping = len(y), 1e-2
    H = _kronecker_curvature(model, X, layer)
    out, inp = model[layer].weight.shape
    d = n * (WD + damping)
    est = make_estimator("kfac", model, obs_block=block, damping=damping).fit(
        FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=WD))
    w0 = model[layer].weight.detach().numpy().copy()
    mustat.prune(model, mustat.score(model, "obs", se=est.se()), sparsity=0.5, update=est)
    w = model[layer].weight.detach().numpy()
    cut = (w == 0) & (w0 != 0)
    assert cut.any() and (~cut).any() and cut.any(1).sum() > 1
    delta = (w - w0).reshape(-1)
    weights = np.arange(out * (inp + 1)).reshape(out, inp + 1)[:, :inp].reshape(-1)  # the bias columns left out
    Hw = H[np.ix_(weights, weights)] + d * np.eye(out * inp)
    if block == "layer":
        K, Q = np.flatnonzero(~cut.reshape(-1)), np.flatnonzero(cut.reshape(-1))
        ref = np.linalg.solve(Hw[np.ix_(K, K)], Hw[np.ix_(K, Q)] @ w0.reshape(-1)[Q])
        np.testing.assert_allclose(delta[K], ref, rtol=1e-7, atol=1e-10)
    else:
        for o in range(out):
            rows = np.arange(inp * o, inp * (o + 1))
            c, k = cut[o], ~cut[o]
            Hoo = Hw[np.ix_(rows, rows)]
            ref = np.linalg.solve(Hoo[np.ix_(k, k)], Hoo[np.ix_(k, c)] @ w0[o][c]) if c.any() else 0.0
            np.testing.assert_allclose(delta[rows][k], ref, rtol=1e-8, atol=1e-12)
    assert (w[cut] == 0).all() and np.abs(delta[~cut.reshape(-1)]).max() > 1e-3   # the update is not a no-op


def test_memory_is_checked_before_any_allocation():
    model, X, y, loss = _logistic()
    est = make_estimator("block", model, max_memory=1000)
    with pytest.raises(ValueError, match="needs about .* GiB.*more than max_memory.*lower samples="):
        est.fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    with pytest.raises(ValueError, match="keeps 64 gradients.*lower gradients="):
        make_estimator("woodfisher", model, max_memory=10)
    with pytest.raises(ValueError, match="max_params=4"):
        make_estimator("fisher", model, max_params=4)
    with pytest.raises(ValueError, match="kind='robust' is not valid; choose one of: observed, sandwich"):
        make_estimator("woodfisher", model, kind="robust")


def test_an_unpenalised_singular_block_offers_damping():
    model, X, y, loss = _logistic()
    X2 = torch.cat([X, X[:, :1]], 1)          # a duplicated feature: no curvature along w_0 - w_4
    m2 = GLM(5, "logistic").double()
    with pytest.raises(ValueError, match="not positive definite.*damping"):
        make_estimator("fisher", m2).fit(FitContext(X=X2, y=y, loss=lambda o, t: m2.nll(o, t) / len(t)))
    est = make_estimator("fisher", m2, damping=1e-3).fit(FitContext(X=X2, y=y, loss=lambda o, t: m2.nll(o, t) / len(t)))
    assert torch.isfinite(est.se()["linear.weight"]).all()


def test_obs_needs_a_marginal_estimator_and_lamp_matches_its_definition():
    from mustat.config import expand
    with pytest.raises(ValueError, match="does not have .*; use one of block, ekfac, fisher, kfac, woodfisher"):
        expand(["obs"], ["curvature"])
    w = torch.tensor([[0.5, -2.0, 1.0], [0.1, 3.0, -0.2]], dtype=torch.float64)
    s = mustat.criteria.lamp(w)
    sq = np.sort(w.numpy().ravel() ** 2)
    for v, out in zip(w.numpy().ravel(), s.numpy().ravel()):
        assert out == pytest.approx(v**2 / sq[sq >= v**2].sum(), rel=1e-12)
    assert s.max() == 1.0


def test_the_softmax_factor_is_exact_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    X, y = torch.randn(64, 8) * 3, torch.randint(0, 10, (64,))
    names = ["0.weight", "2.weight"]
    d32 = ggn_diagonal(model, F.cross_entropy, (X, y), names=names)
    d64 = ggn_diagonal(model.double(), F.cross_entropy, (X.double(), y), names=names)
    for n in names:
        rel = ((d32[n].double() - d64[n]).abs() / d64[n].abs().clamp_min(1e-12)).max()
        assert rel < 2e-5, (n, float(rel))


def test_trajectory_estimators_flag_weights_that_never_moved():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    X = torch.randn(64, 3)
    X[:, 1] = 0                                   # no gradient ever reaches column 1
    y = torch.randint(0, 2, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    est = make_estimator("pseudo", model)
    est.attach(opt)
    for i in range(20):
        opt.zero_grad()
        F.cross_entropy(model(X[i::20]), y[i::20]).backward()
        opt.step()
    se = est.se()["0.weight"]
    assert torch.isinf(se[:, 1]).all() and torch.isfinite(se[:, [0, 2]]).all()
    assert est.diagnostics()["unidentified"] == 2
    z = mustat.score(model, "mu", se=est.se())["0.weight"]
    assert (z[:, 1] == 0).all()                   # pruned first, not kept as infinitely significant


def test_the_wald_summary_says_what_the_se_is():
    model, X, y, loss = _logistic()
    est = make_estimator("kfac", model).fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    text = str(mustat.wald(model, est.se(), quantity=est.quantity).summary())
    assert "SALIENCY" in text
    with pytest.raises(ValueError, match="quantity"):
        mustat.wald(model, est.se(), quantity="posterior")


def test_the_report_says_which_estimators_are_saliencies():
    from validation.report import quantity_of
    assert [quantity_of(x) for x in ("pseudo", "batch-means", "curvature", "wald", "kfac", "teacher")] == \
        ["sampling", "sampling", "saliency", "saliency", "saliency", "reference"]


def test_the_study_fits_marginal_estimators_on_each_replicate_apart():
    from validation.designs import get_design
    from validation.estimators import Setting, fit_replicates, per_replicate

    assert per_replicate("kfac-sandwich") and per_replicate("fisher") and not per_replicate("woodfisher-row")
    design = get_design("logistic")
    stack = design.stacked_model([3, 4])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, stack.linear.in_features, generator=g)
    y = (torch.rand(200, 2, generator=g) < 0.4).float()
    out = fit_replicates(stack, lambda: design.model(0), design.loss(), X, y, Setting(weight_decay=1e-3),
                         ("fisher",))
    se = out["fisher"][1]["linear.weight"]
    assert se.shape == stack.linear.weight.shape
    for r in range(2):
        glm = GLM(stack.linear.in_features, "logistic")
        with torch.no_grad():
            glm.linear.weight.copy_(stack.linear.weight[r][None])
            glm.linear.bias.copy_(stack.linear.bias[r:r + 1])
        ref = hessian_se(glm, lambda o, t, m=glm: m.nll(o, t), (X[:, r], y[:, r]), weight_decay=1e-3)
        torch.testing.assert_close(se[r], ref["linear.weight"][0].float(), rtol=1e-5, atol=0)


class _SequenceHead(nn.Module):
    """A Linear layer applied at every position of a sequence, summed: K-FAC's T positions."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).sum(1)


def test_kfac_factors_of_a_linear_layer_on_sequences():
    torch.manual_seed(0)
    model = _SequenceHead().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    est = make_estimator("kfac", model).fit(FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=WD))
    *_, A, B = est._factors["lin.weight"]
    Xa = np.concatenate([X.numpy(), np.ones((30, 5, 1))], 2).reshape(-1, 5)
    p = torch.softmax(model(X), 1).detach().numpy()
    lam = sum(np.diag(q) - np.outer(q, q) for q in p)
    np.testing.assert_allclose(A.numpy(), Xa.T @ Xa / 150, rtol=1e-12)
    np.testing.assert_allclose(B.numpy(), 5 * lam, rtol=1e-10, atol=1e-12)   # every position's b is L_ic


def test_a_failed_update_changes_nothing_and_a_failed_refit_serves_nothing():
    model, X, y, loss = _gaussian(d=6)
    est = make_estimator("kfac", model)
    before = model.linear.weight.detach().clone()
    scores = {"linear.weight": torch.arange(6.0)[None]}
    with pytest.raises(mustat.uncertainty.NotFittedError, match="needs fit"):
        mustat.prune(model, scores, sparsity=0.5, update=est)
    assert mustat.pruning.mask_of(model, "linear.weight") is None and torch.equal(model.linear.weight, before)
    est.fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    with pytest.raises(ValueError, match="kind='observed'"):
        sandwich = make_estimator("kfac", model, kind="sandwich").fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD))
        mustat.prune(model, scores, sparsity=0.5, update=sandwich)
    assert mustat.pruning.mask_of(model, "linear.weight") is None
    with pytest.raises(ValueError, match="without curvature.*damping"):
        est.fit(FitContext(X=torch.zeros_like(X), y=y, loss=loss))   # constant inputs, no penalty
    with pytest.raises(mustat.uncertainty.NotFittedError):
        est.se()


def test_kfac_sandwich_takes_a_masked_bias():
    model, X, y, loss = _gaussian()
    torch.nn.utils.prune.l1_unstructured(model.linear, "bias", amount=0.0)   # a torch-pruned bias
    est = make_estimator("kfac", model, kind="sandwich", params=["linear.weight"]).fit(
        FitContext(X=X, y=y, loss=loss, weight_decay=WD))
    ref = hessian_se(model, lambda o, t: model.nll(o, t), (X, y), weight_decay=WD, kind="sandwich")
    torch.testing.assert_close(est.se()["linear.weight"], ref["linear.weight"], rtol=1e-8, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_marginal_estimators_fit_a_model_on_cuda():
    model, X, y, loss = _logistic()
    ref = make_estimator("kfac", model).fit(FitContext(X=X, y=y, loss=loss, weight_decay=WD)).se()["linear.weight"]
    model.cuda()
    for name in ("kfac", "fisher", "block"):
        est = make_estimator(name, model).fit(FitContext(X=X.cuda(), y=y.cuda(), loss=loss, weight_decay=WD))
        assert est.se()["linear.weight"].device.type == "cuda"
    torch.testing.assert_close(make_estimator("kfac", model).fit(FitContext(X=X.cuda(), y=y.cuda(), loss=loss,
                               weight_decay=WD)).se()["linear.weight"].cpu(), ref)


@pytest.mark.parametrize("block_size", [None, "row"])
def test_woodfisher_sandwich_from_the_buffer(block_size):
    # numpy: bread n(B S + g g^T) + n lambda I, meat n(B S + r r^T) with r = g_bar + lambda theta
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    est = make_estimator("woodfisher", model, gradients=6, block_size=block_size, kind="sandwich")
    obs = make_estimator("woodfisher", model, gradients=6, block_size=block_size)
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(6)]
    for gr in grads:
        model.weight.grad = gr.clone()
        est.update()
        obs.update()
    n, B = 200, 8
    G = torch.stack(grads).reshape(6, -1).float().double().numpy()     # the buffer keeps float32
    theta = model.weight.detach().numpy().ravel()
    spread = (G - G.mean(0)) * np.sqrt(B / 5)
    blocks = [np.arange(6)] if block_size is None else [np.arange(3), np.arange(3, 6)]
    for wd in (WD, 0.0):
        U = np.vstack([spread, G.mean(0)])
        V = np.vstack([spread, G.mean(0) + wd * theta])
        ref = np.empty(6)
        for b in blocks:
            H = n * U[:, b].T @ U[:, b] + n * wd * np.eye(len(b)) + (n * 1e-3 * np.eye(len(b)) if wd == 0 else 0)
            Hinv = np.linalg.inv(H)
            ref[b] = np.diag(Hinv @ (n * V[:, b].T @ V[:, b]) @ Hinv)
        ctx = FitContext(n=n, batch_size=B, weight_decay=wd)
        damping = 1e-3 if wd == 0 else 0.0
        est.damping = obs.damping = damping
        np.testing.assert_allclose(est.fit(ctx).se()["weight"].numpy().ravel() ** 2, ref, rtol=1e-10)
        assert est.quantity == "sampling"
        if wd > 0:      # the penalty shrinks the sampling variance below the inverse curvature
            assert (est.se()["weight"] < obs.fit(ctx).se()["weight"]).all()
