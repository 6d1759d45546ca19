"""The layers one-shot pruning finds, each seen as matrices ``W`` (rows x inputs) and the inputs
that feed them.

- ``nn.Linear`` (``y = x W^T + b``): the weight itself; its input is the module's input.
- ``transformers``' ``Conv1D`` (GPT-2; ``y = x W + b``, weight stored inputs x outputs): the
  transposed weight.
- ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``): the weight ``(out, in, *kernel)`` as the matrix
  ``(out, taps x in)``, input channels fastest (the hardware N:M layout, apex ASP's ``(K, R, S, C)``:
  a group of M consecutive columns is M input channels at one kernel tap); its inputs are the
  unfolded patches (im2col, as SparseGPT prunes convolutions), one token per output position.
- ``nn.MultiheadAttention`` (``nn.TransformerEncoder``, packed ``in_proj_weight``): the query, key
  and value rows of ``in_proj_weight`` are three matrices fed by the query, key and value inputs;
  its ``out_proj`` is never called as a module, so its input (the heads' concatenated values) is
  recomputed by ``F.multi_head_attention_forward`` with an identity output projection, and checked
  against the module's real output on the first batch.

Embeddings, norms and biases are left alone; a weight of any other kind (a grouped or 3-D
convolution, say) is reported as skipped, and :func:`mustat.layerwise.oneshot` warns with the
sparsity the model will reach.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mustat._params import Entry, entry
from mustat.patterns import is_hf_conv1d

KINDS = ("linear", "conv1d", "conv", "mha-in", "mha-out")
#: the weight layers (:data:`mustat._params.PRUNABLE_TYPES`) whose weight this view unfolds to a matrix
#: with one token per output position; K-FAC's factors take the same view
MATRIX_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_CONVS = MATRIX_TYPES[1:]


@dataclass(eq=False)
class Target:
    """One prunable tensor: its mustat name, the module and attribute holding it, and its kind.
    ``parts`` are ``(row slice, source)``: the rows of the matrix view fed by one input
    (``"input"``, or for attention ``"query"``, ``"key"``, ``"value"``, ``"values"``)."""

    name: str
    path: str
    module: nn.Module
    attr: str
    kind: str
    entry: Entry
    caller: nn.Module  # the module whose call carries the input (the attention module for out_proj)

    @property
    def parts(self) -> list[tuple[slice, str]]:
        if self.kind == "mha-in":
            e = self.module.embed_dim
            return [(slice(0, e), "query"), (slice(e, 2 * e), "key"), (slice(2 * e, 3 * e), "value")]
        return [(slice(None), "values" if self.kind == "mha-out" else "input")]

    def view(self, t: Tensor) -> Tensor:
        """A tensor of the stored weight's shape as the matrix rows x inputs."""
        if self.kind == "conv1d":
            return t.T
        if self.kind == "conv":
            return t.movedim(1, -1).reshape(t.shape[0], -1)
        return t

    def to_stored(self, M: Tensor) -> Tensor:
        """The inverse of :meth:`view`."""
        if self.kind == "conv1d":
            return M.T
        if self.kind == "conv":
            shape = self.entry.source()[0].shape
            return M.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
        return M

    def matrix(self) -> Tensor:
        """The effective weight (masks applied) as rows x inputs, detached."""
        return self.view(self.entry.effective())

    def alive(self) -> Tensor:
        mask = self.entry.mask()
        W = self.entry.source()[0]
        return self.view(torch.ones_like(W, dtype=torch.bool) if mask is None else mask.bool())

    def tokens(self, x: Tensor) -> Tensor:
        """A convolution's input ``(batch, in, *spatial)`` as its patches, one row per output
        position, columns in the order of :meth:`view` (taps x in)."""
        cols = patches(self.module, x)                                 # (batch, in * taps, positions)
        b, _, L = cols.shape
        cols = cols.reshape(b, self.module.in_channels, -1, L)         # (batch, in, taps, positions)
        return cols.permute(0, 3, 2, 1).reshape(b * L, -1)             # (tokens, taps x in)


def patches(module: nn.Module, x: Tensor) -> Tensor:
    """A matrix layer's input as ``(batch, features, positions)``, features in the order of the
    stored ``weight.reshape(out, -1)`` (a convolution: in x taps, unfolded as im2col with the
    module's padding, whatever its mode; a Linear layer: its last axis, every leading axis after
    the first a position). K-FAC's input factor and :meth:`Target.tokens` both read this."""
    if isinstance(module, _CONVS):
        m = module
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or any(m.padding):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        if x.dim() == m.weight.dim() - 1:          # an unbatched call
            x = x[None]
        if isinstance(m, nn.Conv1d):               # as a 2-D convolution of height 1
            x, k, d, s = x[:, :, None], (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            k, d, s = m.kernel_size, m.dilation, m.stride
        return F.unfold(x, k, dilation=d, stride=s)
    if x.dim() == 1:
        x = x[None]
    return x.reshape(len(x), -1, x.shape[-1]).transpose(1, 2)


def find_targets(model: nn.Module, table: dict[str, Entry], names: list[str] | None,
                 exclude: tuple[str, ...]) -> tuple[list[Target], list[tuple[str, str]]]:
    """Every supported tensor (or the ``names`` asked for) and ``(name, why)`` for those left out."""
    found: dict[str, Target] = {}
    skipped: list[tuple[str, str]] = []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    owner = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    by_place = {(id(s.module), s.attr): e for e in table.values() for s in e.places()}
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                skipped.append((f"{path}.q_proj_weight", "attention with separate q/k/v weights is not supported"))
                continue
            attr, kind, caller = "in_proj_weight", "mha-in", module
        elif id(module) in owner:
            attr, kind, caller = "weight", "mha-out", owner[id(module)]
        elif isinstance(module, nn.Linear):
            attr, kind, caller = "weight", "linear", module
        elif is_hf_conv1d(module):
            attr, kind, caller = "weight", "conv1d", module
        elif isinstance(module, _CONVS) and module.groups == 1:
            attr, kind, caller = "weight", "conv", module
        else:
            if isinstance(module, nn.modules.conv._ConvNd):
                e = by_place.get((id(module), "weight"))
                why = "grouped convolutions are not supported" if module.groups > 1 else \
                    f"{type(module).__name__} is not supported (Linear, Conv1d, Conv2d, Conv1D, MultiheadAttention)"
                if e is not None:
                    skipped.append((e.name, why))
            continue
        e = by_place.get((id(module), attr))
        if e is None or e.name in found:
            continue
        if names is None:
            if path in exclude or path.rpartition(".")[2] in exclude:
                skipped.append((e.name, "excluded by name (exclude=...)"))
                continue
            if e.tied or (e.leaf is not None and id(e.leaf) in embeddings):
                skipped.append((e.name, "tied to another tensor (an embedding, say)"))
                continue
        found[e.name] = Target(e.name, path, module, attr, kind, e, caller)
    if names is not None:
        wanted = {entry(model, n, table).name: n for n in names}   # an unknown name is refused there
        missing = [n for name, n in wanted.items() if name not in found]
        if missing:
            valid = ", ".join(list(found)[:8]) + (" ..." if len(found) > 8 else "")
            raise ValueError(f"layers has {missing}, which are not weights one-shot pruning supports (Linear, "
                             f"Conv1d, Conv2d, transformers' Conv1D, MultiheadAttention); supported here: {valid}")
        for t in found.values():
            if t.name in wanted and t.entry.tied:
                raise ValueError(f"layers has {wanted[t.name]!r}, which is tied to {t.name!r} (one tensor in several "
                                 "places, an embedding and a head, say); leave it out")
        return [t for t in found.values() if t.name in wanted], skipped
    return list(found.values()), skipped


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def mha_inputs(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict:
    bound = _MHA_SIGNATURE.bind(mha, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def mha_values(mha: nn.MultiheadAttention, call: dict) -> Tensor:
    """The input of ``out_proj``: the attention with an identity output projection, in the layout
    of the module's output (``(batch, seq, embed)`` when ``batch_first``)."""
    q, k, v = call["query"], call["key"], call["value"]
    batched = q.dim() == 3
    if mha.batch_first and batched:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    E = mha.embed_dim
    out, _ = F.multi_head_attention_forward(
        q, k, v, E, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
        mha.add_zero_attn, 0.0, torch.eye(E, dtype=q.dtype, device=q.device), None, training=False,
        key_padding_mask=call["key_padding_mask"], need_weights=False, attn_mask=call["attn_mask"],
        is_causal=call["is_causal"])
    return out.transpose(0, 1) if mha.batch_first and batched else out
