"""Closed-form Hessians of one-hidden-layer ReLU networks (mustat.uncertainty.newton) against
torch.func.hessian on the same stacked problems, timed in the same run; prints the speed-up and
the largest difference (the two must agree to rounding).

    .venv/bin/python benchmarks/newton_hessian.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.func import functional_call, hessian, vmap
from torch.nn import functional as F

from validation import newton as N


def best_of(fn, args: tuple, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.problems} stacked problems of n = {args.n} samples, float64, one thread; best of {args.repeats}")
    print(f"{'network':>12} {'params':>7} {'torch.func s':>13} {'closed form s':>14} {'speed-up':>9} {'max |diff|':>11}")
    for d, h, k in ((6, 8, 1), (10, 16, 3), (64, 8, 10)):
        compare(d, h, k, args)


def compare(d: int, h: int, k: int, args) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k)).double()
    X = torch.randn(args.problems, args.n, d, dtype=torch.float64)
    if k == 1:
        y = torch.randn(args.problems, args.n, dtype=torch.float64)

        def loss(o, t):
            return 0.5 * (o.squeeze(-1) - t).square().mean()
    else:
        y = torch.randint(k, (args.problems, args.n))

        def loss(o, t):
            return F.cross_entropy(o, t)
    work, buffers, _, unflatten, theta0 = N._functional(model)
    theta = theta0.expand(args.problems, -1).clone()

    def objective(th, xb, yb):
        return loss(functional_call(work, (unflatten(th), buffers), (xb,)), yb) + 0.5e-2 * th.square().sum()

    generic = vmap(hessian(objective))
    closed = N._mlp_hessian(loss, d, h, k, 1e-2)
    data = (theta, X, y)
    diff = float((generic(*data) - closed(*data)).abs().max())
    t_generic = best_of(generic, data, args.repeats)
    t_closed = best_of(closed, data, args.repeats)
    print(f"{f'{d}-{h}-{k}':>12} {len(theta0):>7} {t_generic:>13.3f} {t_closed:>14.3f} "
          f"{t_generic / t_closed:>8.1f}x {diff:>11.1e}")

if __name__ == "__main__":
    main()
