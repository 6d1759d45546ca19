"""Measured inference latency: what structured pruning is for."""

from __future__ import annotations

import statistics
from numbers import Integral, Real

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from mustat._checks import check_scalar
from mustat._functional import eval_mode


def latency(model: nn.Module, inputs: Tensor, *, threads: int = 1, min_run_time: float = 0.5) -> float:
    """Median seconds of one ``model(inputs)`` call in eval mode without autograd, from
    ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up included, blocks of calls until
    ``min_run_time`` seconds). ``threads`` intra-op threads during the measurement (PyTorch's
    setting is restored); the model's mode is restored."""
    check_scalar(threads, "threads", kind=Integral, low=1)
    check_scalar(min_run_time, "min_run_time", kind=Real, low=0.0, closed="neither")
    with eval_mode(model), torch.no_grad():
        model(inputs)  # warm-up: lazy initialisation, allocator
        timer = benchmark.Timer("model(inputs)", globals={"model": model, "inputs": inputs}, num_threads=threads)
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def paired_latency(dense: nn.Module, pruned: nn.Module, inputs: Tensor, *, repeats: int = 3, threads: int = 1,
                   min_run_time: float = 0.3) -> tuple[float, float]:
    """Median :func:`latency` of ``dense`` and of ``pruned`` over ``repeats`` rounds, the two timed
    alternately so that load on the machine hits both alike."""
    check_scalar(repeats, "repeats", kind=Integral, low=1)
    t_d, t_p = [], []
    for _ in range(repeats):
        t_d.append(latency(dense, inputs, threads=threads, min_run_time=min_run_time))
        t_p.append(latency(pruned, inputs, threads=threads, min_run_time=min_run_time))
    return statistics.median(t_d), statistics.median(t_p)
