r"""Layer-wise least-squares reconstruction of a ``Linear`` layer from a subset of its inputs: the
calibration Gram matrix, the Optimal Brain Surgeon saliency of a group of input columns, and the
refit of the kept columns. Shared by feed-forward neurons (:mod:`~mustat.structured.ffn`, groups of
one column) and attention heads (:mod:`~mustat.structured.heads`, groups of ``head_size`` columns).

With the layer's inputs on the calibration tokens extended by a constant for the bias,
:math:`\tilde x = (x, 1)`, :math:`H = \sum \tilde x \tilde x^\top + \delta I` and
:math:`\tilde W = (W, b)`, the summed squared error of reproducing the dense outputs
:math:`\tilde W \tilde x` from the columns :math:`K` alone, re-fitted by least squares, is
:math:`\operatorname{tr}(\tilde W_R\, S\, \tilde W_R^\top)` with :math:`R` the removed columns and
:math:`S = ([H^{-1}]_{RR})^{-1}` (the Schur complement of :math:`H_{KK}`). For one group removed
alone it is OBS's group saliency; with i.i.d. Gaussian output noise of variance :math:`\sigma^2`
per output it is :math:`\sigma^2` times the group's Wald (likelihood-ratio) statistic, with
``out_features * len(group)`` degrees of freedom.

:func:`cut_channels` makes the cut itself on models pruned beforehand too: masks (mustat's,
``torch.nn.utils.prune``'s, ``torch.ao``'s) are baked into the weights and taken off before
Torch-Pruning's surgery, which cannot cut a parametrized layer, and the surviving entries' masks are
put back afterwards (as mustat masks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from mustat import _masking as M
from mustat._checks import check_option
from mustat.obs import kept_solve
from mustat.statistics import Damping, layer_grams

GROUP_SCORES = ("activation", "obs")


def input_grams(model: nn.Module, batches: Iterable[dict], layers: Mapping[str, nn.Linear],
                damping: float = 0.01) -> dict[str, Tensor]:
    """``H`` of the input of each of ``layers`` (float64, the bias coordinate last) over the real
    tokens of ``batches`` (dicts for ``model(**batch)``; ``attention_mask == 0`` tokens left out),
    damped by ``damping`` times the mean diagonal (:class:`mustat.statistics.Damping`, relative).
    One pass of :func:`mustat.statistics.layer_grams`; the model's modes are restored."""
    ridge = Damping(damping)
    return {name: ridge.add_to(g.H) for name, g in layer_grams(model, batches, layers, bias=True).items()}


def _fitted(layer: nn.Linear, H: Tensor) -> tuple[Tensor, Tensor]:
    """``(W, b)`` in float64 and the Gram of what can be re-fitted: without the bias coordinate
    where the layer has no bias (it cannot absorb a mean shift)."""
    n = layer.in_features
    if H.shape != (n + 1, n + 1):
        raise ValueError(f"H must be ({n + 1}, {n + 1}) for a layer with {n} inputs (the bias coordinate "
                         f"last), got {tuple(H.shape)}")
    W = layer.weight.detach().to(torch.float64)
    if layer.bias is None:
        return W, H[:n, :n]
    return torch.cat([W, layer.bias.detach().to(torch.float64)[:, None]], 1), H


def group_scores(layer: nn.Linear, H: Tensor, groups: Sequence[Sequence[int]], method: str) -> Tensor:
    """Per-group error of removing each group of input columns alone (higher: keep):
    ``"obs"`` with the rest re-fitted, ``"activation"`` without (module notes)."""
    check_option(method, "method", GROUP_SCORES)
    W, H = _fitted(layer, H)
    if method == "activation":
        return torch.stack([torch.einsum("oi,ij,oj->", W[:, g], H[g][:, g], W[:, g]) for g in map(list, groups)])
    try:
        Hinv = torch.linalg.inv(H)
    except torch.linalg.LinAlgError:
        raise ValueError("the layer's input Gram matrix is singular (inputs that are always zero?): "
                         "use damping > 0") from None
    out = []
    for g in map(list, groups):
        Wg = W[:, g]
        out.append(torch.einsum("oi,io->", Wg, torch.linalg.solve(Hinv[g][:, g], Wg.T)))
    return torch.stack(out)


def least_squares_refit(layer: nn.Linear, H: Tensor, keep: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Least-squares weight and bias (float64) on the input columns ``keep``:
    :math:`\\tilde W_K = \\tilde W H_{:,K} H_{KK}^{-1}`, the bias coordinate kept where the layer
    has a bias (``None`` is returned for the bias otherwise)."""
    W, H = _fitted(layer, H)
    K = [*keep, layer.in_features] if layer.bias is not None else list(keep)
    kept = torch.zeros(H.shape[0], dtype=torch.bool)
    kept[K] = True
    coef = kept_solve(H, W, kept, ~kept)[:, K]          # W_K + W_R H_RK H_KK^-1: OBS on the removed columns
    return (coef[:, :-1], coef[:, -1]) if layer.bias is not None else (coef, None)


@torch.no_grad()
def set_weights(layer: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Copy a refit into ``layer`` in its own dtype (the bias only where the layer has one)."""
    layer.weight.copy_(weight.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(bias.to(layer.bias.dtype))


_ATTRS = ("weight", "bias")


def check_cuttable(layers: Sequence[nn.Linear]) -> None:
    """Raise, before anything changes, when a layer's weight or bias is computed by a
    parametrization other than a mask (weight norm, say): Torch-Pruning cannot cut it."""
    for layer in layers:
        for attr in _ATTRS:
            if M.kind(layer, attr) == "other":
                raise ValueError(f"{type(layer).__name__}.{attr} (in_features={layer.in_features}, out_features="
                                 f"{layer.out_features}) is computed by a parametrization that is not a mask; remove it "
                                 "first (torch.nn.utils.parametrize.remove_parametrizations) to cut channels")


@torch.no_grad()
def _unmask(layer: nn.Linear) -> dict[str, Tensor]:
    """Take every mask off ``layer``'s weight and bias, leaving the effective values (masked
    entries zero) in plain parameters; returns the keep-masks (bool) that were there."""
    masks = {}
    for attr in _ATTRS:
        keep = M.find_mask(layer, attr)
        if keep is None:
            continue
        keep = keep.detach() != 0
        M.strip_mask(layer, attr)
        value = getattr(layer, attr)
        value.mul_(keep.to(value.dtype))
        masks[attr] = keep
    return masks


@torch.no_grad()
def cut_channels(producers: Sequence[nn.Linear], consumer: nn.Linear, idxs: Sequence[int],
                 fitted: tuple[Tensor, Tensor | None] | None = None) -> None:
    """Remove the output channels ``idxs`` of every producer and the matching input columns of
    ``consumer`` with Torch-Pruning's functions; with ``fitted`` (a :func:`least_squares_refit` of
    ``consumer``, computed before), copy it into the cut consumer.

    Masked layers are cut too (module notes): each mask is baked in and removed first, and the
    rows or columns it keeps are re-installed as a mustat mask afterwards, so the function is the
    masked model's minus the removed channels. A refitted consumer is dense: the refit gives its
    masked entries least-squares values, so its masks are not re-installed. Check the layers with
    :func:`check_cuttable` first."""
    check_cuttable([*producers, consumer])
    gone = set(idxs)
    keep = [j for j in range(consumer.in_features) if j not in gone]
    found = _unmask(consumer)
    cut_outputs(producers, idxs)
    tp.prune_linear_in_channels(consumer, sorted(gone))
    if fitted is not None:
        set_weights(consumer, *fitted)
    else:
        for attr, k in found.items():
            M.set_mask(consumer, attr, k[:, keep] if attr == "weight" else k)


@torch.no_grad()
def cut_outputs(producers: Sequence[nn.Linear], idxs: Sequence[int]) -> None:
    """Remove the output rows ``idxs`` (and bias entries) of every producer with Torch-Pruning's
    ``prune_linear_out_channels``, keeping the surviving entries' masks (module notes): the half of
    :func:`cut_channels` for layers whose consumer is cut elsewhere (a grouped-query attention
    block's key and value projections, whose rows are not the output projection's columns)."""
    check_cuttable(producers)
    gone = set(idxs)
    masks = [_unmask(layer) for layer in producers]
    for layer, found in zip(producers, masks):
        keep = [j for j in range(layer.out_features) if j not in gone]
        tp.prune_linear_out_channels(layer, sorted(gone))
        for attr, k in found.items():
            M.set_mask(layer, attr, k[keep])


def removal_count(n: int, fraction: float, width: int, round_to: int | None) -> int:
    """Units to remove from ``n`` (each ``width`` channels wide) for :func:`~mustat.structured.prune_ffn`
    and :func:`~mustat.structured.prune_heads`: ``round(fraction * n)``, at most
    ``n - 1``; with ``round_to``, the nearest count (ties: fewer removed) whose kept width
    ``(n - k) * width`` is a multiple of ``round_to``, keeping at least one unit (no such count:
    the unrounded one)."""
    k = min(int(round(fraction * n)), n - 1)
    if round_to is None:
        return k
    ok = [j for j in range(n) if ((n - j) * width) % round_to == 0]
    return min(ok, key=lambda j: (abs(j - k), j)) if ok else k
