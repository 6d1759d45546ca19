"""Data-parallel training: one process against N torchrun ranks, same run, same seeds.

    python benchmarks/ddp_scaling.py [--nproc 2] [--dataset mnist5k] [--model mlp] [--epochs 6]

Runs ``mustat prune`` once in a single process (all threads) and once under
``torchrun --nproc-per-node N`` (gloo on CPU, ``OMP_NUM_THREADS`` = threads / N per
rank), then prints both wall times and how far the two results agree: the
largest difference in test accuracy and loss, and whether every final mask is
identical (the masks are computed on each rank and broadcast from rank 0; the
weights differ only by float32 reduction order).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def run(cmd, env):
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    common = ["prune", "--dataset", args.dataset, "--model", args.model, "--criteria", "mu,magnitude",
              "--se", "pseudo", "--epochs", str(args.epochs), "--retrain-epochs", str(max(1, args.epochs // 3)),
              "--track-epochs", str(max(1, args.epochs // 3)), "--target-sparsity", "0.9", "--seeds", "0",
              "--device", "cpu", "--quiet"]
    tmp = Path(tempfile.mkdtemp())
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t1 = run([sys.executable, "-m", "mustat", *common, "--out", str(tmp / "one")], env)
    env_n = dict(env, OMP_NUM_THREADS=str(max(1, threads // args.nproc)))
    tn = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
              "-m", "mustat", *common, "--out", str(tmp / "n")], env_n)
    one, n = pd.read_csv(tmp / "one" / "results.csv"), pd.read_csv(tmp / "n" / "results.csv")
    same_masks = True
    for path in sorted((tmp / "one" / "checkpoints").glob("seed0-*.pt")):
        if path.name.endswith("dense.pt"):
            continue
        a = torch.load(path)["model"]
        b = torch.load(tmp / "n" / "checkpoints" / path.name)["model"]
        same_masks &= all(torch.equal(a[k], b[k]) for k in a if k.endswith(".mask"))
    print(f"torch {torch.__version__}, CPU, {threads} threads; {args.dataset} / {args.model}, {args.epochs} dense epochs")
    print(f"1 process: {t1:.1f} s wall; {args.nproc} gloo ranks ({env_n['OMP_NUM_THREADS']} thread each): "
          f"{tn:.1f} s wall; ratio {tn / t1:.2f}x")
    print(f"max |test accuracy difference| {abs(one.test_accuracy - n.test_accuracy).max():.4f}, "
          f"max relative test-loss difference {(abs(one.test_loss - n.test_loss) / one.test_loss).max():.2e}, "
          f"identical masks: {same_masks}")


if __name__ == "__main__":
    main()
