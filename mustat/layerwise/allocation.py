"""How much of each layer one-shot pruning removes: OWL's outlier-weighted layer sparsities.

OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise sparsity") gives a block of a transformer
(all its layers together) a density that rises with its *outlier ratio*: the percentage of its
Wanda scores ``|w_ij| * ||X_j||_2`` larger than ``M`` times their mean (the layer outlier
distribution, LOD). The ratios are mapped linearly onto ``[1 - s - lambda, 1 - s + lambda]``
around the target density ``1 - s`` (min to max, then centred on the mean), as the published code
does; its defaults are ``M = 5`` and ``lambda = 0.08``. The mean density over blocks is ``1 - s``,
so the budget is met exactly when the blocks are of equal size (every decoder block of an LLM),
and approximately otherwise. No statistical test is involved: the rule is a heuristic that the
paper tuned on LLaMA (70% unstructured: SparseGPT 26.30 -> 19.49, Wanda 85.77 -> 24.55
perplexity on LLaMA-1-7B; worse on OPT-6.7B).

:func:`mustat.layerwise.oneshot` takes ``allocation="owl"`` (the published defaults) or a mapping
of layer sparsities such as :func:`owl_shares` returns with other ``M`` and ``lam``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mustat._checks import check_scalar

OWL_M = 5.0
OWL_LAMBDA = 0.08
ALLOCATIONS = ("uniform", "owl")


def outlier_ratio(scores: Tensor, M: float) -> float:
    """The percentage of ``scores`` above ``M`` times their mean (OWL's ``check_outlier_mean``)."""
    scores = scores.double()
    return float((scores > M * scores.mean()).double().mean()) * 100


def owl_shares(scores: Mapping[str, Tensor], blocks: Mapping[str, int] | None, sparsity: float, *,
               M: float = OWL_M, lam: float = OWL_LAMBDA) -> dict[str, float]:
    """Each layer's sparsity under OWL (module notes).

    Parameters
    ----------
    scores
        Each layer's Wanda scores ``|w_ij| * ||X_j||_2`` (any shape), keyed by layer name.
    blocks
        The block each layer belongs to (layers of one block share its outlier ratio); ``None``:
        every layer is a block of its own.
    sparsity
        The target sparsity ``s``, in [0, 1).
    M, lam
        The outlier threshold (a multiple of the mean score) and the half-width of the density
        range.

    Returns
    -------
    dict
        ``{layer: sparsity}``, each in [0, 1]; a layer whose block's density would leave [0, 1]
        is clipped there.
    """
    check_scalar(sparsity, "sparsity", low=0.0, high=1.0, closed="left")
    check_scalar(M, "M", low=0.0, closed="neither")
    check_scalar(lam, "lam", low=0.0, high=1.0)
    if not scores:
        raise ValueError("scores is empty: no layer to allocate to")
    block_of = {name: (blocks[name] if blocks is not None else i) for i, name in enumerate(scores)}
    if blocks is not None:
        missing = [n for n in scores if n not in blocks]
        if missing:
            raise ValueError(f"blocks has no entry for {missing}")
    order = list(dict.fromkeys(block_of.values()))
    lod = torch.tensor([outlier_ratio(torch.cat([scores[n].flatten() for n in scores if block_of[n] == b]), M)
                        for b in order], dtype=torch.float64)
    spread = lod.max() - lod.min()
    if spread > 0:
        ratio = (lod - lod.min()) / spread * 2 * lam
        density = ratio - ratio.mean() + (1 - sparsity)
    else:
        density = torch.full_like(lod, 1 - sparsity)
    by_block = {b: float(1 - d.clamp(0, 1)) for b, d in zip(order, density)}
    return {name: by_block[block_of[name]] for name in scores}
