"""Data-parallel training across processes with ``torch.distributed`` (launched by
``torchrun``: NCCL on GPUs, gloo on CPU).

Every rank holds the whole (small) dataset and the same seeded generator (or the same
DataLoader), so all ranks draw the *same* global minibatch; rank ``r`` of ``N`` trains on
its shard ``idx[r::N]``. Gradients are all-reduced as count-weighted sums, so the update
is exactly the single-process mean-loss gradient up to floating-point reduction order,
even for uneven shards. Weights therefore stay identical on every rank, and so do the
estimators that read them (gradient moments see the all-reduced gradient). Masks are
computed on every rank and broadcast from rank 0, so they are identical by construction;
only rank 0 writes files.

Where N ranks do not reproduce one process: dropout (each rank draws its own masks, so
the draws differ from one process's, though they are as random), and BatchNorm, whose
batch statistics would be each shard's own: plain BatchNorm layers are refused
(:func:`mustat.training.train_epochs`); ``torch.nn.SyncBatchNorm`` computes them over
the global batch.

Why not ``DistributedDataParallel``: its wrapper renames every parameter
(``module.``), which the estimators and masks address by name, and it averages
gradients per rank rather than per sample.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from mustat._params import entries, masked_names


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE > 1``),
    with NCCL on CUDA and gloo on CPU; returns the device this rank should use
    (``cuda:LOCAL_RANK`` on CUDA). Outside torchrun, returns ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global minibatch of indices."""
    rank, world = rank_world()
    return idx[rank::world] if world > 1 else idx


def all_reduce_gradients(model: nn.Module, local: int, total: int) -> None:
    """Turn each rank's gradient of its *mean* loss over ``local`` samples into the gradient
    of the mean loss over all ``total`` samples: ``sum_r local_r * grad_r / total``.

    Every rank sends every trainable parameter (zeros where it has no gradient: an empty
    shard, or a parameter its shard did not reach), so all ranks send the same sizes; a
    parameter no rank reached keeps ``grad = None``, as in one process."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad.flatten() * local if p.grad is not None else p.new_zeros(p.numel())) for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype,
                                     device=params[0].device)])
    dist.all_reduce(flat)
    reached = flat[-len(params):] > 0
    flat = flat[: -len(params)] / total
    start = 0
    for p, hit in zip(params, reached.tolist()):
        part = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
        if not hit:
            p.grad = None
        elif p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (a copy; ``t`` itself outside a process group)."""
    if rank_world()[1] <= 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def broadcast_masks(model: nn.Module) -> None:
    """Make every rank's masks rank 0's (they agree already; this makes it certain)."""
    if rank_world()[1] <= 1:
        return
    from mustat._masking import find_mask

    table = entries(model)
    for name in masked_names(model, table):
        for s in table[name].slots:
            dist.broadcast(find_mask(s.module, s.attr), src=0)
