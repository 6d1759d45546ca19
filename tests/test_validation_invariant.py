import numpy as np
import pytest
import torch
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from mustat.training import train_epochs
from validation.designs import get_design
from validation.invariant import (
    StackedMLP,
    TargetTracker,
    coverage_table,
    delta_references,
    forward,
    match_to,
    permute,
    targets,
)

D, H, K = 3, 4, 1


def _net(seed):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, K)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_stacked_students_train_exactly_as_separate_fits():
    design = get_design("teacher-regression")
    data = [design.sample(r) for r in range(3)]
    X = torch.tensor(np.stack([a[0] for a in data]).transpose(1, 0, 2), dtype=torch.float32)
    y = torch.tensor(np.stack([a[1] for a in data]).T.copy(), dtype=torch.float32)
    stack = StackedMLP([design.model(10 + r) for r in range(3)])
    opt = torch.optim.Adam(stack.parameters(), lr=0.01, weight_decay=1e-3)
    train_epochs(stack, opt, (X, y), epochs=2, batch_size=32, generator=torch.Generator().manual_seed(5),
                 loss=design.stacked_loss())
    for r in range(3):
        single = design.model(10 + r)
        opt = torch.optim.Adam(single.parameters(), lr=0.01, weight_decay=1e-3)
        train_epochs(single, opt, (X[:, r], y[:, r]), epochs=2, batch_size=32,
                     generator=torch.Generator().manual_seed(5), loss=design.loss())
        torch.testing.assert_close(stack.flat()[r], _flat(single), rtol=0, atol=2e-5)


def test_stacked_mlp_refuses_networks_it_cannot_stack():
    with pytest.raises(ValueError, match="StackedMLP stacks"):
        StackedMLP([nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))])


def test_targets_are_the_output_and_gauge_invariant():
    net = _net(0)
    theta = _flat(net)[None]
    X_test = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = targets(theta, X_test, D, H, K)
    torch.testing.assert_close(g["f"][0], net(X_test).detach().flatten())
    # rescale every unit by its own c > 0 (the ReLU orbit): f, path and balanced weights do not move
    c = torch.tensor([0.3, 2.0, 1.7, 0.9], dtype=torch.float64)
    with torch.no_grad():
        net[0].weight.mul_(c[:, None])
        net[0].bias.mul_(c)
        net[2].weight.div_(c[None])
    g2 = targets(_flat(net)[None], X_test, D, H, K)
    for key in ("f", "path", "unit", "weight"):
        torch.testing.assert_close(g2[key], g[key], rtol=1e-12, atol=1e-12)
    # the unit contributions sum to f minus the output bias
    torch.testing.assert_close(g["unit"].view(5, K, H).sum(-1).flatten(), g["f"][0] - net[2].bias.detach().repeat(5))
    # balanced: |w_in|^2 + b^2 = |w_out|^2 per unit, and the path weights are w_out_j w_in_jk
    W1, b1, W2 = g["weight"][0, :H * D].view(H, D), g["weight"][0, H * D:H * D + H], g["weight"][0, H * D + H:-K]
    torch.testing.assert_close(W1.square().sum(1) + b1.square(), W2.square(), rtol=1e-12, atol=0)
    path = torch.einsum("j,jk->jk", net[2].weight[0].detach(), net[0].weight.detach())
    torch.testing.assert_close(g["path"][0], path.flatten())


def test_match_and_permute_undo_a_permutation_of_the_units():
    net = _net(2)
    theta = _flat(net)
    perm = torch.tensor([2, 0, 3, 1])
    W1, b1, W2, b2 = theta.split([H * D, H, K * H, K])
    shuffled = torch.cat([W1.view(H, D)[perm].flatten(), b1[perm], W2.view(K, H)[:, perm].flatten(), b2])[None]
    found = match_to(shuffled, theta, D, H, K)
    X_test = torch.randn(4, D, dtype=torch.float64)
    g, gs = targets(theta[None], X_test, D, H, K), targets(shuffled, X_test, D, H, K)
    for key in ("f", "path", "unit", "weight"):
        torch.testing.assert_close(permute(key, gs[key], found, d=D, h=H, k=K, m=4), g[key])


def test_tracker_batch_means_and_window_sd_match_numpy():
    stack = StackedMLP([_net(s).float() for s in range(2)])
    X_test = torch.randn(3, D, dtype=torch.float64)
    tracker = TargetTracker(stack, X_test, batch_steps=4)
    g = torch.Generator().manual_seed(3)
    history = []
    for _ in range(26):                                   # 6 complete batches and 2 steps left over
        with torch.no_grad():
            for p in stack.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        tracker.update()
        history.append(targets(stack.flat().detach().double(), X_test, D, H, K))
    res = tracker.result(n=100, batch_size=10)
    for key in ("f", "path", "unit", "weight"):
        traj = torch.stack([h[key] for h in history]).numpy()           # (T, R, q)
        bm = traj[:24].reshape(6, 4, *traj.shape[1:]).mean(1)
        se = np.sqrt(4 * bm.var(0, ddof=1) * 10 / 100)
        np.testing.assert_allclose(res[key]["bm_se"].numpy(), se, rtol=1e-9)
        np.testing.assert_allclose(res[key]["sd"].numpy(), traj.std(0, ddof=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res[key]["mean"].numpy(), traj.mean(0), rtol=1e-12, atol=1e-12)
    assert int(res["f"]["dof"]) == 5


def test_delta_references_match_autograd_and_numpy():
    # the closed-form Hessian and per-sample scores against a generic autograd Hessian, and the
    # delta-method algebra in numpy float64
    torch.manual_seed(0)
    R, n, wd = 2, 60, 1e-2
    nets = [_net(10 + r) for r in range(R)]
    theta = torch.stack([_flat(m) for m in nets])
    X = torch.randn(R, n, D, dtype=torch.float64)
    y = torch.randn(R, n, dtype=torch.float64)
    X_test = torch.randn(4, D, dtype=torch.float64)
    loss = get_design("teacher-regression").loss()
    refs = delta_references(theta, X, y, loss, X_test, d=D, h=H, k=K, weight_decay=wd)
    for r in range(R):
        def objective(t, r=r):
            return loss(forward(t, X[r], D, H, K), y[r]) + wd / 2 * t.square().sum()

        Hm = torch.autograd.functional.hessian(objective, theta[r]).numpy()
        scores = np.stack([torch.autograd.functional.jacobian(
            lambda t, i=i, r=r: loss(forward(t, X[r, i:i + 1], D, H, K), y[r, i:i + 1]) + wd / 2 * t.square().sum(),
            theta[r]).numpy() for i in range(n)])
        Hinv = np.linalg.inv(Hm)
        V = Hinv @ (scores.T @ scores / n) @ Hinv / n
        jac_f = torch.autograd.functional.jacobian(lambda t: forward(t, X_test, D, H, K).flatten(), theta[r]).numpy()
        np.testing.assert_allclose(refs["sandwich"]["f"][r].numpy(), np.sqrt(np.einsum("qp,ps,qs->q", jac_f, V, jac_f)),
                                   rtol=1e-8)
        with np.errstate(invalid="ignore"):          # a random point is no minimum: NaN where H^-1 < 0
            np.testing.assert_allclose(refs["observed"]["raw"][r].numpy(), np.sqrt(np.diag(Hinv) / n), rtol=1e-8)
        jac_u = torch.autograd.functional.jacobian(
            lambda t: targets(t[None], X_test, D, H, K, weights=False)["unit"][0], theta[r]).numpy()
        np.testing.assert_allclose(refs["sandwich"]["unit"][r].numpy(),
                                   np.sqrt(np.einsum("qp,ps,qs->q", jac_u, V, jac_u)), rtol=1e-8)
        # the balanced weights through the balancing map's own Jacobian (not the identity)
        jac_b = torch.autograd.functional.jacobian(lambda t: targets(t[None], X_test, D, H, K)["weight"][0],
                                                   theta[r]).numpy()
        assert np.abs(jac_b - np.eye(len(jac_b))).max() > 0.1
        np.testing.assert_allclose(refs["sandwich"]["weight"][r].numpy(),
                                   np.sqrt(np.einsum("qp,ps,qs->q", jac_b, V, jac_b)), rtol=1e-8)
        jac_p = torch.autograd.functional.jacobian(
            lambda t: targets(t[None], X_test, D, H, K, weights=False)["path"][0], theta[r]).numpy()
        np.testing.assert_allclose(refs["sandwich"]["path"][r].numpy(),
                                   np.sqrt(np.einsum("qp,ps,qs->q", jac_p, V, jac_p)), rtol=1e-8)


def test_coverage_table_wilson_and_infinite_se():
    rng = np.random.default_rng(0)
    centre = rng.standard_normal(400)
    se = np.ones(400)
    se[:10] = np.inf                                   # never covered, though an infinite interval holds all
    out = coverage_table(centre, se, np.zeros(400))
    hits = int((np.abs(centre[10:]) <= 1.959963984540054).sum())
    assert out["coverage"] == hits / 400
    lo, hi = proportion_confint(hits, 400, method="wilson")
    assert out["lo"] == pytest.approx(lo, abs=1e-12) and out["hi"] == pytest.approx(hi, abs=1e-12)
    t = coverage_table(centre[10:], se[10:], np.zeros(390), dof=5)   # Student-t quantile 2.571
    assert t["coverage"] == (np.abs(centre[10:]) <= 2.5705818366147395).mean()
