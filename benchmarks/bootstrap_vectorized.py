"""Vectorized bootstrap (B replicates trained as one batched model) against a
sequential loop of B fits, same resamples, epochs and optimizer, in one run.

    python benchmarks/bootstrap_vectorized.py [--B 200] [--epochs 2] [--threads N]

Goal: at least 25x on CPU for B = 200 replicates of a small MLP on digits.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from mustat.data import load
from mustat.uncertainty.bootstrap import bootstrap_replicates
from validation.bootstrap import bootstrap_replicates_loop


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load("digits")
    X, y = data.X_train.flatten(1), data.y_train
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    loss = nn.functional.cross_entropy
    kw = dict(B=args.B, epochs=args.epochs, lr=1e-2, batch_size=args.batch_size, optimizer="adam", seed=0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; MLP 64-{args.hidden}-10 on digits "
          f"(n={len(y)}), B={args.B}, {args.epochs} epochs, batch {args.batch_size}, Adam")
    # warm-up: the first vmap call imports and initialises torch.func (~1 s, once per process)
    bootstrap_replicates(model, loss, (X[:8], y[:8]), B=2, epochs=1, lr=1e-2, batch_size=4)
    bootstrap_replicates_loop(model, loss, (X[:8], y[:8]), B=2, epochs=1, lr=1e-2, batch_size=4)
    t0 = time.perf_counter()
    fast = bootstrap_replicates(model, loss, (X, y), **kw)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = bootstrap_replicates_loop(model, loss, (X, y), **kw)
    t_slow = time.perf_counter() - t0
    diff = max(float((fast.params[k] - slow[k]).abs().max()) for k in fast.params)
    print(f"vectorized {t_fast:7.2f} s")
    print(f"loop       {t_slow:7.2f} s")
    print(f"speed-up   {t_slow / t_fast:7.1f}x   (max |difference| between the two: {diff:.2e})")


if __name__ == "__main__":
    main()
