"""K-FAC on PyTorch's MNIST-example CNN (conv1 1->32 3x3, conv2 32->64 3x3, max-pool 2,
dropout, fc1 9216->128, fc2 128->10, log_softmax; 1.2M weights) on MNIST-5k: one training
epoch (Adadelta, batch 64) against ``kfac``'s fit (nll_loss, damping 1e-4) in the same run.
Prints the estimate made before the fit, the seconds of each, their ratio and the process's
peak resident memory.

    OMP_NUM_THREADS=2 python benchmarks/kfac_cnn.py [--threads 2] [--estimator kfac] [--pass-dtype model]
        [--save se.pt | --reference se.pt] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

from mustat.data import load
from mustat.models import torch_example
from mustat.uncertainty import FitContext, make_estimator


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)   # ru_maxrss is in KiB on Linux


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimator", default="kfac")
    ap.add_argument("--pass-dtype", default="float64", choices=["float64", "model"])
    ap.add_argument("--save", help="save the SEs here (torch.save)")
    ap.add_argument("--reference", help="SEs saved by --save: print the largest relative difference")
    ap.add_argument("--profile", action="store_true", help="print the fit's 15 costliest functions (cProfile)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load("mnist5k")
    X, y = data.X_train.float(), data.y_train
    model = nn.Sequential(*torch_example((1, 28, 28), 10), nn.LogSoftmax(1))
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(0)

    model.train()
    t0 = time.perf_counter()
    for idx in torch.randperm(len(y), generator=gen).split(64):
        opt.zero_grad()
        F.nll_loss(model(X[idx]), y[idx]).backward()
        opt.step()
    t_epoch = time.perf_counter() - t0
    print(f"one training epoch (Adadelta, batch 64, {len(y)} rows, {args.threads} threads): {t_epoch:.1f} s; "
          f"peak RSS so far {peak_gib():.2f} GiB")

    extra = {} if args.pass_dtype == "float64" else {"pass_dtype": args.pass_dtype}
    est = make_estimator(args.estimator, model, damping=1e-4, **extra)
    ctx = FitContext(X=X, y=y, loss=F.nll_loss, optimizer=opt)
    cost = getattr(est, "cost", None)
    if cost is not None:
        print("estimate before the fit:", cost(ctx))
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    se = est.fit(ctx).se()
    if prof:
        prof.disable()
    t_fit = time.perf_counter() - t0
    print(f"{args.estimator} fit: {t_fit:.1f} s = {t_fit / t_epoch:.2f} training epochs; "
          f"peak RSS {peak_gib():.2f} GiB")
    for n, v in se.items():
        print(f"  {n}: se min {float(v.min()):.4g}, median {float(v.median()):.4g}, max {float(v.max()):.4g}, "
              f"{v.unique().numel()} distinct of {v.numel()}")
    if args.save:
        torch.save(se, args.save)
    if args.reference:
        ref = torch.load(args.reference)
        rel = torch.cat([((se[n].double() - ref[n].double()).abs() / ref[n].double()).flatten() for n in se])
        print(f"relative SE difference from {args.reference}: median {float(rel.median()):.2e}, "
              f"largest {float(rel.max()):.2e}")
        # what mu ranks by: |w| / se, over all weights (ties are rare: a rank correlation of the SEs)
        a = torch.cat([se[n].double().flatten() for n in se])
        b = torch.cat([ref[n].double().flatten() for n in se])
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        print(f"Spearman correlation of the SEs with the reference: {float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]):.4f}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
