"""K-FAC's Kronecker factors against curvlinops' KFACLinearOperator (type-2 Fisher, KFAC-expand,
bias joined to the weight), in float64, on an MLP and a CNN."""

import warnings

import pytest
import torch
from architectures import log_softmax_pair
from torch import nn

from mustat.uncertainty import DegenerateSEWarning, FitContext, make_estimator

curvlinops = pytest.importorskip("curvlinops")


def _nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    g = torch.Generator().manual_seed(1)
    return [(mlp, torch.randn(50, 6, generator=g, dtype=torch.float64)),
            (cnn, torch.randn(50, 2, 5, 5, generator=g, dtype=torch.float64))]


@pytest.mark.parametrize("index", [0, 1])
def test_factors_equal_curvlinops(index):
    model, X = _nets()[index]
    y = torch.randint(0, 4, (len(X),), generator=torch.Generator().manual_seed(2))
    est = make_estimator("kfac", model).fit(FitContext(X=X, y=y, loss=nn.functional.cross_entropy,
                                                       weight_decay=1e-3))
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ref = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()),
                                        [(X, y)], fisher_type="type-2", kfac_approx="expand",
                                        separate_weight_and_bias=False, check_deterministic=False)
    ref.compute_kronecker_factors()
    for layer in layers:
        *_, A, B = est._factors[f"{layer}.weight"]
        torch.testing.assert_close(A, ref._input_covariances[layer], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B, ref._gradient_covariances[layer], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "fisher"])
def test_log_softmax_with_nll_loss_equals_logits_with_cross_entropy(name):
    """The Kronecker factors (and fisher's dense GGN) of a log-softmax network under nll_loss are the
    logit network's under cross_entropy: the output Hessian is taken through the log-softmax."""
    logp, logits, X, y = log_softmax_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateSEWarning)   # an ordinary fit does not warn
        nll = make_estimator(name, logp).fit(FitContext(X=X, y=y, loss=nn.functional.nll_loss,
                                                        weight_decay=1e-3)).se()
        ce = make_estimator(name, logits).fit(FitContext(X=X, y=y, loss=nn.functional.cross_entropy,
                                                         weight_decay=1e-3)).se()
    for n in ("conv.weight", "fc.weight"):
        torch.testing.assert_close(nll[n], ce[n], rtol=1e-10, atol=0)
        assert nll[n].unique().numel() == nll[n].numel()  # not 1/sqrt(n * wd) for every weight


def test_nll_loss_on_logits_warns():
    """nll_loss on logits has a zero output Hessian: K-FAC's factors B are 0, every SE 1/sqrt(n * wd)
    up to rounding (7 distinct values before the warning existed), and both warnings say so."""
    _, logits, X, y = log_softmax_pair()
    with pytest.warns(DegenerateSEWarning) as record:
        se = make_estimator("kfac", logits).fit(FitContext(X=X, y=y, loss=nn.functional.nll_loss,
                                                           weight_decay=1e-3)).se()
    messages = [str(w.message) for w in record if issubclass(w.category, DegenerateSEWarning)]
    assert len(messages) == 2
    assert "output space is identically 0" in messages[0]
    assert "estimator 'kfac'" in messages[1] and "1/sqrt(n*weight_decay) (n=60, weight_decay=0.001)" in messages[1]
    for v in se.values():
        torch.testing.assert_close(v, torch.full_like(v, (60 * 1e-3) ** -0.5), rtol=1e-12, atol=0)


WD = 1e-3


def _wide():
    """A first layer with more inputs (30, and the bias) than samples (20): its A has rank 20 and
    is decomposed through the 20 x 20 Gram matrix of its rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(20, 30, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    return model, X, y


def _ctx(X, y):
    return FitContext(X=X, y=y, loss=nn.functional.cross_entropy, weight_decay=WD)


def test_fewer_rows_than_features_equals_the_dense_kronecker_inverse():
    model, X, y = _wide()
    est = make_estimator("kfac", model).fit(_ctx(X, y))
    assert est._factors["0.weight"][0].shape == (31, 20)           # the Gram route: 20 directions of 31
    ref = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()),
                                        [(X, y)], fisher_type="type-2", kfac_approx="expand",
                                        separate_weight_and_bias=False, check_deterministic=False)
    ref.compute_kronecker_factors()
    for layer, (o, f) in (("0", (5, 31)), ("2", (3, 6))):
        A, B = ref._input_covariances[layer], ref._gradient_covariances[layer]
        torch.testing.assert_close(est._a_matrix(f"{layer}.weight"), A, rtol=1e-10, atol=1e-12)
        H = torch.kron(B, A) + len(X) * WD * torch.eye(o * f, dtype=torch.float64)
        var = torch.linalg.inv(H).diagonal().reshape(o, f)[:, :-1]
        torch.testing.assert_close(est.se()[f"{layer}.weight"] ** 2, var, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name,kind,block", [("kfac", "observed", "row"), ("kfac", "sandwich", "row"),
                                             ("kfac", "observed", "layer"), ("ekfac", "observed", "row"),
                                             ("ekfac", "sandwich", "row"), ("ekfac", "observed", "layer")])
def test_the_gram_route_equals_the_full_eigendecomposition(name, kind, block):
    """SEs (observed and sandwich) and the compensating update after a prune are those of the full
    eigendecomposition of A, which the Gram route replaces."""
    import mustat

    model, X, y = _wide()
    out = {}
    for gram in (True, False):
        copy = nn.Sequential(nn.Linear(30, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        copy.load_state_dict(model.state_dict())
        est = make_estimator(name, copy, kind=kind, obs_block=block)
        est._gram_route = gram
        est.fit(_ctx(X, y))
        assert est._factors["0.weight"][0].shape == ((31, 20) if gram else (31, 31))
        se = est.se()
        if kind == "observed":
            mustat.prune(copy, mustat.score(copy, "obs", se=se), sparsity=0.5, update=est)
        out[gram] = (se, copy[0].weight.detach().clone())
    for n in out[True][0]:
        torch.testing.assert_close(out[True][0][n], out[False][0][n], rtol=1e-8, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-7, atol=1e-10)


def _factor_bytes_from_shapes(layers, n):
    """What the factors of ``(T, out, features with bias)`` layers occupy after a fit, in float64:
    A (or, with fewer rows N = nT than features, the N rows), Q_A (features x rank), B, Q_B, the
    eigenvalues and the denominators (out x rank)."""
    total = 0
    for T, o, f in layers:
        N = n * T
        r = min(N, f)
        total += (N * f if N < f else f * f) + f * r + 2 * o * o + 2 * o * r
    return 8 * total


def _allocated(est):
    tensors = [t for v in est._factors.values() for t in v if t is not None]
    tensors += list(est._eigen.values()) + list(est._rows.values())
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
@pytest.mark.parametrize("net", ["wide", "cnn"])
def test_the_cost_is_announced_before_the_data_pass_and_matches_the_factors(name, net, capsys):
    if net == "wide":
        model, X, y = _wide()
        layers = [(1, 5, 31), (1, 3, 6)]
    else:
        model, X = _nets()[1]
        y = torch.randint(0, 4, (len(X),), generator=torch.Generator().manual_seed(2))
        layers = [(9, 3, 19), (1, 4, 28)]            # conv 2->3 3x3 stride 2 on 5x5: 3x3 positions
    ctx = _ctx(X, y)
    est = make_estimator(name, model, progress=True)
    cost = est.cost(ctx)
    assert est._se is None                           # an estimate, no fit
    assert cost.seconds > 0 and cost.flops > 0 and cost.bytes > cost.factor_bytes
    est.fit(ctx)
    err = capsys.readouterr().err
    line = err.index(f"estimator {name!r}: this fit will take about")
    assert line < err.index(f"{name}: factors") < err.index(f"{name}: eigendecompositions")
    expected = _factor_bytes_from_shapes(layers, len(X))
    actual = _allocated(est)
    assert expected / 1.5 <= actual <= 1.5 * expected
    assert actual / 1.5 <= cost.factor_bytes <= 1.5 * actual


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_progress_shows_only_when_asked_or_long(name, capsys, caplog, monkeypatch):
    import logging

    import mustat.cost

    model, X, y = _wide()
    for progress in (False, None):                   # quiet, and auto on a fit of milliseconds
        make_estimator(name, model, progress=progress).fit(_ctx(X, y))
        assert capsys.readouterr().err == ""
    make_estimator(name, model, progress=True).fit(_ctx(X, y))
    err = capsys.readouterr().err
    assert "this fit will take" in err and f"{name}: factors" in err
    monkeypatch.setattr(mustat.cost, "LONG_FIT_SECONDS", 0.0)   # every fit long: auto shows, quiet only logs
    make_estimator(name, model).fit(_ctx(X, y))
    assert "this fit will take" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="mustat.uncertainty"):
        make_estimator(name, model, progress=False).fit(_ctx(X, y))
    assert capsys.readouterr().err == ""
    assert any("this fit will take" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        make_estimator(name, model, progress="yes")


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_too_little_memory_offers_the_diagonal(name):
    model, X, y = _wide()
    est = make_estimator(name, model, max_memory=1000)
    with pytest.raises(ValueError, match=rf"estimator '{name}' needs about .* GiB .* more than max_memory=.*; "
                                         r"use se='curvature', or raise max_memory"):
        est.fit(_ctx(X, y))
    assert est._se is None and not hasattr(est, "_factors")     # refused before any work


def test_other_estimators_declare_what_they_can():
    from mustat.cost import Cost

    model, X, y = _wide()
    fisher = make_estimator("fisher", model).cost(_ctx(X, y))
    assert isinstance(fisher, Cost) and fisher.bytes > 0 and fisher.seconds != fisher.seconds   # memory only: nan
    assert make_estimator("pseudo", model).cost(_ctx(X, y)) is None                           # not declared


def test_float32_passes_stay_close_to_float64():
    """pass_dtype='model' runs the passes of a float32 model in float32 (factors summed and
    decomposed in float64): SEs within 1e-4 of the float64 passes here."""
    model, X, y = _wide()
    model = model.float()
    ctx = _ctx(X.float(), y)
    se64 = make_estimator("kfac", model).fit(ctx).se()
    se32 = make_estimator("kfac", model, pass_dtype="model").fit(ctx).se()
    for n in se64:
        torch.testing.assert_close(se32[n], se64[n], rtol=1e-4, atol=0)
    # the estimate names the faster option where it applies
    assert "pass_dtype='model' (float32 passes) would take about" in str(make_estimator("kfac", model).cost(ctx))
    assert make_estimator("kfac", model, pass_dtype="model").cost(ctx).note == ""
    with pytest.raises(ValueError, match="pass_dtype"):
        make_estimator("kfac", model, pass_dtype="float16")


class _Pad(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        return nn.functional.pad(x, (1, 1, 1, 1), mode=self.mode)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_padding_modes_equal_an_explicit_pad_before_an_unpadded_conv(mode):
    """A convolution with ``padding="same"`` (any mode) is a pad followed by an unpadded
    convolution: K-FAC's SEs of the two models are the same numbers (the unpadded one is the case
    checked against curvlinops above)."""
    torch.manual_seed(0)
    padded = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same", padding_mode=mode), nn.ReLU(), nn.Flatten(),
                           nn.Linear(3 * 5 * 5, 4)).double()
    plain = nn.Sequential(_Pad("constant" if mode == "zeros" else mode), nn.Conv2d(2, 3, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()
    plain[1].load_state_dict(padded[0].state_dict())
    plain[4].load_state_dict(padded[3].state_dict())
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    ctx = FitContext(X=X, y=y, loss=nn.functional.cross_entropy, weight_decay=1e-3)
    se = make_estimator("kfac", padded).fit(ctx).se()
    ref = make_estimator("kfac", plain).fit(ctx).se()
    torch.testing.assert_close(se["0.weight"], ref["1.weight"], rtol=1e-10, atol=0)
    torch.testing.assert_close(se["3.weight"], ref["4.weight"], rtol=1e-10, atol=0)


def test_monte_carlo_output_factor_is_unbiased_within_its_sampling_error():
    """``mc_samples=k``: the last layer's factor ``B = sum_i L_i xi xi^T L_i^T / k`` against the
    exact ``sum_i Lambda_i`` (``Lambda_i = diag(p_i) - p_i p_i^T``). For Gaussian ``xi`` each entry's
    variance is ``sum_i (Lambda_aa Lambda_bb + Lambda_ab^2) / k`` (Isserlis), so every z-score of the
    78 distinct entries is within 4.5 (a fixed seed; under normality the chance of a larger one is
    about 5e-4). ``k`` at or above the number of outputs is the exact factor, which is cheaper."""
    torch.manual_seed(0)
    C = 12
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (200,), generator=g)
    ctx = FitContext(X=X, y=y, loss=nn.functional.cross_entropy, weight_decay=1e-3)
    k = 3
    exact = make_estimator("kfac", model).fit(ctx)
    mc = make_estimator("kfac", model, mc_samples=k, seed=3).fit(ctx)
    B, B_mc = exact._factors["2.weight"][4], mc._factors["2.weight"][4]
    with torch.no_grad():
        p = torch.softmax(model(X), 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(B, lam.sum(0), rtol=1e-10, atol=1e-12)
    d = lam.diagonal(dim1=1, dim2=2)
    var = ((d[:, :, None] * d[:, None, :]) + lam.square()).sum(0) / k
    z = (B_mc - B) / var.sqrt()
    rows, cols = torch.triu_indices(C, C)
    assert float(z[rows, cols].abs().max()) < 4.5
    assert float(z[rows, cols].abs().max()) > 0.1            # it is a draw, not the exact factor
    full = make_estimator("kfac", model, mc_samples=C, seed=3).fit(ctx)
    torch.testing.assert_close(full._factors["2.weight"][4], B, rtol=1e-12, atol=0)
    # the same seed draws the same numbers; another seed others
    again = make_estimator("kfac", model, mc_samples=k, seed=3).fit(ctx)
    other = make_estimator("kfac", model, mc_samples=k, seed=4).fit(ctx)
    assert torch.equal(again._factors["2.weight"][4], B_mc)
    assert not torch.equal(other._factors["2.weight"][4], B_mc)


def test_mc_samples_is_checked():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="mc_samples"):
        make_estimator("kfac", model, mc_samples=0)
