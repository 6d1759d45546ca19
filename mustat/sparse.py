"""Pruned models that are actually small: a compact file format and sparse inference.

File format: a `safetensors <https://github.com/huggingface/safetensors>`_ file
(safe to load, widely read) holding the model's *effective* state (masks
applied). Each tensor is stored in whichever encoding is smallest:

* ``dense``: as it is (biases, buffers, barely pruned weights);
* ``bitmask``: the kept entries' values plus one bit per entry (``uint8``, bit
  ``i % 8`` of byte ``i // 8`` for flat index ``i``);
* ``csr``: the tensor viewed as ``(shape[0], -1)``, row pointers (``int32``),
  column indices (``int16`` when there are at most 32767 columns, else
  ``int32``) and values.

A masked tensor's pattern is its mask (so a kept weight that happens to be 0
stays kept); an unmasked tensor's is its nonzeros. The header's metadata
(``mustat``) records each tensor's encoding, shape, dtype and whether it was
masked, so :func:`load_sparse` can restore an identical model, masks included.
"""

from __future__ import annotations

import json
import warnings
from numbers import Integral
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mustat._checks import check_option, check_scalar
from mustat._functional import clone_model
from mustat._io import atomic_write
from mustat._params import entries, install_mask

FORMAT = "mustat-sparse/1"
_BITS = 1 << torch.arange(8, dtype=torch.int32)


def _pack(keep: Tensor) -> Tensor:
    flat = keep.flatten().to(torch.int32)
    flat = F.pad(flat, (0, (-len(flat)) % 8))
    return (flat.view(-1, 8) * _BITS).sum(1).to(torch.uint8)


def _unpack(packed: Tensor, numel: int) -> Tensor:
    return ((packed.to(torch.int32).unsqueeze(1) & _BITS) != 0).flatten()[:numel]


def _encodings(key: str, value: Tensor, keep: Tensor) -> dict[str, dict[str, Tensor]]:
    """Every candidate encoding of one tensor: name -> stored tensors."""
    out = {"dense": {key: value}}
    vals = value.flatten()[keep.flatten()]
    out["bitmask"] = {f"{key}.values": vals, f"{key}.bitmask": _pack(keep)}
    rows = value.shape[0] if value.dim() > 1 else 1
    grid = keep.reshape(rows, -1)
    crow = F.pad(grid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cols = torch.nonzero(grid)[:, 1]
    cols = cols.to(torch.int16 if grid.shape[1] <= 32767 else torch.int32)
    out["csr"] = {f"{key}.values": vals, f"{key}.crow": crow, f"{key}.col": cols}
    return out


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def effective_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    """``(state, patterns, aliases)``: the model's state under the plain keys a finalized model
    would have (masks applied; no mask buffers), the keep-pattern of every masked tensor by
    key, and, for a tied tensor's further names, the key that holds its values. Touches no
    module: nothing is copied or finalized."""
    table = entries(model)
    state, patterns, aliases, owned = {}, {}, {}, set()
    for e in table.values():
        value = e.effective()
        mask = e.mask()
        for i, s in enumerate(e.slots):
            state[s.path] = value
            if mask is not None:
                patterns[s.path] = (mask != 0).cpu()
            if i:
                aliases[s.path] = e.name
            owned |= {s.key, f"{s.path.rpartition('.')[0]}.{s.attr}_mask".lstrip(".")}
    buffers = dict(model.named_buffers(remove_duplicate=False))
    first_key: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key in state or key in owned or ".parametrizations." in f".{key}":
            continue
        state[key] = value.detach()
        if key in buffers:  # a buffer of a module shared by two paths is stored once
            ident = id(buffers[key])
            if ident in first_key:
                aliases[key] = first_key[ident]
            else:
                first_key[ident] = key
    return state, patterns, aliases


def save_sparse(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s effective state compactly (module notes); written atomically.

    Pruned weights (masks from :func:`mustat.prune`, ``torch.nn.utils.prune`` or
    ``torch.ao.pruning``) are stored as values plus a bitmask or CSR indices, whichever is
    smaller, so their pattern always comes back; any other tensor that is mostly zero the
    same way, the rest as they are. A tied tensor is stored once. The model itself is not
    modified. Returns the path.
    """
    from safetensors.torch import save_file

    state, patterns, aliases = effective_state_dict(model)
    tensors, meta = {}, {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        info = dict(shape=list(value.shape), dtype=str(value.dtype).removeprefix("torch."), masked=key in patterns)
        if key in aliases:
            meta[key] = dict(info, encoding="alias", of=aliases[key])
            continue
        keep = patterns.get(key)
        if keep is None and value.is_floating_point() and value.numel():
            keep = value != 0
        if keep is None:
            choice, stored = "dense", {key: value}
        else:
            options = _encodings(key, value, keep)
            if key in patterns:  # the mask itself must be stored, even where dense values would be smaller
                del options["dense"]
            choice = min(options, key=lambda k: _nbytes(options[k]))
            stored = options[choice]
        tensors.update({k: v.contiguous() for k, v in stored.items()})
        meta[key] = dict(info, encoding=choice)
    header = {"format": FORMAT, "mustat": json.dumps(meta)}
    return atomic_write(path, lambda t: save_file(tensors, t, metadata=header))


def read_sparse(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(state, masks)`` from a :func:`save_sparse` file: the dense effective state dict
    (plain keys, CPU) and the keep-patterns of the tensors that were masked.

    A missing file is a ``FileNotFoundError``; a truncated, corrupt or foreign file a
    ``ValueError`` naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sparse model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a mustat sparse model (format {header.get('format')!r}, "
                                 f"want {FORMAT!r}); save it with mustat.save_sparse")
            meta = json.loads(header["mustat"])
            stored = {k: f.get_tensor(k) for k in f.keys()}
        state, masks = {}, {}
        for key, info in meta.items():
            if info["encoding"] != "alias":
                state[key], keep = _decode(key, info, stored)
                if info["masked"]:
                    masks[key] = keep
        for key, info in meta.items():
            if info["encoding"] == "alias":
                state[key] = state[info["of"]]
                if info["masked"]:
                    masks[key] = masks[info["of"]]
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path} is not a readable mustat sparse model file ({err}); save it again "
                         "with mustat.save_sparse") from None
    except Exception as err:  # safetensors' own errors (truncated header, bad JSON, missing tensors)
        raise ValueError(f"{path} is not a readable mustat sparse model file ({type(err).__name__}: {err}); "
                         "it may be truncated or corrupt: save it again with mustat.save_sparse") from None
    return state, masks


def _decode(key: str, info: dict, stored: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    shape, dtype = torch.Size(info["shape"]), getattr(torch, info["dtype"])
    if info["encoding"] == "dense":
        return stored[key], None
    if info["encoding"] == "bitmask":
        keep = _unpack(stored[f"{key}.bitmask"], shape.numel())
    else:
        crow = stored[f"{key}.crow"].long()
        rows = len(crow) - 1
        cols = stored[f"{key}.col"].long()
        row_of = torch.repeat_interleave(torch.arange(rows), crow.diff())
        width = shape.numel() // max(rows, 1)
        keep = torch.zeros(shape.numel(), dtype=torch.bool)
        keep[row_of * width + cols] = True
    dense = torch.zeros(shape.numel(), dtype=dtype)
    dense[keep] = stored[f"{key}.values"]
    return dense.view(shape), keep.view(shape)


def load_sparse(path: str | Path, model: nn.Module, *, masks: bool = True) -> nn.Module:
    """Load a :func:`save_sparse` file into ``model`` (same architecture); returns it.

    ``masks=True`` installs the masks of tensors that were pruned (mustat masks, on every
    place a tied tensor is used), so further training keeps them at zero;
    ``masks=False`` loads the values only (zeros where pruned; the model's own masks, if
    any, stay as they are). Either way the outputs equal the saved model's exactly (but for a
    tied tensor that was masked in only some of the places it is used, as
    ``torch.nn.utils.prune`` on a tied head leaves it: mustat's tensor has one mask, so it
    comes back masked everywhere).
    Everything is checked before the model is touched: a file that does not fit leaves it
    as it was.
    """
    state, patterns = read_sparse(path)
    own, _, _ = effective_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}; "
                         "is it the same architecture?")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the model's has "
                             f"{tuple(own[key].shape)}: is it the same architecture?")
    table = entries(model)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for e in table.values():  # what could fail mid-way is checked first
        if e.leaf is None:
            raise ValueError(f"{path}: {e.name!r} is computed by a parametrization load_sparse cannot write; "
                             "remove it (torch.nn.utils.parametrize.remove_parametrizations) first")
    with torch.no_grad():
        for e in table.values():
            if masks and e.name in patterns:
                install_mask(model, e.name, patterns[e.name], table)
            e.leaf.copy_(state[e.name])
        for key, value in state.items():
            if key in buffers:
                buffers[key].copy_(value)
    return model


class SparseLinear(nn.Module):
    """``nn.Linear`` with its weight in compressed sparse row form (inference only).

    ``y = x W^T + b`` by torch's CSR kernels; equal to the dense layer up to float
    summation order.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # torch calls its CSR support beta; it is what we measure
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            weight = linear.weight.detach().to_sparse_csr()
        self.register_buffer("weight", weight)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        # Batch 1 is the case sparsity can speed up on a CPU (a sparse matrix-vector product);
        # its branch is kept to the fewest Python-level tensor calls, which cost microseconds here.
        if x.dim() == 2 and x.shape[0] == 1 and self.bias is not None:
            return torch.addmv(self.bias, self.weight, x[0]).unsqueeze(0)
        flat = x.reshape(-1, self.in_features)
        if self.bias is not None:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight, flat.t()).t()
        else:
            y = (self.weight @ flat.t()).t()
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.weight.values().numel()}"


def sparse_inference(model: nn.Module, *, min_sparsity: float = 0.9, min_params: int = 100_000,
                     kinds: tuple[str, ...] = ("linear",)) -> nn.Module:
    """A copy of ``model`` for inference with every ``nn.Linear`` that has at least
    ``min_params`` weights, at least ``min_sparsity`` of them zero, replaced by a
    :class:`SparseLinear`.

    Masks are applied first (the copy is finalized). Small layers stay dense: torch's
    dense kernels beat its CSR ones on them, and whether the large ones gain depends on
    the batch size and the machine (``benchmarks/sparse_export.py``, figures in
    docs/PERFORMANCE.md: on a 2-core CPU the CSR model is faster at batch 128 and not
    at batch 1, where per-call overheads dominate). Convolutions stay dense: torch has
    no sparse CPU convolution; so do the Linear layers of torch's transformer layers, whose
    fused fast paths read their weights directly. ``model`` is not modified.
    """
    check_scalar(min_sparsity, "min_sparsity", low=0.0, high=1.0)
    check_scalar(min_params, "min_params", kind=Integral, low=0)
    for k in kinds:
        check_option(k, "kinds", ["linear"])
    from mustat.pruning import finalize

    work = finalize(clone_model(model)).eval()
    # these read their Linear children's weights directly (torch's fused fast paths), so a
    # sparse weight there would break them
    readers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)
    inside = {id(m) for r in work.modules() if isinstance(r, readers) for m in r.modules()}
    for path, module in list(work.named_modules()):
        if (type(module) is nn.Linear and id(module) not in inside and module.weight.numel() >= min_params
                and float((module.weight == 0).double().mean()) >= min_sparsity):
            parent, _, child = path.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, child, SparseLinear(module))
    return work
