import numpy as np
import pytest
import torch
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from torch import nn

import mustat
from mustat.models import GLM
from mustat.uncertainty import hessian_se
from validation.glm import fit_glm


@pytest.fixture
def table(mlp):
    g = torch.Generator().manual_seed(5)
    se = {n: torch.rand(p.shape, generator=g) * 0.2 + 0.01 for n, p in mlp.named_parameters()}
    return mlp, se


def test_values_against_scipy(table):
    model, se = table
    res = mustat.wald(model, se, alpha=0.1)
    for name, p in model.named_parameters():
        w = p.detach().double().numpy()
        s = se[name].double().numpy()
        z = w / s
        np.testing.assert_allclose(res.zvalues[name], z, rtol=1e-6)
        np.testing.assert_allclose(res.pvalues[name], 2 * (1 - sps.norm.cdf(np.abs(z))), rtol=1e-6, atol=1e-15)
        q = sps.norm.ppf(0.95)
        np.testing.assert_allclose(res.conf_int()[name][..., 0], w - q * s, rtol=1e-6)
        q99 = sps.norm.ppf(0.995)
        np.testing.assert_allclose(res.conf_int(0.01)[name][..., 1], w + q99 * s, rtol=1e-6)


@pytest.mark.parametrize("method", ["holm", "fdr_bh", "bonferroni"])
def test_adjusted_against_statsmodels(table, method):
    model, se = table
    res = mustat.wald(model, se)
    flat = np.concatenate([res.pvalues[k].ravel() for k in res.names])
    ref = multipletests(flat, method=method)[1]
    got = np.concatenate([v.ravel() for v in res.pvalues_adjusted(method).values()])
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_frame_and_summary(table):
    model, se = table
    res = mustat.wald(model, se)
    df = res.to_frame()
    assert list(df.columns) == ["param", "index", "label", "flat", "weight", "se", "z", "pvalue", "ci_low", "ci_high", "pruned"]
    assert len(df) == sum(p.numel() for p in model.parameters())
    row = df[(df.param == "2.weight") & (df["index"] == (3, 5))].iloc[0]
    assert row.weight == pytest.approx(float(model[2].weight[3, 5].detach()))
    text = str(res.summary())
    assert "0.weight" in text and "largest |z|" in text  # long tensors are digested
    assert text.count("\n") < 120
    assert "<table" in res.summary()._repr_html_()


def test_fdr_pruning_recovers_the_design():
    # 5 strong effects (beta = 1, SE ~ 0.06 here, so z ~ 15 and power ~ 1) and 15 nulls.
    rng = np.random.default_rng(0)
    n, d = 2000, 20
    beta = np.r_[np.ones(5), np.zeros(15)]
    X = rng.standard_normal((n, d))
    y = rng.binomial(1, 1 / (1 + np.exp(-(X @ beta)))).astype(float)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    model = fit_glm(GLM(d), Xt, yt)
    res = mustat.wald(model, hessian_se(model, model.nll, (Xt, yt)), params=["linear.weight"])
    rep = mustat.prune_fdr(model, res, fdr=0.05)
    kept = model.linear.weight.detach().numpy().ravel() != 0
    assert kept[:5].all()
    # BH at q keeps E[false discoveries] <= q * m0 / m; with 15 nulls P(>= 4 kept) < 0.01
    assert (~kept[5:]).sum() >= 12
    assert rep.sparsity == pytest.approx((~kept).mean())


def test_zero_se_warns_and_is_documented(table):
    model, se = table
    se["0.weight"][0, 0] = 0.0
    with pytest.warns(UserWarning, match="se == 0"):
        res = mustat.wald(model, se)
    assert np.isinf(res.zvalues["0.weight"][0, 0]) and res.pvalues["0.weight"][0, 0] == 0


def test_pruned_weights_excluded_from_family(mlp):
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5)
    se = {n: torch.full(p.shape, 0.1) for n, p in [("0.weight", mlp[0].weight), ("2.weight", mlp[2].weight)]}
    res = mustat.wald(mlp, se)
    assert res.pruned["0.weight"].sum() > 0
    assert np.all(res.pvalues["0.weight"][res.pruned["0.weight"]] == 1)
    live = np.concatenate([res.pvalues[k][~res.pruned[k]] for k in res.names])
    adj = np.concatenate([res.pvalues_adjusted("holm")[k][~res.pruned[k]] for k in res.names])
    np.testing.assert_allclose(adj, multipletests(live, method="holm")[1])


def test_bad_input(table):
    model, se = table
    bad = dict(se)
    bad["0.weight"] = se["0.weight"].clone()
    bad["0.weight"][1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"se\[.0.weight.\] has 1 NaN"):
        mustat.wald(model, bad)
    bad["0.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"se\['0.weight'\] has shape \(3,\)"):
        mustat.wald(model, bad)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha must be in"):
            mustat.wald(model, se, alpha=alpha)
    res = mustat.wald(model, se)
    with pytest.raises(ValueError, match="alpha must be in"):
        res.conf_int(2.0)
    with pytest.raises(ValueError, match="holm"):
        res.pvalues_adjusted("fdr_magic")
    with pytest.raises(ValueError, match="fdr must be in"):
        mustat.prune_fdr(model, res, fdr=0)
    with pytest.raises(ValueError, match="'9.weight' is not a parameter"):
        mustat.wald(model, {"9.weight": torch.ones(1)})


def test_infinite_se_means_unidentified(table):
    model, se = table
    se["0.weight"][2, 3] = float("inf")
    res = mustat.wald(model, se)
    assert res.zvalues["0.weight"][2, 3] == 0 and res.pvalues["0.weight"][2, 3] == 1
    assert np.isinf(res.conf_int()["0.weight"][2, 3]).all()


def test_exact_wald_intervals_cover_at_the_nominal_rate():
    # 200 simulated logistic datasets x 3 coefficients = 600 intervals; binomial SE of the
    # coverage sqrt(0.95 * 0.05 / 600) = 0.0089: allow 3 of them
    from mustat.data import glm_design

    coef = np.array([0.8, 0.0, -0.4])
    hits = []
    for rep in range(200):
        X, y, _ = glm_design("logistic", n=400, coef=coef, scales=(1.0, 2.0, 0.5), seed=10_000 + rep)
        Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
        fit = fit_glm(GLM(3), Xt, yt)
        ci = mustat.wald(fit, hessian_se(fit, fit.nll, (Xt, yt)), params=["linear.weight"]).conf_int()["linear.weight"][0]
        hits.append((ci[:, 0] <= coef) & (coef <= ci[:, 1]))
    coverage = np.mean(hits)
    assert abs(coverage - 0.95) < 3 * np.sqrt(0.95 * 0.05 / 600), coverage


def test_degrees_of_freedom_give_student_t_tests_and_intervals():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -1.2, 2.0]]))
    se = {"0.weight": torch.tensor([[0.25, 0.5, 0.4]])}
    t = mustat.wald(model, se, dof=19)
    z = np.array([2.0, -2.4, 5.0])
    np.testing.assert_allclose(t.pvalues["0.weight"].ravel(), 2 * sps.t.sf(np.abs(z), 19), rtol=1e-6)  # float32 weights
    lo, hi = t.conf_int()["0.weight"][0].T
    q = sps.t.ppf(0.975, 19)
    np.testing.assert_allclose(lo, [0.5 - q * 0.25, -1.2 - q * 0.5, 2.0 - q * 0.4], rtol=1e-6)
    normal = mustat.wald(model, se)
    assert (t.pvalues["0.weight"] > normal.pvalues["0.weight"]).all()  # t has heavier tails
    assert "t(19)" in str(t.summary()) and "N(0, 1)" in str(normal.summary())
    with pytest.raises(ValueError, match="dof must be in"):
        mustat.wald(model, se, dof=0)


def test_labels_and_header_in_the_table():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    res = mustat.wald(model, {"0.weight": torch.full((1, 3), 0.1)}, labels={"0.weight": ["age", "dose", "sex"]},
                      nobs=120, llf=-55.5)
    assert list(res.to_frame()["label"]) == ["age", "dose", "sex"]
    text = str(res.summary())
    assert "age" in text and "n = 120" in text and "log-likelihood -55.5000" in text
    with pytest.raises(ValueError, match="does not broadcast"):
        mustat.wald(model, {"0.weight": torch.ones(1, 3)}, labels={"0.weight": ["a", "b"]})
