"""Why a pruned model is (not) faster: structured against unstructured, at equal weights removed.

    python benchmarks/structured_vs_sparse.py [--threads N] [--min-run-time S]

For LeNet-300-100 and LeNet-5 (28x28 inputs, 10 classes, seeded random weights) and a removal of
75% and 94% of the multiply-accumulates, prints the CPU latency over the dense model's at batch 1
and 128 of (a) channels removed by ``mustat.prune_channels`` (group magnitude, Torch-Pruning
surgery: a smaller dense model) and (b) the same *number* of weights removed unstructured by
layer-wise magnitude, run through ``mustat.sparse_inference`` (CSR Linear layers; convolutions stay
dense). All models are timed alternately in the same run (medians of
``torch.utils.benchmark``'s blocked_autorange), so the ratios share the machine's load.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.benchmark import Timer

import mustat
from mustat.models import build
from mustat.structured import count, prune_channels


def median(model, x, min_run_time):
    with torch.no_grad():
        return Timer("m(x)", globals=dict(m=model, x=x)).blocked_autorange(min_run_time=min_run_time).median


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--min-run-time", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, threads {torch.get_num_threads()}")
    print("| model | MACs removed | weights removed | structured: batch 1 / batch 128 | "
          "unstructured CSR: batch 1 / batch 128 |")
    print("| --- | --- | --- | --- | --- |")
    x1 = torch.zeros(1, 1, 28, 28)
    for name, label in (("mlp", "LeNet-300-100"), ("lenet5", "LeNet-5")):
        for speedup in (4.0, 16.0):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                dense = build(name, (1, 28, 28), 10).eval()
            small = build(name, (1, 28, 28), 10).eval()
            small.load_state_dict(dense.state_dict())
            prune_channels(small, x1, "magnitude", speedup=speedup)
            n_dense, n_small = count(dense, x1)[1], count(small, x1)[1]
            share = 1 - n_small / n_dense
            sparse = build(name, (1, 28, 28), 10).eval()
            sparse.load_state_dict(dense.state_dict())
            mustat.prune(sparse, mustat.score(sparse, "magnitude"), sparsity=min(share, 0.999), scope="layer")
            csr = mustat.sparse_inference(sparse)
            ratios = []
            for batch in (1, 128):
                x = torch.zeros(batch, 1, 28, 28)
                t = {k: median(m, x, args.min_run_time) for k, m in (("dense", dense), ("small", small),
                                                                      ("csr", csr))}
                ratios.append((t["dense"] / t["small"], t["dense"] / t["csr"], t))
            (s1, c1, t1), (s128, c128, t128) = ratios
            print(f"| {label} | {1 - 1 / speedup:.0%} | {share:.0%} | **{s1:.2f}x** / **{s128:.2f}x** faster "
                  f"({t1['small'] * 1e6:.0f} / {t128['small'] * 1e6:.0f} us) | {c1:.2f}x / {c128:.2f}x faster "
                  f"({t1['csr'] * 1e6:.0f} / {t128['csr'] * 1e6:.0f} us; dense {t1['dense'] * 1e6:.0f} / "
                  f"{t128['dense'] * 1e6:.0f} us) |")


if __name__ == "__main__":
    main()
