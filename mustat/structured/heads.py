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

**Grouped-query attention** (LLaMA, Mistral, Qwen2 and the other models laid out as
``q_proj``/``k_proj``/``v_proj``/``o_proj`` with a ``head_dim``): a key/value head serves
``G = num_attention_heads / num_key_value_heads`` query heads, so the unit removed is the *group*:
the :math:`G d` rows of its query heads in ``q_proj``, the :math:`d` rows of its key/value head in
``k_proj`` and ``v_proj``, and the :math:`G d` matching input columns of ``o_proj``. The scores and
the refit are the ones above with the group's :math:`G d` columns as the column group: the OBS
score is the group's saliency (with a per-output noise variance, its Wald statistic on
:math:`G d \times` ``hidden`` degrees of freedom; the variance is shared by the block's groups, so
it does not change their ranking). Every query head keeps its key/value head, so
``num_key_value_groups`` does not change.

The error is the block's, not the network's: later layers see the change through the residual
stream and are not re-fitted. Heads (groups) are ranked within each block and the same share is
removed from every block. The surgery is Torch-Pruning's (``prune_linear_out_channels`` /
``prune_linear_in_channels``) and the module's head count is updated, so the model stays a plain,
smaller dense module that runs with any of transformers' attention implementations.

The model's ``config``: a grouped-query model pruned by :func:`prune_heads` keeps the same
number of heads in every block, so its config is updated (``num_attention_heads``,
``num_key_value_heads``, and ``head_dim`` written explicitly) and the pruned model saves with
``save_pretrained`` and reloads with ``from_pretrained``. :func:`remove_heads` on single blocks
can leave the blocks unequal, which a LLaMA config cannot describe: :func:`sync_config` then
refuses. BERT's config derives the head size from ``hidden_size / num_attention_heads``, so it
cannot describe a pruned BERT at all: save that with ``torch.save``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat.structured.reconstruction import (
    check_cuttable,
    cut_channels,
    cut_outputs,
    group_scores,
    input_grams,
    least_squares_refit,
    removal_count,
)

HEAD_SCORES = ("magnitude", "activation", "obs")


def _is_bert(mod: nn.Module) -> bool:
    return hasattr(mod, "attention_head_size") and all(isinstance(getattr(mod, p, None), nn.Linear)
                                                       for p in ("query", "key", "value"))


def _is_gqa(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "head_dim", None), int) and all(
        isinstance(getattr(mod, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Linear]]:
    """``(name, attention, output)`` of every self-attention block this module knows:

    * BERT's layout: ``attention`` has ``query``/``key``/``value`` Linears and
      ``attention_head_size``, ``output`` is the output projection (``.output.dense``);
      cross-attention blocks are left out;
    * LLaMA's (grouped-query) layout: ``attention`` has ``q_proj``/``k_proj``/``v_proj``/``o_proj``
      and ``head_dim``, ``output`` is its ``o_proj``; the unit removed is a key/value group
      (module notes)."""
    out = []
    for name, mod in model.named_modules():
        att, proj = getattr(mod, "self", None), getattr(getattr(mod, "output", None), "dense", None)
        if isinstance(proj, nn.Linear) and att is not None and _is_bert(att) \
                and not getattr(mod, "is_cross_attention", False):
            out.append((name, att, proj))
        elif _is_gqa(mod) and not getattr(mod, "is_cross_attention", False):
            out.append((name, mod, mod.o_proj))
    if not out:
        raise ValueError(f"{type(model).__name__} has no self-attention block this module knows (BERT's "
                         "query/key/value with an output projection, or LLaMA's q_proj/k_proj/v_proj/o_proj "
                         "with a head_dim)")
    return out


@dataclass(frozen=True)
class _Layout:
    """The removable units of one block: ``coupled`` layers whose output rows are the output
    projection's input columns (``cols[u]`` per unit), ``shared`` layers cut by rows ``rows[u]``
    (a grouped-query block's key and value projections; none in BERT), and ``per_unit`` query
    heads in each unit."""

    coupled: tuple[nn.Linear, ...]
    shared: tuple[nn.Linear, ...]
    cols: tuple[tuple[int, ...], ...]
    rows: tuple[tuple[int, ...], ...]
    per_unit: int


def _layout(att: nn.Module) -> _Layout:
    if _is_gqa(att):
        d = att.head_dim
        q, k, v = att.q_proj, att.k_proj, att.v_proj
        if q.out_features % d or k.out_features % d or k.out_features != v.out_features:
            raise ValueError(f"{type(att).__name__}: q_proj ({q.out_features}) and k_proj/v_proj "
                             f"({k.out_features}/{v.out_features}) rows are not whole heads of head_dim={d}")
        n_q, n_kv = q.out_features // d, k.out_features // d
        if n_q % n_kv:
            raise ValueError(f"{type(att).__name__}: {n_q} query heads do not split into {n_kv} key/value groups")
        g = n_q // n_kv
        cols = tuple(tuple(range(u * g * d, (u + 1) * g * d)) for u in range(n_kv))
        rows = tuple(tuple(range(u * d, (u + 1) * d)) for u in range(n_kv))
        return _Layout((q,), (k, v), cols, rows, g)
    d = att.attention_head_size
    heads = tuple(tuple(range(h * d, (h + 1) * d)) for h in range(att.query.out_features // d))
    return _Layout((att.query, att.key, att.value), (), heads, tuple(() for _ in heads), 1)


def _heads(att: nn.Module) -> list[list[int]]:
    """The output projection's input columns of each unit (a head; a key/value group in GQA)."""
    return [list(c) for c in _layout(att).cols]


def query_heads(att: nn.Module) -> int:
    """The block's query heads (its ``num_attention_heads`` in BERT)."""
    lay = _layout(att)
    return len(lay.cols) * lay.per_unit


def head_grams(model: nn.Module, batches: Iterable[dict], blocks, damping: float = 0.01) -> dict[str, Tensor]:
    """``H`` of each block's output projection (float64, the heads' context coordinates plus a bias
    coordinate last) over the real tokens of ``batches``, damped by ``damping`` times the mean
    diagonal."""
    return input_grams(model, batches, {name: proj for name, _, proj in blocks}, damping)


def head_scores(att: nn.Module, proj: nn.Linear, H: Tensor | None, method: str) -> Tensor:
    """Per-unit scores (higher: keep) of one block (module notes): one per head, or per key/value
    group in a grouped-query block."""
    check_option(method, "method", HEAD_SCORES)
    lay = _layout(att)
    if method == "magnitude":
        # the mean over the four coupled layers (query, key, value, output) of the unit's squared norm
        sq = lambda layer, dim: layer.weight.detach().to(torch.float64).square().sum(dim)  # noqa: E731
        cols = sum(sq(layer, 1) for layer in lay.coupled) + sq(proj, 0)
        rows = sum(sq(layer, 1) for layer in lay.shared) if lay.shared else None
        return torch.stack([cols[list(c)].sum() + (rows[list(r)].sum() if rows is not None else 0.0)
                            for c, r in zip(lay.cols, lay.rows)]) / 4
    if H is None:
        raise ValueError(f"method={method!r} needs the block's Gram matrix (head_grams)")
    return group_scores(proj, H, lay.cols, method)


@torch.no_grad()
def remove_heads(att: nn.Module, proj: nn.Linear, heads: list[int], H: Tensor | None = None) -> None:
    """Remove ``heads`` of the block (key/value groups in a grouped-query block: module notes)
    through Torch-Pruning's functions and update its head count; with ``H``, refit the kept
    columns and the bias of the output projection first.

    Masked layers (a model pruned beforehand) are cut as their effective weights, and the kept
    entries keep their masks, except a refitted output projection, which comes back dense
    (:func:`~mustat.structured.reconstruction.cut_channels`). Bad indices, removing every head and
    a layer under a parametrization other than a mask raise ValueError before anything changes.
    The model's ``config`` is not touched: :func:`sync_config` (which :func:`prune_heads` calls)."""
    lay = _layout(att)
    n = len(lay.cols)
    gone = set(heads)
    what = "key/value group" if lay.shared else "head"
    if len(gone) != len(heads) or not all(isinstance(h, Integral) and 0 <= h < n for h in heads):
        raise ValueError(f"heads must be distinct {what} indices in [0, {n}), got {sorted(heads)[:8]}")
    if len(gone) == n:
        raise ValueError(f"remove_heads would remove every {what} of the block")
    idxs = sorted(i for h in gone for i in lay.cols[h])
    keep = [i for h in range(n) if h not in gone for i in lay.cols[h]]
    check_cuttable([*lay.coupled, *lay.shared, proj])
    fitted = least_squares_refit(proj, H, keep) if H is not None else None
    if lay.shared:
        cut_outputs(lay.shared, sorted(i for h in gone for i in lay.rows[h]))
    cut_channels(lay.coupled, proj, idxs, fitted)
    if hasattr(att, "num_attention_heads"):
        att.num_attention_heads = (n - len(gone)) * lay.per_unit
    if hasattr(att, "all_head_size"):
        att.all_head_size = att.num_attention_heads * att.attention_head_size
    for attr, value in (("num_heads", (n - len(gone)) * lay.per_unit), ("num_key_value_heads", n - len(gone))):
        if lay.shared and isinstance(getattr(att, attr, None), int):
            setattr(att, attr, value)


def sync_config(model: nn.Module, blocks: Sequence[tuple[str, nn.Module, nn.Linear]] | None = None) -> bool:
    """Write the grouped-query blocks' head counts into ``model.config`` (``num_attention_heads``,
    ``num_key_value_heads`` and an explicit ``head_dim``), so that ``save_pretrained`` /
    ``from_pretrained`` rebuild the pruned shapes. Returns whether the config was changed.

    A model without a ``config``, or without grouped-query blocks (BERT: its config cannot state a
    head size, module notes), is left alone (``False``). Blocks with different head counts
    raise ValueError: one LLaMA config describes every layer alike."""
    config = getattr(model, "config", None)
    blocks = attention_blocks(model) if blocks is None else blocks
    gqa = [(name, att) for name, att, _ in blocks if _is_gqa(att)]
    if config is None or not gqa:
        return False
    counts = {name: (query_heads(att), len(_layout(att).cols), att.head_dim) for name, att in gqa}
    if len(set(counts.values())) > 1:
        raise ValueError("the blocks have different (query heads, key/value heads, head_dim): "
                         f"{dict(list(counts.items())[:4])}; a {type(config).__name__} states one for every layer, "
                         "so save_pretrained cannot describe this model: prune the same number of groups in every "
                         "block (prune_heads does), or save it with torch.save")
    n_q, n_kv, d = next(iter(counts.values()))
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        if not hasattr(config, key) and key != "head_dim":
            raise ValueError(f"{type(config).__name__} has no {key}: cannot record the pruned head counts")
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = n_q, n_kv, d
    return True


def prune_heads(model: nn.Module, batches: list[dict], fraction: float, method: str = "obs", *, refit: bool = True,
                damping: float = 0.01, round_to: int | None = None) -> dict[str, int]:
    """Remove ``fraction`` of the heads of every self-attention block (of the key/value groups, in
    a grouped-query block: module notes), rounded per block, the lowest-scoring first, in place;
    returns the query heads kept per block. ``refit`` and the ``activation``/``obs`` scores use the
    calibration ``batches`` (dicts for ``model(**batch)``).

    Every block keeps at least one head (group): a fraction close to 1 leaves one per block, which
    the returned counts show. ``round_to``: remove the number of units nearest to
    ``fraction * n`` that leaves the output projection's input width a multiple of ``round_to``
    (with a head size of 64 every count does). A masked model is pruned as its effective weights,
    keeping its masks except on refitted output projections (:func:`remove_heads`). A grouped-query
    model's ``config`` is updated (:func:`sync_config`), so it saves with ``save_pretrained``."""
    check_scalar(fraction, "fraction", kind=Real, low=0.0, high=1.0, closed="left")
    check_option(method, "method", HEAD_SCORES)
    if round_to is not None:
        check_scalar(round_to, "round_to", kind=Integral, low=1)
    blocks = attention_blocks(model)
    grams = head_grams(model, batches, blocks, damping) if (refit or method != "magnitude") else {}
    kept = {}
    for name, att, proj in blocks:
        H = grams.get(name)
        scores = head_scores(att, proj, H, method)
        k = removal_count(len(scores), fraction, len(_layout(att).cols[0]), round_to)
        gone = sorted(torch.argsort(scores, stable=True)[:k].tolist())
        if gone:
            remove_heads(att, proj, gone, H if refit else None)
        kept[name] = query_heads(att)
    sync_config(model, blocks)
    return kept
