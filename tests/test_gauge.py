"""The rescaling gauge: the balanced point against scipy's minimiser of the norm, function and
orbit invariance, which modules end a chain, and the trajectory estimators' ``gauge="balanced"``."""

import copy

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from mustat._params import mask_of
from mustat.gauge import balanced, chains
from mustat.uncertainty import make_estimator
from mustat.uncertainty.batch_means import BatchMeans
from mustat.uncertainty.pseudo import PseudoBootstrap


def _mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.LeakyReLU(0.1), nn.Dropout(0.0),
                      nn.Linear(6, 3)).double()
    with torch.no_grad():                        # far from balanced
        m[1].weight.mul_(torch.rand(7, 1, dtype=torch.float64) * 4 + 0.1)
        m[3].weight.mul_(torch.rand(6, 1, dtype=torch.float64) * 4 + 0.1)
    return m


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 2)).double()


def _load(model, tensors):
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    return out


def _rescale(model, seed):
    """The same function at another point of every unit's orbit."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    layers = [m for m in out if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for a, b in zip(layers, layers[1:]):
            c = torch.exp(torch.randn(a.weight.shape[0], generator=g, dtype=torch.float64))
            a.weight.mul_(c.reshape(-1, *[1] * (a.weight.dim() - 1)))
            a.bias.mul_(c)
            block = b.weight.shape[1] // len(c)
            b.weight.div_(c.repeat_interleave(block).reshape(1, -1, *[1] * (b.weight.dim() - 2)))
    return out


def _norm(tensors):
    return sum(float(v.square().sum()) for v in tensors.values())


@pytest.mark.parametrize("build, x", [(_mlp, torch.randn(20, 5, dtype=torch.float64)),
                                      (_cnn, torch.randn(4, 1, 8, 8, dtype=torch.float64))])
def test_balanced_keeps_the_function_and_balances_every_unit(build, x):
    m = build()
    bal = balanced(m)
    m2 = _load(m, bal)
    torch.testing.assert_close(m2(x), m(x), rtol=1e-12, atol=1e-12)
    layers = [(n, mod) for n, mod in m2.named_children() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    for (_, a), (_, b) in zip(layers, layers[1:]):
        inc = a.weight.detach().flatten(1).square().sum(1) + a.bias.detach().square()
        out = b.weight.detach().square().transpose(0, 1).flatten(1).sum(1).reshape(len(inc), -1).sum(1)
        torch.testing.assert_close(inc, out, rtol=1e-9, atol=0)


def test_balanced_point_is_scipys_least_norm_point_of_the_orbit():
    m = _mlp(1)
    p = {k: v.detach() for k, v in m.named_parameters()}

    def norm(u):                                 # squared norm at scales exp(u) of the 7 + 6 hidden units
        c1, c2 = np.exp(u[:7]), np.exp(u[7:])
        w1, b1 = p["1.weight"].numpy() * c1[:, None], p["1.bias"].numpy() * c1
        w2, b2 = p["3.weight"].numpy() * c2[:, None] / c1[None, :], p["3.bias"].numpy() * c2
        w3 = p["6.weight"].numpy() / c2[None, :]
        return sum((t ** 2).sum() for t in (w1, b1, w2, b2, w3, p["6.bias"].numpy()))

    ref = minimize(norm, np.zeros(13), method="BFGS", options=dict(gtol=1e-12))
    assert _norm(balanced(m)) + float(p["6.bias"].square().sum()) == pytest.approx(ref.fun, rel=1e-9)
    assert _norm(balanced(m)) + float(p["6.bias"].square().sum()) < norm(np.zeros(13))


def test_the_gauge_fix_is_a_function_of_the_orbit_and_idempotent():
    m = _cnn(2)
    bal = balanced(m)
    for seed in (0, 1):
        other = balanced(_rescale(m, seed))
        for k in bal:
            torch.testing.assert_close(other[k], bal[k], rtol=1e-8, atol=1e-12)
    again = balanced(_load(m, bal))
    for k in bal:
        torch.testing.assert_close(again[k], bal[k], rtol=1e-10, atol=1e-14)


def test_which_modules_end_a_chain():
    lin = lambda i, o: nn.Linear(i, o)          # noqa: E731
    assert [c.layers for c in chains(_mlp())] == [("1", "3", "6")]
    assert chains(_cnn())[0].block == (1, 9, 1)
    assert chains(nn.Sequential(lin(3, 4), nn.Tanh(), lin(4, 2))) == []            # no rescaling symmetry
    assert chains(nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.ReLU(), nn.Conv1d(2, 2, 3))) == []
    assert chains(nn.Sequential(lin(3, 4), nn.ReLU6(), lin(4, 2))) == []            # clipping is not homogeneous
    two = chains(nn.Sequential(lin(3, 4), nn.ReLU(), lin(4, 4), nn.Softplus(), lin(4, 2), nn.ReLU(), lin(2, 1)))
    assert [c.layers for c in two] == [("0", "2"), ("4", "6")]
    nested = nn.Sequential(nn.Sequential(lin(3, 4), nn.ReLU(), lin(4, 2)), nn.ReLU(), lin(2, 1))
    assert [c.layers for c in chains(nested)] == [("0.0", "0.2")]


def test_a_dead_unit_keeps_its_scale():
    m = _mlp(3)
    with torch.no_grad():
        m[1].weight[2] = 0.0
        m[1].bias[2] = 0.0
        m[3].weight[:, 2] = 0.0
    bal = balanced(m)
    assert all(torch.isfinite(v).all() for v in bal.values())
    assert float(bal["1.weight"][2].abs().sum()) == 0.0


def _orbit_walk(est, m, steps=12):
    """Snapshots that differ only by rescaling: the data cannot tell them apart."""
    base = copy.deepcopy(m)
    for t in range(steps):
        moved = _rescale(base, t)
        with torch.no_grad():
            for p, q in zip(m.parameters(), moved.parameters()):
                p.copy_(q)
        est.update()


def test_pseudo_bootstrap_balanced_sees_no_spread_along_the_orbit():
    raw, bal = (PseudoBootstrap(_mlp(4), gauge=g, center="mean") for g in ("none", "balanced"))
    for est in (raw, bal):
        _orbit_walk(est, est._model)
    assert min(float(v.min()) for v in raw.std().values()) > 1e-3
    assert max(float(v.max()) for v in bal.std().values()) < 1e-9    # the balancing's tol: 1e-10 in log c
    centre = balanced(_mlp(4))
    for k, v in bal.estimate().items():
        torch.testing.assert_close(v, centre[k], rtol=1e-9, atol=1e-12)
    assert "gauge='balanced'" in repr(bal)


def test_batch_means_balanced_has_no_long_run_variance_along_the_orbit():
    bm = BatchMeans(_mlp(5), batch_steps=2, gauge="balanced")
    _orbit_walk(bm, bm._model, steps=12)
    assert max(float(v.max()) for v in bm.lrv().values()) < 1e-20
    raw = BatchMeans(_mlp(5), batch_steps=2)
    _orbit_walk(raw, raw._model, steps=12)
    assert min(float(v.max()) for v in raw.lrv().values()) > 1e-6


def test_recorded_gradients_are_those_of_the_balanced_coordinates():
    m = _mlp(6)
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    est = PseudoBootstrap(m, gauge="balanced", grad_moment=True, params=["1.weight", "3.weight", "6.weight"])
    nn.functional.mse_loss(m(x), y).backward()
    est.update()
    m_bal = _load(m, balanced(m))
    m_bal.zero_grad()
    nn.functional.mse_loss(m_bal(x), y).backward()
    for name, g in est.grad_mean().items():
        torch.testing.assert_close(g, dict(m_bal.named_parameters())[name].grad, rtol=1e-9, atol=1e-14)


def test_bad_gauge_input():
    glm = nn.Sequential(nn.Linear(3, 1))
    with pytest.raises(ValueError, match="nothing to balance"):
        PseudoBootstrap(glm, gauge="balanced")
    with pytest.raises(ValueError, match="gauge='rebalance' is not valid"):
        PseudoBootstrap(_mlp(), gauge="rebalance")
    with pytest.raises(ValueError, match="calibrated does not support gauge='balanced'"):
        make_estimator("calibrated", _mlp(), gauge="balanced")
    m = _mlp()
    bal = PseudoBootstrap(m, gauge="balanced")
    bal.update()
    with pytest.raises(ValueError, match="gauge='balanced'.*gauge='none'"):
        PseudoBootstrap(m).load_state_dict(bal.state_dict())


def test_scores_from_balanced_estimates_do_not_depend_on_the_gauge_the_model_is_in():
    import mustat
    m = _mlp(7)
    other = _rescale(m, 3)                        # the same function at another point of every orbit
    masks = []
    for net in (m, other):
        est = PseudoBootstrap(net, gauge="balanced")
        est.update()
        scores = mustat.score(net, "magnitude", weights=est.estimate())
        pruned = copy.deepcopy(net)
        mustat.prune(pruned, scores, sparsity=0.5)
        masks.append({k: mask_of(pruned, k) for k in ("1.weight", "3.weight", "6.weight")})
        assert 0.3 < float(sum((v == 0).sum() for v in masks[-1].values())) / 95 < 0.7   # half of the 95 weights
        x = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        masks[-1]["out"] = pruned(x)
    for k in masks[0]:
        torch.testing.assert_close(masks[0][k], masks[1][k], rtol=1e-10, atol=1e-12)
    raw = [mustat.score(net, "magnitude") for net in (m, other)]   # raw magnitudes do depend on it
    assert any(not torch.equal(raw[0][k].argsort(), raw[1][k].argsort()) for k in raw[0])
