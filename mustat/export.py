r"""Pruned Hugging Face models as folders that load where they are deployed.

Three formats (:data:`FORMATS`), written by :func:`save_pruned` and read back by
:func:`load_pruned` with identical weights, logits and masks:

* ``"save-pretrained"``: the model's effective weights (masks applied) through its own
  ``save_pretrained``: any ``from_pretrained`` reloads it, with the zeros where the masks were.
  The masks themselves go beside, in ``masks.safetensors`` (one bit per entry, the
  :mod:`mustat.sparse` packing), which ``from_pretrained`` ignores and :func:`load_pruned` reads.
* ``"sparse-bitmask"`` and ``"sparse-24-bitmask"``: a compressed-tensors checkpoint, the format
  llm-compressor wrote for sparse models up to compressed-tensors 0.14 (now legacy: below): every masked ``nn.Linear`` weight stored as
  its kept values plus a bitmask, the rest as they are, and ``config.json`` carrying a
  ``quantization_config`` with ``quant_method: "compressed-tensors"`` and a ``sparsity_config``
  (``targets: ["Linear"]``, the dense Linear layers in ``ignore``). Per weight, with
  :math:`r \times c` its shape and the bitmask packed along each row, least significant bit
  first (``numpy.packbits(..., bitorder="little")``):

  - ``sparse-bitmask`` (any sparsity): ``<layer>.compressed`` (the kept values, 1-D, row-major),
    ``<layer>.bitmask`` (``uint8``, :math:`r \times \lceil c/8 \rceil`), ``<layer>.row_offsets``
    (``int64``: where each row's values start) and ``<layer>.shape`` (``int64``, ``[r, c]``);
  - ``sparse-24-bitmask`` (2:4 along the inputs): ``<layer>.compressed`` (:math:`r \times c/2`:
    exactly 2 values of every 4), ``<layer>.bitmask`` and ``<layer>.shape`` (``[[r], [c]]``).

  The bitmask is the *mask*, not the nonzeros, so a kept weight that happens to be 0 stays kept;
  a 2:4 group that keeps fewer than 2 entries is stored with masked entries (value 0) filling it
  to 2, and those come back kept. These are the layouts of compressed-tensors up to 0.14.0.1
  (``BitmaskCompressor``, ``Sparse24BitMaskCompressor``; the tests compare the files with its own
  compressor and decompress them with it). mustat writes and reads them without the package.

**Where each format loads (read 2026-12-07).** The sparse formats are *legacy* upstream:
compressed-tensors 0.15 and later dropped sparse compression (0.20.1 lists both formats as
"legacy"), transformers 5 requires compressed-tensors >= 0.15 to open a compressed-tensors
checkpoint (transformers PR #46342), so its ``from_pretrained`` cannot read these folders; vLLM
removed its 2:4 (Sparse24) support (vllm PR #36799, March 2026) and from 0.24 rejects
compressed sparse formats; and llm-compressor 0.14.0.1 (with compressed-tensors 0.19.0) saves a
pruned model's weights dense. So today a pruned model that must load in transformers or vLLM is a
``"save-pretrained"`` folder (the default); the sparse formats hold the same model in about
half the bytes at 50% (values plus one bit per weight) for :func:`load_pruned`, for
compressed-tensors <= 0.14.0.1 (with the transformers 4 and vLLM releases of its time) and for
archives.

Every folder is written atomically: into a temporary folder beside it, renamed into place when
complete, so an interrupted export leaves no half-written folder (an existing folder is replaced
only with ``overwrite=True``, and only once the new one is complete).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mustat._checks import check_option
from mustat._params import entries, install_mask, masked_names
from mustat.patterns import pattern_violations

FORMATS = ("save-pretrained", "sparse-bitmask", "sparse-24-bitmask")
SPARSE_FORMATS = FORMATS[1:]
#: the compressed-tensors release whose on-disk layout these files follow (module notes)
COMPRESSED_TENSORS_LAYOUT = "0.14.0.1"
MASKS_FILE = "masks.safetensors"
_PARAMS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
           "sparse-24-bitmask": ("shape", "compressed", "bitmask")}


def _pack_rows(keep: Tensor) -> Tensor:
    """A bool matrix as bits along each row, least significant first (compressed-tensors' packing)."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=-1, bitorder="little"))


def _unpack_rows(bits: Tensor, shape: list[int]) -> Tensor:
    rows = np.unpackbits(bits.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(rows.reshape(shape).astype(bool))


def _fill_24(keep: Tensor) -> Tensor:
    """``keep`` with every group of 4 inputs holding exactly 2 kept entries: groups with fewer get
    their first masked entries added."""
    g = keep.reshape(-1, 4).clone()
    short = g.sum(1) < 2
    if short.any():
        rank = torch.cumsum((~g[short]).to(torch.int64), 1)           # 1, 2, ... over the masked entries
        g[short] |= (~g[short]) & (rank <= (2 - g[short].sum(1, keepdim=True)))
    return g.reshape(keep.shape)


def compress_weight(prefix: str, value: Tensor, keep: Tensor, format: str) -> dict[str, Tensor]:
    """The stored tensors of one weight under ``format`` (module notes), keyed ``<prefix>.<param>``.

    Raises
    ------
    ValueError
        ``format="sparse-24-bitmask"`` and a group of 4 inputs keeps more than 2 entries, or the
        inputs do not split into groups of 4.
    """
    value, keep = value.detach().cpu(), keep.detach().cpu().bool()
    rows, cols = value.shape
    if format == "sparse-24-bitmask":
        if cols % 4:
            raise ValueError(f"{prefix}: {cols} inputs do not split into groups of 4, as sparse-24-bitmask needs")
        if (keep.reshape(-1, 4).sum(1) > 2).any():
            bad = int((keep.reshape(-1, 4).sum(1) > 2).sum())
            raise ValueError(f"{prefix}: {bad} groups of 4 inputs keep more than 2 entries; format="
                             "'sparse-24-bitmask' needs a 2:4 model (prune with pattern='2:4'), or use "
                             "format='sparse-bitmask'")
        keep = _fill_24(keep)
        shape = torch.tensor([rows, cols]).reshape(-1, 1)
        return {f"{prefix}.shape": shape, f"{prefix}.compressed": value[keep].reshape(rows, cols // 2),
                f"{prefix}.bitmask": _pack_rows(keep)}
    counts = keep.sum(1)
    return {f"{prefix}.shape": torch.tensor([rows, cols]), f"{prefix}.compressed": value[keep],
            f"{prefix}.bitmask": _pack_rows(keep), f"{prefix}.row_offsets": torch.cumsum(counts, 0) - counts}


def decompress_weight(stored: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(weight, keep)`` from one weight's stored tensors (``shape``, ``compressed``, ``bitmask``,
    and ``row_offsets`` for ``sparse-bitmask``), keyed without the prefix."""
    shape = [int(s) for s in stored["shape"].flatten().tolist()]
    keep = _unpack_rows(stored["bitmask"], shape)
    values = stored["compressed"].flatten()
    if int(keep.sum()) != values.numel():
        raise ValueError(f"a compressed weight of shape {shape} stores {values.numel()} values for a bitmask of "
                         f"{int(keep.sum())}: the file is corrupt")
    out = torch.zeros(shape, dtype=values.dtype)
    out[keep] = values
    return out, keep


def _linear_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Masked ``nn.Linear`` weights used in one place: name -> layer (the compressible ones)."""
    table = entries(model)
    out = {}
    for name in masked_names(model, table):
        e = table[name]
        if e.attr == "weight" and isinstance(e.module, nn.Linear) and len(e.slots) == 1:
            out[name] = e.module
    return out


def _check_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it (the old folder stays until the "
                              "new one is complete)")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")


def _publish(tmp: Path, folder: Path) -> None:
    """Move the complete ``tmp`` onto ``folder``; an existing folder is renamed away first and
    removed after (two renames: never a moment with a half-written ``folder``)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sparsity_config(model: nn.Module, compressed: Mapping[str, Tensor], format: str) -> dict:
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kept = {n.removesuffix(".weight") for n in compressed}
    zeros = sum(int((~k).sum()) for k in compressed.values())
    total = sum(k.numel() for k in compressed.values())
    return {"format": format, "global_sparsity": zeros / max(total, 1),
            "sparsity_structure": "2:4" if format == "sparse-24-bitmask" else "unstructured",
            "targets": ["Linear"], "ignore": [n for n in linear if n not in kept]}


def _save_masks(path: Path, masks: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {name: _pack_rows(keep.reshape(keep.shape[0], -1) if keep.dim() > 1 else keep.reshape(1, -1))
               for name, keep in masks.items()}
    meta = {"mustat-masks": json.dumps({n: list(k.shape) for n, k in masks.items()})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _read_masks(path: Path) -> dict[str, Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads(f.metadata()["mustat-masks"])
        out = {}
        for name, shape in shapes.items():
            flat = [shape[0], int(np.prod(shape[1:]))] if len(shape) > 1 else [1, shape[0]]
            out[name] = _unpack_rows(f.get_tensor(name), flat).reshape(shape)
    return out


def _plain_copy(model: nn.Module) -> nn.Module:
    """A fresh model of ``model``'s class and config (less any ``quantization_config``: a model
    dequantized from GGUF is plain now, but transformers refuses to save it as it was loaded) holding
    its effective weights, masks applied; ``model`` is not touched."""
    from mustat.sparse import effective_state_dict

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    state, _, _ = effective_state_dict(model)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    plain = type(model)._from_config(config, dtype=dtype).eval()
    _load(plain, state, type(model).__name__)
    return plain


def _load(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``load_state_dict`` that tolerates only the tied copies transformers leaves out, then ties."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or []
    tied = set(tied) if not isinstance(tied, Mapping) else set(tied)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"the stored state does not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()


def save_pruned(model: nn.Module, folder: str | Path, *, format: str = "save-pretrained", overwrite: bool = False,
                tokenizer=None) -> Path:
    """Save a pruned transformers model (masks from :func:`mustat.prune` or :func:`mustat.oneshot`)
    as a folder that reloads with identical weights, logits and masks (module notes).

    Parameters
    ----------
    model
        A ``transformers`` ``PreTrainedModel`` (it has ``save_pretrained``); not modified. A plain
        torch module: use :func:`mustat.save_sparse`.
    folder
        The folder to write (atomically: module notes).
    format
        ``"save-pretrained"`` (default: dense effective weights, masks beside; loads in
        transformers and vLLM), ``"sparse-bitmask"`` (compressed-tensors, any sparsity) or
        ``"sparse-24-bitmask"`` (compressed-tensors, 2:4 models only); where each loads: module
        notes.
    overwrite
        Replace an existing ``folder`` (once the new one is complete).
    tokenizer
        Saved into the folder too (``save_pretrained``), where given.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    ValueError
        A bad ``format``, a model without ``save_pretrained``, or (``sparse-24-bitmask``) a weight
        that is not 2:4; all before anything is written.
    FileExistsError
        ``folder`` exists and ``overwrite`` is False.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_option(format, "format", FORMATS)
    if not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(f"save_pruned needs a transformers model (with save_pretrained), got {type(model).__name__}; "
                         "save a plain torch module with mustat.save_sparse")
    folder = Path(folder)
    _check_folder(folder, overwrite)
    table = entries(model)
    masks = {n: table[n].mask().detach().cpu() != 0 for n in masked_names(model, table)}
    compress = {} if format == "save-pretrained" else _linear_weights(model)
    if format == "sparse-24-bitmask":
        for name in compress:
            shape = tuple(masks[name].shape)
            bad = "its inputs do not split into groups of 4" if shape[1] % 4 else \
                pattern_violations(masks[name].to(torch.int8), "2:4")
            if bad:
                why = bad if isinstance(bad, str) else f"{bad} groups of 4 inputs keep more than 2"
                raise ValueError(f"format='sparse-24-bitmask' needs every pruned Linear weight 2:4 along its inputs; "
                                 f"{name!r} (shape {shape}) is not: {why}. Prune with pattern='2:4', or use "
                                 "format='sparse-bitmask'")
    plain = _plain_copy(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        del plain
        stored = {n: masks[n] for n in compress}
        if compress:
            index_path = tmp / "model.safetensors.index.json"
            index = json.loads(index_path.read_text()) if index_path.exists() else None
            for shard in sorted(tmp.glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                out = {}
                for key, value in tensors.items():
                    if key in compress:
                        parts = compress_weight(key.removesuffix(".weight"), value, masks[key], format)
                        out.update(parts)
                        if index is not None:
                            index["weight_map"].pop(key, None)
                            index["weight_map"].update({k: shard.name for k in parts})
                    else:
                        out[key] = value
                save_file({k: v.contiguous() for k, v in out.items()}, str(shard), metadata={**meta, "format": "pt"})
            if index is not None:
                index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config["quantization_config"] = {
                "version": COMPRESSED_TENSORS_LAYOUT, "quant_method": "compressed-tensors",
                "sparsity_config": _sparsity_config(model, stored, format), "transform_config": {}}
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        rest = {n: k for n, k in masks.items() if n not in compress}
        if rest:
            _save_masks(tmp / MASKS_FILE, rest)
        mode = (tmp / "config.json").stat().st_mode & 0o777     # created by open(): the umask's mode
        for path in tmp.iterdir():                                # safetensors' files come owner-only
            os.chmod(path, mode)
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_pruned(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """``(state, masks, config)`` of a :func:`save_pruned` folder (or any compressed-tensors
    sparse-bitmask / sparse-24-bitmask checkpoint, or any safetensors ``save_pretrained`` folder):
    the dense state by key, the keep-masks by key (from the bitmasks and ``masks.safetensors``), and
    ``config.json`` as a dict."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model folder")
    config = json.loads((folder / "config.json").read_text())
    sparsity = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    fmt = sparsity.get("format")
    if config.get("quantization_config") and fmt not in SPARSE_FORMATS:
        raise ValueError(f"{folder}: quantization_config holds no sparsity format mustat reads (sparsity_config.format "
                         f"is {fmt!r}; mustat reads {', '.join(SPARSE_FORMATS)}); quantized checkpoints are not read")
    shards = sorted(folder.glob("*.safetensors"))
    shards = [s for s in shards if s.name != MASKS_FILE]
    if not shards:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    raw: dict[str, Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    state, masks = {}, {}
    if fmt in SPARSE_FORMATS:
        params = _PARAMS[fmt]
        prefixes = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".bitmask")}
        for prefix in sorted(prefixes):
            parts = {p: raw.pop(f"{prefix}.{p}") for p in params}
            state[f"{prefix}.weight"], masks[f"{prefix}.weight"] = decompress_weight(parts)
    state.update(raw)
    if (folder / MASKS_FILE).is_file():
        masks.update(_read_masks(folder / MASKS_FILE))
    return state, masks, config


def load_pruned(folder: str | Path, *, masks: bool = True) -> nn.Module:
    """The model of a :func:`save_pruned` folder, in eval mode, with its masks (``masks=True``) as
    mustat masks: the same weights, logits and masks as the model that was saved.

    The architecture is ``config.json``'s ``architectures[0]`` from ``transformers``, built from the
    config (without its ``quantization_config``) and given the stored state; nothing is downloaded.
    """
    import transformers

    state, found, config = read_pruned(folder)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{folder}: config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not have")
    cfg = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = cls._from_config(cfg, dtype=dtype).eval()
    _load(model, state, f"{arch} ({folder})")
    if masks:
        table = entries(model)
        for name, keep in found.items():
            install_mask(model, name, keep, table)
    return model


def export_target(folder: str | os.PathLike | None, format: str | None, pattern) -> tuple[Path, str] | None:
    """``(folder, format)`` of ``mustat oneshot --export FOLDER --export-format FORMAT``, checked
    before any work; ``None`` without ``--export``. The default format is ``save-pretrained``
    (module notes: what transformers and vLLM load today)."""
    if folder is None:
        if format is not None:
            raise ValueError(f"--export-format {format} needs --export FOLDER")
        return None
    format = check_option("save-pretrained" if format is None else format, "--export-format", FORMATS)
    if format == "sparse-24-bitmask" and str(pattern) != "2:4":
        raise ValueError(f"--export-format sparse-24-bitmask stores 2:4 models; --pattern is {pattern}: use "
                         "--pattern 2:4, or --export-format sparse-bitmask")
    return Path(folder), format
