r"""Removing feed-forward neurons of a pretrained transformer in one shot, with a least-squares
refit of the down projection: the structured counterpart of :mod:`mustat.layerwise`.

A feed-forward block computes :math:`y = W_2\,\phi(W_1 x + b_1) + b_2`. Neuron :math:`u` is row
:math:`u` of :math:`W_1` (with :math:`b_1[u]`) and column :math:`u` of :math:`W_2`. With the
neurons' outputs on the calibration tokens, extended by a constant for the bias,
:math:`\tilde h = (h, 1)`, and :math:`H = \sum \tilde h \tilde h^\top + \delta I`:

* **refit**: after removing the set :math:`R`, the kept columns :math:`K` (and the bias) are
  refitted by least squares to the dense block's outputs, :math:`\tilde W_{2,K} \leftarrow
  \tilde W_2 H_{:,K} H_{KK}^{-1}`: the layer-wise optimum;
* **obs** score :math:`\|W_2[:,u]\|^2 / [H^{-1}]_{uu}`: the increase of the summed squared
  reconstruction error when neuron :math:`u` alone is removed and the rest refitted (Optimal
  Brain Surgeon's saliency of the column group; with a per-output noise variance it is the
  group's Wald statistic);
* **activation** score :math:`\|W_2[:,u]\|^2 H_{uu}`: the same error without the refit;
* **magnitude**: Torch-Pruning's group magnitude of the coupled pair,
  :math:`(\|W_1[u]\|^2 + \|W_2[:,u]\|^2) / 2` (``GroupMagnitudeImportance(p=2)``'s reduction).

Neurons are ranked within each block and the same share is removed from every block. The surgery
is Torch-Pruning's (``prune_linear_out_channels`` / ``prune_linear_in_channels``), so the model
stays a plain, smaller dense module.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Real

import torch
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat.structured.reconstruction import (
    check_cuttable,
    cut_channels,
    group_scores,
    input_grams,
    least_squares_refit,
)

FFN_SCORES = ("magnitude", "activation", "obs")


def ffn_blocks(model: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """``(name, up, down)`` of every feed-forward block: BERT's ``intermediate.dense`` /
    ``output.dense`` pairs and ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2``."""
    out = []
    for name, mod in model.named_modules():
        inter, output = getattr(mod, "intermediate", None), getattr(mod, "output", None)
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(output, "dense", None),
                                                                                nn.Linear):
            out.append((name, inter.dense, output.dense))
        elif isinstance(mod, nn.TransformerEncoderLayer):
            out.append((name, mod.linear1, mod.linear2))
    if not out:
        raise ValueError(f"{type(model).__name__} has no feed-forward block this module knows (BERT's "
                         "intermediate/output pair, nn.TransformerEncoderLayer)")
    return out


def ffn_grams(model: nn.Module, batches: Iterable[dict], blocks, damping: float = 0.01) -> dict[str, Tensor]:
    """``H`` of each block (float64, neurons plus a bias coordinate last) over the real tokens of
    ``batches`` (dicts for ``model(**batch)``; ``attention_mask == 0`` tokens left out), damped by
    ``damping`` times the mean diagonal."""
    return input_grams(model, batches, {name: down for name, _, down in blocks}, damping)


def ffn_scores(up: nn.Linear, down: nn.Linear, H: Tensor | None, method: str) -> Tensor:
    """Per-neuron scores (higher: keep) of one block (module notes)."""
    check_option(method, "method", FFN_SCORES)
    if method == "magnitude":
        return (up.weight.detach().to(torch.float64).square().sum(1)
                + down.weight.detach().to(torch.float64).square().sum(0)) / 2
    if H is None:
        raise ValueError(f"method={method!r} needs the block's Gram matrix (ffn_grams)")
    return group_scores(down, H, [[u] for u in range(down.in_features)], method)


@torch.no_grad()
def remove_neurons(up: nn.Linear, down: nn.Linear, idxs: list[int], H: Tensor | None = None) -> None:
    """Remove neurons ``idxs`` of the block through Torch-Pruning's functions; with ``H``, refit the
    kept columns and the bias of ``down`` by least squares first (module notes).

    Masked layers (a model pruned beforehand) are cut as their effective weights, and the kept
    entries keep their masks, except a refitted ``down``, which comes back dense
    (:func:`~mustat.structured.reconstruction.cut_channels`). Bad indices, removing every neuron and
    a layer under a parametrization other than a mask raise ValueError before anything changes."""
    n = down.in_features
    gone = set(idxs)
    if len(gone) != len(idxs) or not all(isinstance(i, int) and 0 <= i < n for i in idxs):
        raise ValueError(f"idxs must be distinct neuron indices in [0, {n}), got {sorted(idxs)[:8]}")
    keep = [j for j in range(n) if j not in gone]
    if not keep:
        raise ValueError("remove_neurons would remove every neuron of the block")
    check_cuttable([up, down])
    fitted = least_squares_refit(down, H, keep) if H is not None else None
    cut_channels([up], down, idxs, fitted)


def prune_ffn(model: nn.Module, batches: list[dict], fraction: float, method: str = "obs", *, refit: bool = True,
              damping: float = 0.01) -> dict[str, int]:
    """Remove ``fraction`` of the neurons of every feed-forward block, the lowest-scoring first, in
    place; returns the neurons kept per block. ``refit`` needs ``batches`` (their Grams are used).

    Each block removes ``round(fraction * n)`` of its ``n`` neurons but keeps at least one (as
    :func:`~mustat.structured.prune_heads` keeps a head): a fraction close to 1 leaves one neuron
    per block, which the returned counts show. A masked model (pruned beforehand) is pruned as its
    effective weights, keeping its masks except on refitted down projections (:func:`remove_neurons`)."""
    check_scalar(fraction, "fraction", kind=Real, low=0.0, high=1.0, closed="left")
    check_option(method, "method", FFN_SCORES)
    blocks = ffn_blocks(model)
    grams = ffn_grams(model, batches, blocks, damping) if (refit or method != "magnitude") else {}
    kept = {}
    for name, up, down in blocks:
        H = grams.get(name)
        scores = ffn_scores(up, down, H, method)
        k = min(int(round(fraction * len(scores))), len(scores) - 1)
        idxs = sorted(torch.argsort(scores, stable=True)[:k].tolist())
        if idxs:
            remove_neurons(up, down, idxs, H if refit else None)
        kept[name] = down.in_features
    return kept
