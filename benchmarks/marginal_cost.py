"""What the marginal estimators cost on LeNet-300-100 (MNIST-5k, 4,500 training rows), against
one training epoch timed in the same run, and K-FAC against curvlinops' KFACLinearOperator
(the same factors; its float64 eigendecomposition and inverse diagonal added so both return
the same numbers). Prints seconds (min of ``--repeats``) and ratios.

    python benchmarks/marginal_cost.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import mustat
from mustat.data import load
from mustat.models import build
from mustat.training import train_epochs
from mustat.uncertainty import FitContext, make_estimator


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load("mnist5k")
    X, y = data.X_train, data.y_train
    model = build("mlp", tuple(X.shape[1:]), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)

    def epoch(estimators=()):
        train_epochs(model, opt, (X, y), epochs=1, batch_size=64, generator=gen, loss=F.cross_entropy,
                     estimators=list(estimators), track_epochs=1)

    epoch()                                   # warm-up, and a trained point to measure at
    t_epoch = best(epoch, args.repeats)
    wf = make_estimator("woodfisher", model, gradients=64)
    t_wf = best(lambda: epoch([wf]), args.repeats)
    ctx = FitContext(X=X, y=y, loss=F.cross_entropy, weight_decay=1e-4, batch_size=64)
    print(f"one training epoch (Adam, batch 64, {len(y)} rows): {t_epoch:.3f} s")
    print(f"  with woodfisher's ring buffer (64 gradients): {t_wf:.3f} s = {t_wf / t_epoch:.3f}x a plain epoch")
    rows = [("curvature (diagonal GGN)", "curvature", {}), ("kfac", "kfac", {}), ("ekfac (a second data pass)", "ekfac", {}),
            ("block (256 samples, blocks of 128)", "block", {"samples": 256}), ("woodfisher fit (64 gradients)", None, {})]
    for label, name, opts in rows:
        est = wf if name is None else make_estimator(name, model, **opts)
        t = best(lambda est=est: est.fit(ctx), args.repeats)
        print(f"{label:40s} fit {t:.3f} s = {t / t_epoch:.2f} training epochs")
    # where block's time goes: its 256 per-sample gradients alone, and the blocks' 2 m P b flops
    from mustat._functional import FunctionalModel
    from mustat.uncertainty.marginal import per_sample_gradients
    blk = make_estimator("block", model, samples=256)
    fm = FunctionalModel(model, dtype=torch.float64, device="cpu")
    rows256 = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:256]
    t_psg = best(lambda: per_sample_gradients(fm, list(blk.names), F.cross_entropy, X[rows256].double(), y[rows256]),
                 args.repeats)
    P = sum(model.get_parameter(n).numel() for n in blk.names)
    print(f"{'  of which 256 per-sample gradients':40s}     {t_psg:.3f} s; forming the blocks is 2 m P b = "
          f"{2 * 256 * P * 128 / 1e9:.1f} GFLOP")
    # the compensating update alone (fit outside the timing), one-shot to 90%, on copies of the model
    state = model.state_dict()
    for block in ("row", "layer"):
        times = []
        for _ in range(args.repeats):
            copy = build("mlp", tuple(X.shape[1:]), 10)
            copy.load_state_dict(state)
            est = make_estimator("kfac", copy, obs_block=block).fit(ctx)
            scores = mustat.score(copy, "obs", se=est.se())
            t0 = time.perf_counter()
            mustat.prune(copy, scores, sparsity=0.9, update=est)
            times.append(time.perf_counter() - t0)
        print(f"{'kfac OBS prune + update, ' + block + ' blocks':40s}     {min(times):.3f} s = "
              f"{min(times) / t_epoch:.2f} training epochs")
    try:
        import curvlinops
    except ImportError:
        print("curvlinops not installed: no peer comparison")
        return
    kfac = make_estimator("kfac", model)
    t_ours = best(lambda: kfac.fit(ctx), args.repeats)
    ours = kfac.se()

    def peer():
        # curvlinops in float64 on a float64 copy, then the same exact damped inverse diagonal
        m64 = build("mlp", tuple(X.shape[1:]), 10).double()
        m64.load_state_dict(model.state_dict())
        op = curvlinops.KFACLinearOperator(m64, nn.CrossEntropyLoss(reduction="sum"), list(m64.parameters()),
                                           [(X.double(), y)], fisher_type="type-2", kfac_approx="expand",
                                           separate_weight_and_bias=False, check_deterministic=False)
        op.compute_kronecker_factors()
        out = {}
        d = len(y) * 1e-4
        for name, mod in m64.named_modules():
            if isinstance(mod, nn.Linear):
                a, qa = torch.linalg.eigh(op._input_covariances[name])
                b, qb = torch.linalg.eigh(op._gradient_covariances[name])
                full = qb.square() @ (1 / (b.clamp_min(0)[:, None] * a.clamp_min(0)[None] + d)) @ qa.square().T
                out[f"{name}.weight"] = full[:, : mod.in_features].sqrt()
        return out

    t_peer = best(peer, args.repeats)
    theirs = peer()
    err = max(float(((ours[n].double() - theirs[n]).abs() / theirs[n]).max()) for n in ours)
    print(f"kfac {t_ours:.3f} s vs curvlinops 3.0.1 KFAC + the same inverse diagonal {t_peer:.3f} s: "
          f"{t_ours / t_peer:.2f}x its time; max relative difference of the SEs {err:.2e}")


if __name__ == "__main__":
    main()
