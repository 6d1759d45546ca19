"""Sparsity patterns: unstructured, or N:M (at most N kept in every M consecutive weights).

N:M follows NVIDIA's semi-structured sparsity: every group is M consecutive *input channels*
feeding one output.

- A 2-D weight ``(out, in)`` (``nn.Linear``): M consecutive entries of a row, the last
  dimension. ``transformers``' ``Conv1D`` stores ``(in, out)``; callers transpose it first
  (:func:`is_transposed`).
- A convolution's weight ``(out, in, *kernel)``: M consecutive input channels at one kernel tap
  of one output channel, the layout the sparse kernels read (cuDNN's NHWC, NVIDIA apex ASP's
  ``(K, R, S, C)``, i.e. ``weight.permute(0, 2, 3, 1)``). In code the weight is seen as the
  matrix ``t.movedim(1, -1).reshape(out, -1)`` (taps x in per row) and grouped along its rows
  (:func:`to_groups`, :func:`from_groups`), so ``in`` must be a multiple of M. Grouping the
  ``(out, in * prod(kernel))`` view instead would put kernel taps of one channel in a group,
  which no sparse kernel runs.
- A 1-D tensor: one row.

2:4 is the pattern CUDA's sparse tensor cores run (``torch.sparse.to_sparse_semi_structured``,
compute capability 8.0 and newer); on a CPU it saves no time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``n`` kept in every group of ``m`` (``n = m = 0``: unstructured)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The fraction of weights an N:M pattern prunes, 1 - N/M."""
        return 1.0 - self.n / self.m if self.structured else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(pattern: str | Pattern | None, name: str = "pattern") -> Pattern:
    """``"unstructured"`` (or None) or ``"N:M"`` with 0 < N < M, as a :class:`Pattern`."""
    if pattern is None or isinstance(pattern, Pattern):
        return pattern or Pattern()
    if not isinstance(pattern, str):
        raise TypeError(f"{name} must be 'unstructured' or a string 'N:M' such as '2:4', got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return Pattern()
    hit = _NM.match(pattern)
    if not hit or not 0 < int(hit[1]) < int(hit[2]):
        raise ValueError(f"{name}={pattern!r} is not valid; give 'unstructured' or 'N:M' with 0 < N < M "
                         "(N kept in every M consecutive weights of a row), such as '2:4' or '4:8'")
    return Pattern(int(hit[1]), int(hit[2]))


def resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The sparsity an N:M pattern implies, checked against an explicit one."""
    if not pattern.structured:
        if sparsity is None:
            raise ValueError("sparsity is required for an unstructured pattern (a fraction in [0, 1))")
        return sparsity
    if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
        raise ValueError(f"sparsity={sparsity} contradicts pattern='{pattern}', which prunes exactly "
                         f"{pattern.sparsity:g} of each row; leave sparsity out (None) or give {pattern.sparsity:g}")
    return pattern.sparsity


def is_transposed(module: nn.Module, attr: str) -> bool:
    """Whether ``module.<attr>`` stores its matrix as inputs x outputs: ``transformers``' ``Conv1D``
    (GPT-2), whose rows for N:M are the stored tensor's columns."""
    return attr == "weight" and is_hf_conv1d(module)


def is_hf_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D``, recognised without importing transformers (a masked
    one's class is torch's ``ParametrizedConv1D`` subclass of it)."""
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf")


def _matrix(t: Tensor) -> Tensor:
    """``t`` as the matrix whose rows hold the groups (see the module notes)."""
    if t.dim() > 2:
        return t.movedim(1, -1).reshape(t.shape[0], -1)  # (out, *kernel, in) -> (out, taps * in)
    return t if t.dim() == 2 else t.reshape(1, -1)


def to_groups(t: Tensor, m: int) -> Tensor:
    """``t`` as ``(rows, groups, m)``: every slice ``[i, j]`` is one N:M group.

    Linear ``(out, in)``: ``m`` consecutive entries of a row. Convolution ``(out, in, *kernel)``:
    ``m`` consecutive input channels at one kernel tap, in the order of
    ``t.permute(0, *kernel dims, 1)`` (apex ASP's ``(K, R, S, C)``). 1-D: one row. The input
    dimension (dim 1; a 1-D tensor's length) must be a multiple of ``m`` (:func:`check_groups`).
    """
    mat = _matrix(t)
    return mat.reshape(mat.shape[0], -1, m)


def from_groups(g: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The inverse of :func:`to_groups`: the groups ``g`` laid back out as a tensor of ``shape``."""
    shape = torch.Size(shape)
    if len(shape) > 2:
        return g.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return g.reshape(shape)


def _group_width(shape: torch.Size | tuple[int, ...]) -> int:
    """The length of the runs that are cut into groups: ``in`` (dim 1), or a 1-D tensor's length."""
    return int(shape[1]) if len(shape) > 1 else int(shape[0])


def check_groups(shape: torch.Size | tuple[int, ...], pattern: Pattern, name: str) -> None:
    """Refuse a tensor whose inputs do not split into whole groups of M.

    Raises
    ------
    ValueError
        If ``pattern`` is N:M and the input dimension (dim 1: a matrix's row length, a
        convolution's ``in_channels``; a 1-D tensor's length) is not a multiple of M.
    """
    if not pattern.structured:
        return
    width = _group_width(shape)
    if width % pattern.m == 0:
        return
    if len(shape) > 2:
        raise ValueError(f"pattern='{pattern}' needs a convolution's in_channels (dim 1 of its weight) to be a "
                         f"multiple of {pattern.m}, since every group is {pattern.m} consecutive input channels at "
                         f"one kernel tap; {name!r} has shape {tuple(shape)}, in_channels {width}; leave it out of "
                         "params or choose another M")
    raise ValueError(f"pattern='{pattern}' needs rows whose length is a multiple of {pattern.m}; {name!r} has "
                     f"shape {tuple(shape)}, rows of {width}; leave it out of params or choose another M")


def nm_keep(scores: Tensor, pattern: Pattern, alive: Tensor | None = None) -> Tensor:
    """Keep-mask with the N highest scores of every group of M (groups: see the module notes).

    A weight already pruned (``alive`` False) stays pruned, and counts as one of the group's
    M - N pruned weights. Ties go to the earlier position, so the mask is deterministic.

    Parameters
    ----------
    scores
        Scores shaped like the weight: ``(out, in)``, ``(out, in, *kernel)`` or 1-D; compared in
        float64. The input dimension must split into groups of M (:func:`check_groups`).
    pattern
        A structured :class:`Pattern`.
    alive
        Optional bool mask shaped like ``scores``; False marks weights already pruned.

    Returns
    -------
    Tensor
        Bool keep-mask shaped like ``scores``.

    Notes
    -----
    The M - N lowest of each group are found with one ``torch.topk(..., largest=False)`` and
    scattered into the mask, as SparseGPT and Wanda do. ``topk`` does not break ties by
    position, so a group whose (M - N)-th and (M - N + 1)-th lowest scores are not strictly
    ordered (a tie across the cut, or NaN) is redone with a stable sort; elsewhere the set of
    the M - N lowest is unique and the two agree.
    """
    m, cut = pattern.m, pattern.m - pattern.n
    g = to_groups(scores, m).to(torch.float64)
    live = None if alive is None else to_groups(alive, m).bool()
    if live is not None:
        g = g.masked_fill(~live, float("-inf"))
    low = torch.topk(g, cut + 1, dim=-1, largest=False, sorted=True)
    keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, low.indices[..., :cut], False)
    tied = ~(low.values[..., cut - 1] < low.values[..., cut])
    if tied.any():
        # stable descending sort: equal scores keep their order, the earlier one is kept
        order = torch.sort(g[tied], dim=-1, descending=True, stable=True).indices[..., : pattern.n]
        redo = torch.zeros(order.shape[:-1] + (m,), dtype=torch.bool, device=g.device)
        keep[tied] = redo.scatter_(-1, order, True)
    if live is not None:
        keep &= live
    return from_groups(keep, scores.shape).contiguous()


def pattern_violations(values: Tensor, pattern: str | Pattern) -> int:
    """The number of groups of M with more than N nonzero entries (0 when ``values`` obeys).

    ``values`` is laid out like a weight (see the module notes); a convolution's groups are M
    consecutive input channels at one kernel tap.
    """
    pattern = parse_pattern(pattern)
    if not pattern.structured:
        return 0
    check_groups(values.shape, pattern, "values")
    nonzero = to_groups(values, pattern.m) != 0
    return int((nonzero.sum(-1) > pattern.n).sum())


def check_pattern(model: nn.Module, pattern: str | Pattern, params=None) -> dict[str, int]:
    """Groups breaking ``pattern`` in each pruned tensor's effective values (masks applied).

    Returns ``{name: violating groups}`` for the tensors that break it: an empty dict means every
    group of every tensor obeys. ``params``: the names to check (default: every masked tensor,
    or every prunable one if none is masked). The groups are those of :func:`to_groups` (a
    convolution's: M consecutive input channels at one kernel tap); a tensor whose inputs do not
    split into groups of M is refused with a ``ValueError`` naming it (:func:`check_groups`).
    """
    from mustat._params import entries, masked_names, select  # noqa: I001 (imports the package that imports this)

    pattern = parse_pattern(pattern)
    table = entries(model)
    names = select(model, params) if params is not None else (masked_names(model, table) or select(model, None))
    out = {}
    for name in names:
        e = table[name]
        values = e.effective()
        values = values.T if is_transposed(e.module, e.attr) else values
        check_groups(values.shape, pattern, name)
        bad = pattern_violations(values, pattern)
        if bad:
            out[name] = bad
    return out
