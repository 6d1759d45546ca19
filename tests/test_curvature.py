"""The curvature estimator: diagonal Gauss-Newton (expected Fisher) plus the penalty,
against closed forms in numpy float64 and an explicit Jacobian computation."""

import re
import warnings

import numpy as np
import pytest
import torch
from architectures import log_softmax_pair
from torch import nn
from torch.func import functional_call, jacrev

import mustat
from mustat.data import glm_design
from mustat.models import GLM
from mustat.uncertainty import (
    DegenerateSEWarning,
    Estimator,
    FitContext,
    ggn_diagonal,
    make_estimator,
)
from validation.glm import fit_glm


def _glm(family, seed=0, n=500):
    X, y, _ = glm_design(family, n=n, coef=(1.0, -0.5, 0.0, 0.25), scales=(0.5, 1, 2, 1), corr=0.5, seed=seed)
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GLM(4, family).double()
    return model, X, y, Xt, yt


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("family", ["logistic", "linear"])
def test_glm_closed_form(family, wd):
    model, X, y, Xt, yt = _glm(family)
    est = make_estimator("curvature", model, params=["linear.weight", "linear.bias"])
    est.fit(FitContext(X=Xt, y=yt, loss=lambda o, t: model.nll(o, t) / len(t), weight_decay=wd))
    w = model.linear.weight.detach().numpy().ravel()
    b = float(model.linear.bias.detach())
    eta = X @ w + b
    weights = np.ones(len(X)) if family == "linear" else (p := 1 / (1 + np.exp(-eta))) * (1 - p)
    Xc = np.c_[X, np.ones(len(X))]
    diag = (weights[:, None] * Xc**2).sum(0) + len(X) * wd
    se = est.se()
    np.testing.assert_allclose(se["linear.weight"].numpy().ravel(), 1 / np.sqrt(diag[:4]), rtol=1e-10)
    np.testing.assert_allclose(se["linear.bias"].numpy().ravel(), 1 / np.sqrt(diag[4:]), rtol=1e-10)


def test_at_the_mle_it_is_the_wald_se_over_sqrt_vif():
    """For a canonical-link GLM the GGN is the observed information H, so the curvature SE is
    1/sqrt(H_jj) and its ratio to the Wald SE sqrt((H^-1)_jj) is 1/sqrt(VIF_j) exactly."""
    model, X, y, Xt, yt = _glm("logistic", seed=1, n=2000)
    fit = fit_glm(model, Xt, yt)
    est = make_estimator("curvature", fit).fit(FitContext(X=Xt, y=yt, loss=lambda o, t: fit.nll(o, t) / len(t)))
    wald = mustat.hessian_se(fit, fit.nll, (Xt, yt))["linear.weight"].numpy().ravel()
    w, b = fit.linear.weight.detach().numpy().ravel(), float(fit.linear.bias.detach())
    p = 1 / (1 + np.exp(-(X @ w + b)))
    Xc = np.c_[np.ones(len(X)), X]
    H = (Xc * (p * (1 - p))[:, None]).T @ Xc
    vif = (np.diag(H) * np.diag(np.linalg.inv(H)))[1:]
    ratio = est.se()["linear.weight"].numpy().ravel() / wald
    np.testing.assert_allclose(ratio, 1 / np.sqrt(vif), rtol=1e-8)
    assert ratio.min() < 0.95  # correlated features: the diagonal SE is visibly too small


def test_softmax_mlp_against_explicit_jacobians():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    names = ["0.weight", "2.weight", "2.bias"]
    diag = ggn_diagonal(model, nn.functional.cross_entropy, (X, y), names=names, chunk_elements=200)  # several chunks
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = {n: torch.zeros_like(params[n]) for n in names}
    for xi in X:
        def f(p, xi=xi):
            return functional_call(model, {**params, **p}, (xi[None],))[0]
        J = jacrev(f)({n: params[n] for n in names})         # each (3, *shape)
        prob = torch.softmax(f({}), 0)
        lam = torch.diag(prob) - torch.outer(prob, prob)     # softmax cross-entropy's output Hessian
        for n in names:
            Jn = J[n].reshape(3, -1)
            ref[n] += torch.einsum("ap,ab,bp->p", Jn, lam, Jn).reshape(ref[n].shape)
    for n in names:
        torch.testing.assert_close(diag[n], ref[n], rtol=1e-10, atol=1e-12)
    # the expected Fisher, not the empirical one (sum of squared per-sample gradients)
    emp = torch.zeros_like(ref["2.weight"])
    for xi, yi in zip(X, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        emp += model[2].weight.grad**2
    assert not torch.allclose(emp, ref["2.weight"], rtol=0.05)


def test_pruned_weights_and_unidentified():
    model = nn.Sequential(nn.Linear(3, 2))
    mustat.prune(model, {"0.weight": torch.arange(6.0).view(2, 3)}, sparsity=1 / 3)
    X = torch.randn(30, 3)
    X[:, 2] = 0  # a constant-zero input: no curvature, and no penalty -> unidentified
    est = make_estimator("curvature", model).fit(FitContext(X=X, y=torch.randint(0, 2, (30,)),
                                                            loss=nn.functional.cross_entropy))
    se = est.se()["0.weight"]
    assert torch.isinf(se[:, 2]).all() and torch.isfinite(se[:, :2]).all()
    assert model[0].parametrizations.weight[0].mask.sum() == 4  # the user's masks are untouched


class _Shared(nn.Module):
    """A linear layer applied twice and one applied to a sequence: both leave the outer-product rule."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.shared = nn.Linear(4, 4)
        self.seq = nn.Linear(2, 3)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x[:, None]))                   # (m, 2, 4)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))  # shared, applied to a sequence too
        h = torch.relu(self.seq(h.transpose(1, 2)))              # (m, 4, 3): per position
        return self.head(h.flatten(1))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5),
                          nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3)),
    _Shared,
], ids=["conv-then-linear", "shared-and-sequence"])
def test_linear_rule_equals_per_sample_products(make):
    """The outer-product rule for linear layers against per-sample products for every weight."""
    torch.manual_seed(5)
    model = make().double()
    X = torch.randn(50, 6 if isinstance(model, nn.Sequential) else 4, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    names = [n for n, _ in model.named_parameters()]
    fast = ggn_diagonal(model, nn.functional.cross_entropy, (X, y), names=names, chunk_elements=3000)
    ref = ggn_diagonal(model, nn.functional.cross_entropy, (X, y), names=names, method="vmap")
    for n in names:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-10, atol=1e-13)
        assert ref[n].abs().max() > 0
    assert model.training  # the user's mode is untouched


def test_method_must_be_known():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="method='exact' is not valid; choose one of: auto, vmap"):
        ggn_diagonal(model, nn.functional.cross_entropy, (torch.randn(4, 2), torch.zeros(4, dtype=torch.long)),
                     names=["0.weight"], method="exact")


def _dense_ggn_se(model, X, names, wd):
    """``1 / sqrt(diag(G) + n wd)`` with ``G = sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` built densely in
    float64: ``J_i`` the Jacobian of sample i's logits by torch.func.jacrev over all ``names``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    sizes = [params[n].numel() for n in names]
    G = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    for xi in X:
        def f(p, xi=xi):
            return functional_call(model, {**params, **p}, (xi[None],))[0]
        J = jacrev(f)({n: params[n] for n in names})
        J = torch.cat([J[n].reshape(len(J[n]), -1) for n in names], 1)        # (C, P)
        p = torch.softmax(f({}), 0)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    se = (G.diagonal() + len(X) * wd).rsqrt()
    return dict(zip(names, (s.reshape(params[n].shape) for s, n in zip(se.split(sizes), names))))


def test_log_softmax_with_nll_loss_equals_logits_with_cross_entropy():
    """nll_loss is linear in the log-probabilities, so its own output Hessian is 0; the GGN taken
    through the log-softmax is the logits' GGN under cross_entropy (output_factor's notes)."""
    wd = 1e-3
    logp, logits, X, y = log_softmax_pair(wd)
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateSEWarning)   # an ordinary fit does not warn
        nll = make_estimator("curvature", logp, params=names).fit(
            FitContext(X=X, y=y, loss=nn.functional.nll_loss, weight_decay=wd)).se()
        ce = make_estimator("curvature", logits, params=names).fit(
            FitContext(X=X, y=y, loss=nn.functional.cross_entropy, weight_decay=wd)).se()
    ref = _dense_ggn_se(logits, X, names, wd)
    for n in names:
        torch.testing.assert_close(nll[n], ce[n], rtol=1e-10, atol=0)
        torch.testing.assert_close(nll[n], ref[n], rtol=1e-10, atol=0)
    flat = torch.cat([nll[n].flatten() for n in names])
    assert flat.unique().numel() == flat.numel()  # not the constant 1/sqrt(n * wd) of a zero curvature


def _degenerate(record):
    return [str(w.message) for w in record if issubclass(w.category, DegenerateSEWarning)]


def test_nll_loss_on_logits_warns():
    """nll_loss on logits (log_softmax forgotten) is linear in the outputs: a zero output Hessian that
    is not the log-probability pattern. output_factor says why, the fit's check what it did."""
    _, logits, X, y = log_softmax_pair()
    with pytest.warns(DegenerateSEWarning) as record:
        se = make_estimator("curvature", logits).fit(FitContext(X=X, y=y, loss=nn.functional.nll_loss,
                                                                weight_decay=1e-3)).se()
    messages = _degenerate(record)
    assert len(messages) == 2
    assert "output space is identically 0" in messages[0] and "log_softmax" in messages[0]
    assert "1/sqrt(n*weight_decay) (n=60, weight_decay=0.001)" in messages[1] and "mu[curvature] is magnitude pruning" in messages[1]
    assert record[-1].message.estimator == "curvature" and record[-1].message.diagnostics["finite"] == 219
    for v in se.values():
        torch.testing.assert_close(v, torch.full_like(v, (60 * 1e-3) ** -0.5), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("zero", "wd", "warns"), [
    (4, 0.01, "every finite SE equals 0.57735 = 1/sqrt(n*weight_decay) (n=300, weight_decay=0.01)"),  # inputs all 0
    (3, 0.0, "90 of 120 live weights (75%, more than 50%) are unidentified"),
    (2, 0.0, None),                                                          # exactly half: not more than half
    (0, 0.0, None),                                                          # an ordinary fit
])
def test_degenerate_warning_thresholds(zero, wd, warns):
    """``zero`` of the 4 input columns are 0, so the first layer's weights on them have no curvature."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 30, bias=False), nn.Tanh(), nn.Linear(30, 3)).double()
    X = torch.randn(300, 4, dtype=torch.float64)
    X[:, :zero] = 0
    y = torch.randint(0, 3, (300,))
    est = make_estimator("curvature", model, params=["0.weight"])
    context = FitContext(X=X, y=y, loss=nn.functional.cross_entropy, weight_decay=wd)
    if warns is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DegenerateSEWarning)
            est.fit(context)
    else:
        with pytest.warns(DegenerateSEWarning, match=re.escape(warns)):
            est.fit(context)


class _Constant(Estimator):
    """A plugin-style estimator whose fit calls the base fit: its equal SEs are reported once."""

    name = "constant"

    def fit(self, context):
        super().fit(context)
        return self

    def se(self):
        return {n: torch.full_like(e.effective(), 0.5) for n, e in zip(self.names, self._entries)}


def test_degenerate_warning_for_any_estimator_once():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.warns(DegenerateSEWarning) as record:
        _Constant(model).fit(FitContext())
    assert _degenerate(record) == [
        "estimator 'constant': degenerate standard errors: every finite SE equals 0.5 (to 1e-06 relative), so mu[constant] is "
        "magnitude pruning. This is right when every weight has the same information by design (a linear model on "
        "standardised inputs); otherwise check that the loss has curvature in the model's outputs (nll_loss needs "
        "log_softmax outputs; or use cross_entropy on logits), that the data reach these weights (inputs not all zero, "
        "units not dead) and that the fit data are the training data; or use another estimator"]
    mustat.prune(model, {"0.weight": torch.tensor([[1.0, 2, 3], [4, 5, 6]])}, sparsity=5 / 6)
    with warnings.catch_warnings():                 # one live weight: nothing to compare
        warnings.simplefilter("error", DegenerateSEWarning)
        _Constant(model).fit(FitContext())
