"""Network-level false discovery rate of Wald pruning on a planted sparse teacher.

A student's null weights are planted when the teacher has inputs that feed no unit
(:func:`validation.designs.get_design` ``"teacher-sparse"``): every first-layer weight from
such an input is 0 at the teacher's optimum in any gauge and unit order (at another local optimum
it need not be). :func:`outcome` runs
:func:`mustat.prune_fdr` (Benjamini-Hochberg over every weight of the network) on one
replicate of a :class:`validation.invariant.StackedMLP` with an estimator's estimates and
SEs and counts what it kept: a *discovery* is a kept weight, a *false* one a kept null.
:func:`summary` gives the realised FDR, the mean of the false discovery proportions over
datasets (what BH controls, with ``FDP = 0`` where nothing is kept), the pooled share of
false discoveries with a Wilson interval, and the power (the share of non-null weights
kept).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from mustat import prune_fdr, wald
from mustat._params import mask_of
from validation.invariant import StackedMLP
from validation.metrics import wilson

#: the stacked model's tensors and a plain ``nn.Sequential(Linear, act, Linear)``'s
NAMES = {"first.weight": "0.weight", "second.weight": "2.weight"}


def replicate(stack: StackedMLP, values: dict[str, Tensor], r: int) -> dict[str, Tensor]:
    """Replicate ``r``'s share of stacked per-weight ``values`` (an estimate or SEs), under the
    plain network's names: ``"0.weight" (h, d)``, ``"2.weight" (k, h)``."""
    out = {}
    for name, plain in NAMES.items():
        v = values[name]
        rows = v.shape[0] // stack.replicates
        out[plain] = v[r * rows:(r + 1) * rows]
    return out


def unstack(stack: StackedMLP, r: int) -> nn.Sequential:
    """Replicate ``r`` of ``stack`` as a plain float32 network (weights and biases copied)."""
    d, h, k = stack.d, stack.h, stack.k
    net = nn.Sequential(nn.Linear(d, h), type(stack.act)(), nn.Linear(h, k))
    with torch.no_grad():
        net[0].weight.copy_(stack.first.weight[r * h:(r + 1) * h])
        net[0].bias.copy_(stack.first.bias[r * h:(r + 1) * h])
        net[2].weight.copy_(stack.second.weight[r * k:(r + 1) * k])
        net[2].bias.copy_(stack.second.bias[r * k:(r + 1) * k])
    return net


def outcome(net: nn.Module, estimate: dict[str, Tensor], se: dict[str, Tensor], null: dict[str, Tensor], *,
            fdr: float = 0.05, dof: float | None = None) -> dict[str, int]:
    """Prune a copy of ``net`` at false discovery rate ``fdr`` from Wald tests of ``estimate``
    with ``se`` (Student-t on ``dof`` where given) and count the result against ``null``
    (boolean masks of the null weights, keyed like ``estimate``)."""
    net = copy.deepcopy(net)
    results = wald(net, se, weights=estimate, dof=dof)
    prune_fdr(net, results, fdr=fdr)
    kept = {name: mask_of(net, name).bool() for name in estimate}
    discoveries = sum(int(k.sum()) for k in kept.values())
    false = sum(int((kept[n] & null[n]).sum()) for n in kept)
    nonnull = sum(int((~null[n]).sum()) for n in kept)
    true = sum(int((kept[n] & ~null[n]).sum()) for n in kept)
    return dict(discoveries=discoveries, false=false, true=true, nonnull=nonnull,
                nulls=sum(int(null[n].sum()) for n in kept))


def summary(outcomes: list[dict[str, int]]) -> dict[str, float]:
    """Realised FDR (mean FDP over datasets, with its normal 95% interval), the pooled false share
    with a Wilson interval, and the power (pooled share of non-null weights kept)."""
    fdp = np.array([o["false"] / o["discoveries"] if o["discoveries"] else 0.0 for o in outcomes])
    false = sum(o["false"] for o in outcomes)
    disc = sum(o["discoveries"] for o in outcomes)
    lo, hi = wilson(false, disc) if disc else (float("nan"), float("nan"))
    se = fdp.std(ddof=1) / np.sqrt(len(fdp)) if len(fdp) > 1 else float("nan")
    return dict(fdr=float(fdp.mean()), fdr_lo=float(fdp.mean() - 1.96 * se), fdr_hi=float(fdp.mean() + 1.96 * se),
                pooled=false / disc if disc else float("nan"), pooled_lo=lo, pooled_hi=hi,
                power=sum(o["true"] for o in outcomes) / sum(o["nonnull"] for o in outcomes),
                any_false=float(np.mean([o["false"] > 0 for o in outcomes])), datasets=len(outcomes),
                discoveries=disc)
