"""Sparsity patterns: unstructured, or N:M (at most N kept in every M consecutive weights).

N:M follows NVIDIA's semi-structured sparsity: the groups are M consecutive entries along the
input dimension of each output row, the last dimension of a 2-D weight (``nn.Linear``). A
convolution's weight ``(out, in, *kernel)`` is read as the matrix ``(out, in * prod(kernel))``
and grouped along that row, which is how it is lowered to a matrix product (im2col). 2:4 is the
pattern CUDA's sparse tensor cores run (``torch.sparse.to_sparse_semi_structured``, compute
capability 8.0 and newer); on a CPU it saves no time.
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


def rows(t: Tensor) -> Tensor:
    """``t`` as the matrix whose rows are grouped: ``(out, everything else)``."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def check_groups(shape: torch.Size | tuple[int, ...], pattern: Pattern, name: str) -> None:
    """Refuse a tensor whose rows do not split into whole groups of M."""
    width = int(torch.Size(shape)[1:].numel()) if len(shape) > 1 else int(shape[0])
    if pattern.structured and width % pattern.m:
        raise ValueError(f"pattern='{pattern}' needs rows whose length is a multiple of {pattern.m}; {name!r} has "
                         f"shape {tuple(shape)}, rows of {width}; leave it out of params or choose another M")


def nm_keep(scores: Tensor, pattern: Pattern, alive: Tensor | None = None) -> Tensor:
    """Keep-mask with the N highest scores of every group of M (per row, see the module notes).

    A weight already pruned (``alive`` False) stays pruned, and counts as one of the group's
    M - N pruned weights. Ties go to the earlier position, so the mask is deterministic.
    """
    s = rows(scores).to(torch.float64)
    if alive is not None:
        s = s.masked_fill(~rows(alive).bool(), float("-inf"))
    g = s.reshape(s.shape[0], -1, pattern.m)
    # stable descending sort: equal scores keep their order
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., : pattern.n]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    if alive is not None:
        keep &= rows(alive).bool().reshape(keep.shape)
    return keep.reshape(scores.shape)


def pattern_violations(values: Tensor, pattern: str | Pattern) -> int:
    """The number of groups of M with more than N nonzero entries (0 when ``values`` obeys)."""
    pattern = parse_pattern(pattern)
    if not pattern.structured:
        return 0
    check_groups(values.shape, pattern, "values")
    nonzero = (rows(values) != 0).reshape(values.shape[0] if values.dim() > 1 else 1, -1, pattern.m)
    return int((nonzero.sum(-1) > pattern.n).sum())


def check_pattern(model: nn.Module, pattern: str | Pattern, params=None) -> dict[str, int]:
    """Groups breaking ``pattern`` in each pruned tensor's effective values (masks applied).

    Returns ``{name: violating groups}`` for the tensors that break it: an empty dict means every
    group of every tensor obeys. ``params``: the names to check (default: every masked tensor,
    or every prunable one if none is masked).
    """
    from mustat._params import entries, masked_names, select  # noqa: I001 (imports the package that imports this)

    table = entries(model)
    names = select(model, params) if params is not None else (masked_names(model, table) or select(model, None))
    out = {}
    for name in names:
        e = table[name]
        values = e.effective()
        bad = pattern_violations(values.T if is_transposed(e.module, e.attr) else values, pattern)
        if bad:
            out[name] = bad
    return out
