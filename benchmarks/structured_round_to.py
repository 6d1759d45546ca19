"""Channel widths and latency: mustat's global ranking with and without ``round_to``, against
Torch-Pruning's uniform pruning, at equal multiply-accumulates.

    python benchmarks/structured_round_to.py [--threads N] [--speedups 2 4] [--min-run-time S]

On the repository's VGG-style CNN (``mustat.models.vgg``, 3x32x32 inputs, 10 classes, seeded
random weights; synthetic standard errors ``0.05 + U(0, 1)`` for the Wald statistic) and for each
MAC speed-up:

(c) Torch-Pruning's ``MetaPruner`` (group magnitude, ``global_pruning=False``, ``round_to=8``,
    the output layer ignored), its ``pruning_ratio`` bisected to the smallest MAC count at or
    under ``dense / speedup``; its MACs are the target of the others;
(a) ``mustat.structured.prune_channels(importance=..., target_macs=...)``, ``round_to=None``,
    for ``"wald"`` (per MAC, synthetic SEs) and ``"magnitude"`` (global group L2);
(b) the same with ``round_to=8``.

Prints each model's widths, MACs, search time (median of 3 calls: mustat's ``prune_channels``; Torch-
Pruning's pruner built and stepped at the found ratio; and, for (a), the old search that counted
every bisection step, and each group's per-MAC cost for ``wald``, on a deep copy of the model) and its median latency at batch 1 and 64 over
(c)'s. All models are timed alternately in the same run (``mustat.structured.timing.latency``,
median of ``repeats`` rounds), so the ratios share the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from unittest import mock

import torch
import torch_pruning as tp
from torch import nn

from mustat.models import build
from mustat.structured import count, latency, prune_channels, surgery, unit_statistics
from mustat.structured.macs import Unsupported

SHAPE = (3, 32, 32)


def dense_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build("vgg", SHAPE, 10).eval()


def stats_of(model: nn.Module):
    g = torch.Generator().manual_seed(1)
    se = {n: 0.05 + torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    return unit_statistics(model, se)


def tp_prune(model: nn.Module, x, ratio: float) -> nn.Module:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=False, round_to=8, ignored_layers=[last])
    pruner.step()
    return model


def tp_uniform(dense: nn.Module, x, target: int) -> tuple[nn.Module, float, float]:
    """Torch-Pruning at the smallest ratio whose MACs are <= target (bisection), and its time."""
    lo, hi = 0.0, 0.99
    for _ in range(20):
        mid = (lo + hi) / 2
        if count(tp_prune(copy.deepcopy(dense), x, mid), x)[0] <= target:
            hi = mid
        else:
            lo = mid
    took = []
    for _ in range(3):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        tp_prune(model, x, hi)
        took.append(time.perf_counter() - t0)
    return model, hi, statistics.median(took)


def widths(model: nn.Module) -> str:
    out = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
           for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return "/".join(map(str, out[:-1]))        # the output layer is never pruned


def mustat_prune(dense, x, target, round_to, importance="wald", old_search=False, calls=3):
    """The pruned model and the median seconds of ``calls`` calls of ``prune_channels``."""
    took = []
    for _ in range(calls):
        model, t = _mustat_prune(dense, x, target, round_to, importance, old_search)
        took.append(t)
    return model, statistics.median(took)


def _mustat_prune(dense, x, target, round_to, importance, old_search):
    model = copy.deepcopy(dense)
    st = stats_of(model) if importance == "wald" else None
    ctx = contextlib.ExitStack()
    if old_search:      # before: a cut copy per bisection step and per group's channel cost
        for module in (surgery, sys.modules["mustat.structured.groups"]):
            ctx.enter_context(mock.patch.object(module, "MacModel", side_effect=Unsupported("old search")))
    with ctx:
        t0 = time.perf_counter()
        prune_channels(model, x, importance, target_macs=target, stats=st, round_to=round_to)
        return model, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    ap.add_argument("--speedups", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--importances", nargs="+", default=["wald", "magnitude"])
    ap.add_argument("--round-to", type=int, default=8, help="mustat's round_to in (b); Torch-Pruning's stays 8")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torch-pruning {tp.__version__}, CPU, threads {args.threads}")
    x1 = torch.zeros(1, *SHAPE)
    dense = dense_model()
    macs0 = count(dense, x1)[0]
    print(f"dense VGG: {macs0:,} MACs, widths {widths(dense)}")
    for speedup in args.speedups:
        tpm, ratio, t_tp = tp_uniform(dense, x1, int(macs0 / speedup))
        target = count(tpm, x1)[0]
        models, search = {"(c) TP uniform, round_to=8": tpm}, {"(c) TP uniform, round_to=8": t_tp}
        for imp in args.importances:
            for tag, rt in (("(a)", None), ("(b)", args.round_to)):
                key = f"{tag} mustat {imp}, round_to={rt}"
                models[key], search[key] = mustat_prune(dense, x1, target, rt, imp)
        _, t_old = mustat_prune(dense, x1, target, None, args.importances[0], old_search=True)
        print(f"\nMAC speed-up {speedup:g} asked, {macs0 / target:.2f} reached by TP (pruning_ratio {ratio:.4f}): "
              f"target {target:,} MACs; the old copy-per-step search for (a) {args.importances[0]}: "
              f"{t_old:.2f} s ({t_old / t_tp:.1f}x TP's call)")
        print("| model | widths | MACs | search s (x TP) | " +
              " | ".join(f"batch {bt}: ms (x TP)" for bt in args.batches) + " |")
        print("| --- | --- | --- | --- | " + " | ".join("---" for _ in args.batches) + " |")
        times = {k: {bt: [] for bt in args.batches} for k in models}
        for bt in args.batches:
            x = torch.randn(bt, *SHAPE)
            for _ in range(args.repeats):
                for k, m in models.items():
                    times[k][bt].append(latency(m, x, threads=args.threads, min_run_time=args.min_run_time))
        ref = {bt: statistics.median(times["(c) TP uniform, round_to=8"][bt]) for bt in args.batches}
        for k, m in models.items():
            cells = []
            for bt in args.batches:
                t = statistics.median(times[k][bt])
                cells.append(f"{t * 1e3:.2f} ({t / ref[bt]:.2f}x)")
            print(f"| {k} | {widths(m)} | {count(m, x1)[0]:,} | {search[k]:.2f} ({search[k] / t_tp:.1f}x) | "
                  + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
