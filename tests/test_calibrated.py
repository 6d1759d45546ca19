"""The calibrated pseudo bootstrap against exact Wald standard errors."""

import functools
import warnings

import numpy as np
import pytest
import torch

import mustat
from mustat.data import glm_design
from mustat.models import GLM
from mustat.uncertainty import PseudoBootstrap, calibrated_se, stationarity
from validation.glm import fit_glm


@functools.cache
def _fit(optimizer, lr, *, epochs, window, momentum=0.0, n=4000, sampler="replacement", seed=0, weight_decay=0.0):
    X, y, _ = glm_design("logistic", n=n, coef=(1.0, -0.5, 0.25, 0.0, 0.0, 0.5), scales=(0.5, 1, 2, 1, 0.5, 2), seed=seed)
    X32, y32 = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GLM(6)
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
           if optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay))
    tr = PseudoBootstrap(model, grad_moment=True)
    tr.attach(opt)
    g = torch.Generator().manual_seed(seed)
    S = 32
    steps_per_epoch = n // S
    for epoch in range(epochs):
        if epoch == epochs - window:
            tr.reset()
        for _ in range(steps_per_epoch):
            idx = torch.randint(n, (S,), generator=g) if sampler == "replacement" else torch.randperm(n, generator=g)[:S]
            opt.zero_grad()
            (model.nll(model(X32[idx]), y32[idx]) / S).backward()
            opt.step()
    X64, y64 = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    mle = fit_glm(GLM(6), X64, y64, weight_decay=weight_decay)
    # the sampling SE of the (penalised) estimate: the penalised sandwich
    exact = mustat.hessian_se(mle, mle.nll, (X64, y64), kind="sandwich" if weight_decay else "observed",
                              weight_decay=weight_decay)["linear.weight"].numpy().ravel()
    return model, opt, tr, exact, n, S


def _check_agreement(optimizer, lr, momentum, epochs, window, weight_decay=0.0):
    model, opt, tr, exact, n, S = _fit(optimizer, lr, momentum=momentum, epochs=epochs, window=window,
                                       weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the window must pass the stationarity check
        cal = calibrated_se(tr, opt, n=n, batch_size=S)["linear.weight"].double().numpy().ravel()
    raw = tr.std()["linear.weight"].double().numpy().ravel()
    rep = stationarity(tr, opt)
    # The calibrated SE is proportional to the window variance, whose relative error from
    # n_eff effectively independent draws is sqrt(2 / n_eff); a median over 6 weights has
    # about 1.25 / sqrt(6) of that. Allow 3 such errors, plus the diagonal approximation's
    # bias, which for these independent features is the VIF of the logistic weights (< 5%).
    tol = 3 * 1.25 * np.sqrt(2 / rep.n_eff_median) / np.sqrt(6) + 0.05
    assert tol < 0.4  # the window is long enough for the test to mean something
    assert abs(np.median(cal / exact) - 1) < tol, (np.median(cal / exact), tol)
    # a log-log slope over 6 weights: its standard error is the per-weight log error over
    # sd(log exact) * sqrt(6); allow 3 of them
    slope_tol = 3 * np.sqrt(2 / rep.n_eff_median) / (np.log(exact).std() * np.sqrt(6))
    assert slope_tol < 0.8
    slope = np.polyfit(np.log(exact), np.log(cal), 1)[0]
    assert abs(slope - 1) < slope_tol, (slope, slope_tol)
    # the raw pseudo-bootstrap SD is no standard error: far off in level or in shape
    raw_slope = np.polyfit(np.log(exact), np.log(raw), 1)[0]
    assert abs(np.median(raw / exact) - 1) > tol or abs(raw_slope - 1) > slope_tol


def test_calibrated_adam_matches_exact_wald_and_raw_pseudo_does_not():
    _check_agreement("adam", 0.01, 0.0, epochs=40, window=30)


def test_with_weight_decay_calibrated_matches_the_penalised_sandwich():
    # the centred gradient variance: weight decay drops out of the calibration
    _check_agreement("adam", 0.01, 0.0, epochs=40, window=30, weight_decay=0.05)
    model, opt, tr, exact, n, S = _fit("adam", 0.01, epochs=40, window=30, weight_decay=0.05)
    cal = calibrated_se(tr, opt, n=n, batch_size=S, check=False)["linear.weight"].double().numpy().ravel()
    # the uncentred moment E[g^2] = var + (weight_decay * w)^2 would shrink the SEs (se ~ 1/sqrt(m)):
    # by more than 5% in median at this penalty, a bias the centred form does not have
    v = tr.grad_var()["linear.weight"].double().numpy().ravel()
    m = tr.grad_mean()["linear.weight"].double().numpy().ravel()
    uncentred = cal * np.sqrt(v / (v + m**2))
    assert np.median(uncentred / exact) < np.median(cal / exact) - 0.05


@pytest.mark.slow
@pytest.mark.parametrize("lr, momentum", [(0.05, 0.0), (0.005, 0.9)], ids=["sgd", "sgd+momentum"])
def test_calibrated_sgd_matches_exact_wald_and_raw_pseudo_does_not(lr, momentum):
    # SGD's slow directions decorrelate in ~1/(lr h) ~ 100+ steps: a long window is needed
    _check_agreement("sgd", lr, momentum, epochs=120, window=100)


def test_stationarity_diagnostic_short_vs_long_window():
    # one epoch right after initialisation: the window is dominated by drift
    model, opt, tr, *_ = _fit("sgd", 0.05, epochs=1, window=1, n=1000)
    with pytest.warns(UserWarning, match="too short for stationarity"):
        calibrated_se(tr, opt, n=1000, batch_size=32)
    assert not stationarity(tr, opt).ok
    # no live weight (all pruned or frozen: zero variance): nothing to judge, which is not "ok"
    dead = {"linear.weight": (torch.zeros(1, 6), torch.zeros(1, 6), 0.05, torch.ones(1, 6))}
    rep = stationarity(tr, opt, _comps=dead)
    assert not rep.ok and np.isnan(rep.n_eff_median)
    model, opt, tr, *_ = _fit("adam", 0.01, epochs=40, window=30)  # the run tested above
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrated_se(tr, opt, n=4000, batch_size=32)
    assert stationarity(tr, opt).ok and stationarity(tr, opt).n_eff_median > 30


def test_unidentified_and_pruned_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
    mustat.prune(model, {"0.weight": torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])}, sparsity=1 / 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = PseudoBootstrap(model, grad_moment=True)
    tr.attach(opt)
    X = torch.randn(64, 3)
    X[:, 2] = 0.0  # a constant-zero input: its weights never get a data gradient
    for i in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[i::20]), torch.zeros(len(X[i::20]), dtype=torch.long)).backward()
        opt.step()
    se = calibrated_se(tr, opt, n=64, batch_size=3, check=False)["0.weight"]
    assert torch.isinf(se[:, 2]).all()  # unidentified
    z = mustat.score(model, "mu", se={"0.weight": se})["0.weight"]
    assert z[1, 2] == 0 and z[0, 0] == float("-inf")  # scored 0 (pruned early) / already pruned


def test_bad_input():
    model = GLM(2)
    opt = torch.optim.RMSprop(model.parameters())
    with pytest.raises(ValueError, match="grad_moment=True"):
        calibrated_se(PseudoBootstrap(model), opt, n=10, batch_size=2)
    tr = PseudoBootstrap(model, grad_moment=True)
    with pytest.raises(ValueError, match="SGD and Adam, not RMSprop"):
        calibrated_se(tr, opt, n=10, batch_size=2)
    with pytest.raises(RuntimeError, match="no .grad"):
        tr.update()
