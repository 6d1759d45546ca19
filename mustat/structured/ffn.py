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

**Gated MLPs** (LLaMA's :math:`y = W_{down}\,(\phi(W_{gate} x) \odot W_{up} x)`): neuron
:math:`u` is row :math:`u` of ``gate_proj``, row :math:`u` of ``up_proj`` and column :math:`u` of
``down_proj``, removed together; :math:`H` is the Gram of ``down_proj``'s inputs (the gated
products), so the refit and the obs and activation scores are the ones above, and the magnitude is
the mean over the three layers.

Neurons are ranked within each block and the same share is removed from every block. The surgery
is Torch-Pruning's (``prune_linear_out_channels`` / ``prune_linear_in_channels``), so the model
stays a plain, smaller dense module. A model with a ``config`` holding ``intermediate_size``
(LLaMA's) gets the new width written there when every block kept the same number
(:func:`prune_ffn` keeps them equal), so it saves with ``save_pretrained`` and reloads with
``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat.structured.reconstruction import (
    check_cuttable,
    cut_channels,
    group_scores,
    input_grams,
    least_squares_refit,
    removal_count,
)

FFN_SCORES = ("magnitude", "activation", "obs")

Producers = nn.Linear | tuple[nn.Linear, ...]


def ffn_blocks(model: nn.Module) -> list[tuple[str, Producers, nn.Linear]]:
    """``(name, up, down)`` of every feed-forward block: BERT's ``intermediate.dense`` /
    ``output.dense`` pairs, ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2``, and gated
    MLPs' (LLaMA's ``gate_proj``, ``up_proj``, ``down_proj``), whose ``up`` is the pair
    ``(gate_proj, up_proj)``: the layers whose output rows are the neurons."""
    out = []
    for name, mod in model.named_modules():
        inter, output = getattr(mod, "intermediate", None), getattr(mod, "output", None)
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(output, "dense", None),
                                                                                nn.Linear):
            out.append((name, inter.dense, output.dense))
        elif isinstance(mod, nn.TransformerEncoderLayer):
            out.append((name, mod.linear1, mod.linear2))
        elif all(isinstance(getattr(mod, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            out.append((name, (mod.gate_proj, mod.up_proj), mod.down_proj))
    if not out:
        raise ValueError(f"{type(model).__name__} has no feed-forward block this module knows (BERT's "
                         "intermediate/output pair, nn.TransformerEncoderLayer, a gated MLP's "
                         "gate_proj/up_proj/down_proj)")
    return out


def _producers(up: Producers) -> tuple[nn.Linear, ...]:
    return tuple(up) if isinstance(up, Sequence) else (up,)


def ffn_grams(model: nn.Module, batches: Iterable[dict], blocks, damping: float = 0.01) -> dict[str, Tensor]:
    """``H`` of each block (float64, neurons plus a bias coordinate last) over the real tokens of
    ``batches`` (dicts for ``model(**batch)``; ``attention_mask == 0`` tokens left out), damped by
    ``damping`` times the mean diagonal."""
    return input_grams(model, batches, {name: down for name, _, down in blocks}, damping)


def ffn_scores(up: Producers, down: nn.Linear, H: Tensor | None, method: str) -> Tensor:
    """Per-neuron scores (higher: keep) of one block (module notes); ``up`` is one layer or a gated
    block's ``(gate_proj, up_proj)``."""
    check_option(method, "method", FFN_SCORES)
    if method == "magnitude":
        producers = _producers(up)
        return (sum(p.weight.detach().to(torch.float64).square().sum(1) for p in producers)
                + down.weight.detach().to(torch.float64).square().sum(0)) / (len(producers) + 1)
    if H is None:
        raise ValueError(f"method={method!r} needs the block's Gram matrix (ffn_grams)")
    return group_scores(down, H, [[u] for u in range(down.in_features)], method)


@torch.no_grad()
def remove_neurons(up: Producers, down: nn.Linear, idxs: list[int], H: Tensor | None = None) -> None:
    """Remove neurons ``idxs`` of the block through Torch-Pruning's functions (the rows of ``up``,
    of both ``gate_proj`` and ``up_proj`` in a gated block, and the columns of ``down``); with
    ``H``, refit the kept columns and the bias of ``down`` by least squares first (module notes).

    Masked layers (a model pruned beforehand) are cut as their effective weights, and the kept
    entries keep their masks, except a refitted ``down``, which comes back dense
    (:func:`~mustat.structured.reconstruction.cut_channels`). Bad indices, removing every neuron and
    a layer under a parametrization other than a mask raise ValueError before anything changes.
    The model's ``config`` is not touched (:func:`prune_ffn` updates it)."""
    n = down.in_features
    gone = set(idxs)
    if len(gone) != len(idxs) or not all(isinstance(i, Integral) and 0 <= i < n for i in idxs):
        raise ValueError(f"idxs must be distinct neuron indices in [0, {n}), got {sorted(idxs)[:8]}")
    keep = [j for j in range(n) if j not in gone]
    if not keep:
        raise ValueError("remove_neurons would remove every neuron of the block")
    producers = _producers(up)
    check_cuttable([*producers, down])
    fitted = least_squares_refit(down, H, keep) if H is not None else None
    cut_channels(producers, down, idxs, fitted)


def _sync_config(model: nn.Module, blocks, kept: dict[str, int]) -> None:
    """``model.config.intermediate_size`` set to the blocks' common width, on models whose config
    has one and whose blocks are gated MLPs that read it (``mlp.intermediate_size``)."""
    config = getattr(model, "config", None)
    gated = [model.get_submodule(name) for name, up, _ in blocks if isinstance(up, tuple)]
    if config is None or not gated or not isinstance(getattr(config, "intermediate_size", None), int):
        return
    widths = set(kept.values())
    if len(widths) > 1:
        raise ValueError(f"the blocks kept different widths {dict(list(kept.items())[:4])}; a "
                         f"{type(config).__name__} states one intermediate_size for every layer")
    config.intermediate_size = widths.pop()
    for mod in gated:
        if isinstance(getattr(mod, "intermediate_size", None), int):
            mod.intermediate_size = config.intermediate_size


def prune_ffn(model: nn.Module, batches: list[dict], fraction: float, method: str = "obs", *, refit: bool = True,
              damping: float = 0.01, round_to: int | None = None) -> dict[str, int]:
    """Remove ``fraction`` of the neurons of every feed-forward block, the lowest-scoring first, in
    place; returns the neurons kept per block. ``refit`` needs ``batches`` (their Grams are used).

    Each block removes ``round(fraction * n)`` of its ``n`` neurons but keeps at least one (as
    :func:`~mustat.structured.prune_heads` keeps a head): a fraction close to 1 leaves one neuron
    per block, which the returned counts show. ``round_to``: remove instead the count nearest to
    that (ties: fewer) which leaves a multiple of ``round_to`` neurons, at least ``round_to``
    where the block is wider (Torch-Pruning's ``round_to``; equal MACs are not equal speed at odd
    widths). A masked model (pruned beforehand) is pruned as its effective weights, keeping its
    masks except on refitted down projections (:func:`remove_neurons`). A gated model's config
    ``intermediate_size`` is updated (module notes)."""
    check_scalar(fraction, "fraction", kind=Real, low=0.0, high=1.0, closed="left")
    check_option(method, "method", FFN_SCORES)
    if round_to is not None:
        check_scalar(round_to, "round_to", kind=Integral, low=1)
    blocks = ffn_blocks(model)
    grams = ffn_grams(model, batches, blocks, damping) if (refit or method != "magnitude") else {}
    kept = {}
    for name, up, down in blocks:
        H = grams.get(name)
        scores = ffn_scores(up, down, H, method)
        k = removal_count(len(scores), fraction, 1, round_to)
        idxs = sorted(torch.argsort(scores, stable=True)[:k].tolist())
        if idxs:
            remove_neurons(up, down, idxs, H if refit else None)
        kept[name] = down.in_features
    _sync_config(model, blocks, kept)
    return kept
