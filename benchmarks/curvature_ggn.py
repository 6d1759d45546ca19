"""The curvature SE's Gauss-Newton diagonal (mustat.uncertainty.curvature.ggn_diagonal): the
outer-product rule for linear layers (``method="auto"``) against per-sample vector-Jacobian
products for every weight (``method="vmap"``), timed in the same run on the benchmark's models;
prints the speed-up and the largest relative difference (the two are the same formula).

    .venv/bin/python benchmarks/curvature_ggn.py
"""

from __future__ import annotations

import argparse
import time

import torch

from mustat.data import load
from mustat.models import build, loss_fn
from mustat.uncertainty.curvature import ggn_diagonal

CASES = (("mnist5k", "mlp"), ("mnist5k", "lenet5"), ("mnist1d", "mlp"), ("mnist1d", "cnn1d"),
         ("mnist5k", "torch-example"))


def best_of(fn, repeats: int) -> tuple[float, dict]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="training samples the diagonal sums over")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"n = {args.n} samples, float32, one thread, every parameter; best of {args.repeats}")
    print(f"{'dataset / model':>24} {'params':>9} {'vmap s':>8} {'auto s':>8} {'speed-up':>9} {'max rel diff':>13}")
    for dataset, model_name in CASES:
        compare(dataset, model_name, args)


def compare(dataset: str, model_name: str, args) -> None:
    data = load(dataset, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build(model_name, data.input_shape, data.n_classes)
    X, y = data.X_train[: args.n], data.y_train[: args.n]
    names = [n for n, _ in model.named_parameters()]

    def loss(o, t):
        return loss_fn(model, o, t)

    t_ref, ref = best_of(lambda: ggn_diagonal(model, loss, (X, y), names=names, method="vmap"), args.repeats)
    t_new, new = best_of(lambda: ggn_diagonal(model, loss, (X, y), names=names), args.repeats)
    diff = max(float((new[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)) for n in names)
    size = sum(p.numel() for p in model.parameters())
    print(f"{dataset + ' / ' + model_name:>24} {size:>9,} {t_ref:>8.3f} {t_new:>8.3f} {t_ref / t_new:>8.1f}x "
          f"{diff:>13.1e}", flush=True)


if __name__ == "__main__":
    main()
