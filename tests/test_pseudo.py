import numpy as np
import pytest
import torch
from conftest import Trajectory, train_steps
from torch import nn

import mustat
from mustat import PseudoBootstrap

EPS32 = np.finfo(np.float32).eps


def feed(tracker, model, traj):
    for x in traj:
        model.set(x)
        tracker.update()


def test_welford_matches_float64_on_tiny_spread_near_one():
    # Weights near 1 moving by ~1e-4: the spread is 1e-4 of the level.
    rng = np.random.default_rng(0)
    n, level, spread = 10_000, 1.0, 1e-4
    traj = (level + spread * rng.standard_normal((n, 4, 5))).astype(np.float32)
    model = Trajectory((4, 5))
    tr = PseudoBootstrap(model)
    feed(tr, model, traj)
    ref = traj.astype(np.float64)
    ref_var = ref.var(axis=0, ddof=1)
    var = tr.var()["layers.0.weight"].double().numpy()
    # Welford's deltas are exact in float32 (Sterbenz); the error comes from the running
    # mean's rounding, which drifts ~sqrt(n/3)*eps*level/2 and biases the variance by its
    # square over the variance: ~1e-3 here. 1e-2 leaves room; the naive formula is off by
    # ~eps*(level/spread)^2 ~ 12 (1200%).
    np.testing.assert_allclose(var, ref_var, rtol=1e-2)
    np.testing.assert_allclose(tr.mean()["layers.0.weight"].double().numpy(), ref.mean(0), rtol=0, atol=np.sqrt(n) * EPS32 * level)
    t32 = torch.from_numpy(traj)
    naive = (t32.square().mean(0) - t32.mean(0).square()) * n / (n - 1)
    assert np.max(np.abs(naive.double().numpy() / ref_var - 1)) > 0.5, "the naive formula should fail here"


def test_welford_float64_long_random_walk():
    rng = np.random.default_rng(1)
    traj = np.cumsum(rng.standard_normal((3000, 3, 2)), axis=0) * 0.01 + 5.0
    model = Trajectory((3, 2), dtype=torch.float64)
    tr = PseudoBootstrap(model)
    feed(tr, model, traj)
    np.testing.assert_allclose(tr.var()["layers.0.weight"].numpy(), traj.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(tr.std()["layers.0.weight"].numpy(), traj.std(0, ddof=1), rtol=1e-10)
    assert tr.count == 3000


def test_ema_matches_documented_weighted_formula():
    rng = np.random.default_rng(2)
    beta, n = 0.9, 50
    traj = rng.standard_normal((n, 2, 3))
    model = Trajectory((2, 3), dtype=torch.float64)
    tr = PseudoBootstrap(model, window="ema", beta=beta)
    feed(tr, model, traj)
    # closed form: x_1 weighs beta^(n-1), x_i (i >= 2) weighs (1-beta) beta^(n-i); weights sum to 1
    w = np.array([beta ** (n - 1)] + [(1 - beta) * beta ** (n - i) for i in range(2, n + 1)])
    assert np.isclose(w.sum(), 1.0)
    m = np.tensordot(w, traj, axes=1)
    v = np.tensordot(w, (traj - m) ** 2, axes=1)
    np.testing.assert_allclose(tr.mean()["layers.0.weight"].numpy(), m, rtol=1e-12)
    np.testing.assert_allclose(tr.var()["layers.0.weight"].numpy(), v, rtol=1e-10)


def test_reset_epoch_and_every_windows():
    rng = np.random.default_rng(3)
    traj = rng.standard_normal((40, 2, 2))
    model = Trajectory((2, 2), dtype=torch.float64)
    since = PseudoBootstrap(model)
    epoch = PseudoBootstrap(model, window="epoch")
    thin = PseudoBootstrap(model, every=3)
    for i, x in enumerate(traj):
        if i % 10 == 0:  # the training loop's epoch contract
            since.new_epoch()
            epoch.new_epoch()
        if i == 20:
            thin.reset()
        model.set(x)
        for t in (since, epoch, thin):
            t.update()
    key = "layers.0.weight"
    np.testing.assert_allclose(since.var()[key].numpy(), traj.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(epoch.var()[key].numpy(), traj[30:].var(0, ddof=1), rtol=1e-10)
    assert epoch.count == 10
    # after the reset at step 20 the thinned tracker records steps 23, 26, ... (1-based)
    np.testing.assert_allclose(thin.mean()[key].numpy(), traj[22::3].mean(0), rtol=1e-12)
    assert thin.count == len(traj[22::3])


def test_tracks_effective_masked_weight(mlp, batch):
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    train_steps(mlp, opt, batch, 5)
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5)
    tr = PseudoBootstrap(mlp)
    tr.attach(opt)
    train_steps(mlp, opt, batch, 10)
    for name, sd in tr.std().items():
        mask = mlp.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight[0].mask
        assert torch.all(sd[mask == 0] == 0)
        assert torch.all(tr.mean()[name][mask == 0] == 0)
        assert torch.all(sd[mask == 1] > 0)


def test_attach_handle_and_keys(mlp, batch):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    tr = PseudoBootstrap(mlp)
    assert tr.names == ["0.weight", "2.weight", "4.weight"]
    handle = tr.attach(opt)
    train_steps(mlp, opt, batch, 4)
    handle.remove()
    train_steps(mlp, opt, batch, 4)
    assert tr.count == 4
    narrow = PseudoBootstrap(mlp, params=["2.weight", "0.bias"])
    assert narrow.names == ["2.weight", "0.bias"]


def test_state_dict_round_trip_resumes_exactly(mlp, batch):
    import copy

    other = copy.deepcopy(mlp)
    opt_a = torch.optim.SGD(mlp.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(other.parameters(), lr=0.1)
    a, b = PseudoBootstrap(mlp, every=2), PseudoBootstrap(other, every=2)
    a.attach(opt_a)
    b.attach(opt_b)
    train_steps(mlp, opt_a, batch, 7)
    train_steps(other, opt_b, batch, 7)
    saved = a.state_dict()
    c = PseudoBootstrap(other, every=2)
    c.load_state_dict(saved)
    c.attach(opt_b)
    train_steps(mlp, opt_a, batch, 9)
    train_steps(other, opt_b, batch, 9)
    assert c.count == a.count == 8
    for k in a.names:
        torch.testing.assert_close(c.var()[k], a.var()[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="every"):
        PseudoBootstrap(mlp, every=3).load_state_dict(saved)


def test_read_before_update_is_a_clear_error(mlp):
    tr = PseudoBootstrap(mlp)
    with pytest.raises(RuntimeError, match="no steps"):
        tr.std()
    tr.update()
    with pytest.raises(RuntimeError, match="at least 2"):
        tr.var()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(window="weekly"), ValueError, "since_reset, epoch, ema"),
        (dict(window="ema"), ValueError, "needs beta"),
        (dict(window="ema", beta=1.0), ValueError, r"beta must be in \(0.0, 1.0\)"),
        (dict(beta=0.9), ValueError, "only used with window='ema'"),
        (dict(every=0), ValueError, "every must be in"),
        (dict(every=2.5), TypeError, "every must be an integer"),
        (dict(params=["9.weight"]), ValueError, "'9.weight' is not a parameter"),
        (dict(params="0.weight"), TypeError, "list of parameter names"),
    ],
)
def test_bad_arguments(mlp, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PseudoBootstrap(mlp, **kwargs)


def test_nothing_to_track_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to prune"):
        PseudoBootstrap(nn.Sequential(nn.ReLU()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    traj = rng.standard_normal((50, 3, 4)).astype(np.float32)
    cpu, gpu = Trajectory((3, 4)), Trajectory((3, 4)).cuda()
    a, b = PseudoBootstrap(cpu), PseudoBootstrap(gpu)
    for x in traj:
        cpu.set(x)
        gpu.set(torch.from_numpy(x).cuda())
        a.update()
        b.update()
    torch.testing.assert_close(b.var()["layers.0.weight"].cpu(), a.var()["layers.0.weight"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("window, beta", [("since_reset", None), ("ema", 0.9)])
def test_grad_moment_matches_numpy(window, beta):
    rng = np.random.default_rng(5)
    grads = rng.standard_normal((30, 2, 3))
    model = Trajectory((2, 3), dtype=torch.float64)
    tr = PseudoBootstrap(model, window=window, beta=beta, grad_moment=True)
    w = model.layers[0].weight
    for g in grads:
        w.grad = torch.from_numpy(g.copy())
        tr.update()
    if window == "ema":  # same weights as the documented EMA: x_1 beta^(n-1), x_i (1-beta) beta^(n-i)
        n = len(grads)
        wts = np.array([beta ** (n - 1)] + [(1 - beta) * beta ** (n - i) for i in range(2, n + 1)])
        mean = np.tensordot(wts, grads, axes=1)
        # Finch's EMA variance equals the same weights applied to squared deviations from the
        # running means; written out as the documented recursion in float64
        var = np.zeros_like(grads[0])
        m = grads[0].copy()
        for g in grads[1:]:
            d = g - m
            m = m + (1 - beta) * d
            var = beta * (var + (1 - beta) * d**2)
    else:
        mean, var = grads.mean(0), grads.var(0, ddof=1)  # the centred (unbiased) gradient variance
    np.testing.assert_allclose(tr.grad_mean()["layers.0.weight"].numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(tr.grad_var()["layers.0.weight"].numpy(), var, rtol=1e-10)
    # the weights' own moments are unaffected by tracking gradients alongside
    assert torch.all(tr.var()["layers.0.weight"] == 0)
