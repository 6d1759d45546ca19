r"""Removing attention heads of a pretrained transformer in one shot, with a least-squares refit of
the output projection.

A BERT attention block computes per head :math:`h` a context :math:`z_h = \mathrm{softmax}(q_h
k_h^\top / \sqrt{d})\, v_h` (:math:`d` = head size) from rows :math:`h` of the query, key and value
projections, and the output :math:`y = \sum_h W_{O,h} z_h + b_O`. Removing head :math:`h` takes
its :math:`3d` rows out of the three projections and its :math:`d` columns out of :math:`W_O`; the
other heads' contexts do not change, so the block's output error is exactly the output
projection's reconstruction error from the kept columns (:mod:`~mustat.structured.reconstruction`),
with :math:`H` the Gram of the contexts on the calibration tokens:

* **refit**: the kept columns of :math:`W_O` and its bias re-fitted by least squares to the dense
  block's outputs;
* **obs** score :math:`\operatorname{tr}(W_{O,h} ([H^{-1}]_{hh})^{-1} W_{O,h}^\top)`: the increase of
  the summed squared error when head :math:`h` alone is removed and the rest re-fitted (OBS's
  saliency of the head's column group; with a per-output noise variance, the head's Wald
  statistic on :math:`d \times` ``hidden`` degrees of freedom);
* **activation** score :math:`\operatorname{tr}(W_{O,h} H_{hh} W_{O,h}^\top)`: the same error without
  the refit;
* **magnitude**: the head's group magnitude, the mean over the four coupled layers of the squared
  L2 norm of its weights.

The error is the block's, not the network's: later layers see the change through the residual
stream and are not re-fitted. Heads are ranked within each block and the same share is removed
from every block. The surgery is Torch-Pruning's (``prune_linear_out_channels`` /
``prune_linear_in_channels``) and the module's head count is updated, so the model stays a plain,
smaller dense module that runs with any of transformers' attention implementations. Its
``config`` still describes the dense model (one head count for all layers), so save the pruned
model with ``torch.save``, not ``save_pretrained``.
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

HEAD_SCORES = ("magnitude", "activation", "obs")


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Linear]]:
    """``(name, attention, output)`` of every self-attention block with BERT's layout: ``attention``
    has ``query``/``key``/``value`` Linears and ``attention_head_size``, ``output`` is the output
    projection (``.output.dense``). Cross-attention blocks are left out."""
    out = []
    for name, mod in model.named_modules():
        att, proj = getattr(mod, "self", None), getattr(getattr(mod, "output", None), "dense", None)
        if (isinstance(proj, nn.Linear) and hasattr(att, "attention_head_size")
                and all(isinstance(getattr(att, p, None), nn.Linear) for p in ("query", "key", "value"))
                and not getattr(mod, "is_cross_attention", False)):
            out.append((name, att, proj))
    if not out:
        raise ValueError(f"{type(model).__name__} has no self-attention block this module knows (BERT's "
                         "query/key/value with an output projection)")
    return out


def _heads(att: nn.Module) -> list[list[int]]:
    d = att.attention_head_size
    return [list(range(h * d, (h + 1) * d)) for h in range(att.query.out_features // d)]


def head_grams(model: nn.Module, batches: Iterable[dict], blocks, damping: float = 0.01) -> dict[str, Tensor]:
    """``H`` of each block's output projection (float64, the heads' context coordinates plus a bias
    coordinate last) over the real tokens of ``batches``, damped by ``damping`` times the mean
    diagonal."""
    return input_grams(model, batches, {name: proj for name, _, proj in blocks}, damping)


def head_scores(att: nn.Module, proj: nn.Linear, H: Tensor | None, method: str) -> Tensor:
    """Per-head scores (higher: keep) of one block (module notes)."""
    check_option(method, "method", HEAD_SCORES)
    heads = _heads(att)
    if method == "magnitude":
        rows = sum(getattr(att, p).weight.detach().to(torch.float64).square().sum(1) for p in ("query", "key", "value"))
        chans = rows + proj.weight.detach().to(torch.float64).square().sum(0)
        return torch.stack([chans[h].sum() for h in heads]) / 4
    if H is None:
        raise ValueError(f"method={method!r} needs the block's Gram matrix (head_grams)")
    return group_scores(proj, H, heads, method)


@torch.no_grad()
def remove_heads(att: nn.Module, proj: nn.Linear, heads: list[int], H: Tensor | None = None) -> None:
    """Remove ``heads`` of the block through Torch-Pruning's functions and update its head count;
    with ``H``, refit the kept columns and the bias of the output projection first (module notes).

    Masked layers (a model pruned beforehand) are cut as their effective weights, and the kept
    entries keep their masks, except a refitted output projection, which comes back dense
    (:func:`~mustat.structured.reconstruction.cut_channels`). Bad indices, removing every head and
    a layer under a parametrization other than a mask raise ValueError before anything changes."""
    groups = _heads(att)
    n = len(groups)
    gone = set(heads)
    if len(gone) != len(heads) or not all(isinstance(h, int) and 0 <= h < n for h in heads):
        raise ValueError(f"heads must be distinct head indices in [0, {n}), got {sorted(heads)[:8]}")
    if len(gone) == n:
        raise ValueError("remove_heads would remove every head of the block")
    idxs = sorted(i for h in gone for i in groups[h])
    keep = [i for h in range(n) if h not in gone for i in groups[h]]
    producers = [getattr(att, p) for p in ("query", "key", "value")]
    check_cuttable([*producers, proj])
    fitted = least_squares_refit(proj, H, keep) if H is not None else None
    cut_channels(producers, proj, idxs, fitted)
    att.num_attention_heads = n - len(gone)
    att.all_head_size = att.num_attention_heads * att.attention_head_size


def prune_heads(model: nn.Module, batches: list[dict], fraction: float, method: str = "obs", *, refit: bool = True,
                damping: float = 0.01) -> dict[str, int]:
    """Remove ``fraction`` of the heads of every self-attention block (rounded per block), the
    lowest-scoring first, in place; returns the heads kept per block. ``refit`` and the
    ``activation``/``obs`` scores use the calibration ``batches`` (dicts for ``model(**batch)``).

    Every block keeps at least one head: a fraction close to 1 leaves one per block, which the
    returned counts show. A masked model is pruned as its effective weights, keeping its masks
    except on refitted output projections (:func:`remove_heads`)."""
    check_scalar(fraction, "fraction", kind=Real, low=0.0, high=1.0, closed="left")
    check_option(method, "method", HEAD_SCORES)
    blocks = attention_blocks(model)
    grams = head_grams(model, batches, blocks, damping) if (refit or method != "magnitude") else {}
    kept = {}
    for name, att, proj in blocks:
        H = grams.get(name)
        scores = head_scores(att, proj, H, method)
        k = min(int(round(fraction * len(scores))), len(scores) - 1)
        gone = sorted(torch.argsort(scores, stable=True)[:k].tolist())
        if gone:
            remove_heads(att, proj, gone, H if refit else None)
        kept[name] = att.num_attention_heads
    return kept
