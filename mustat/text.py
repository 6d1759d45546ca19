"""Real English text that ships with Python, for calibrating and evaluating language models offline.

``pydoc_data.topics`` holds the Python language reference's help topics (about 465,000
characters; part of the standard library, so present on every machine). It is split into
sentences, deduplicated and filtered by length; the split into calibration and evaluation sets is
a seeded permutation, so the two never share a sentence.

For language models the text is read whole (:func:`read_text`: the topics, or a file the user
names), tokenised once, and cut into windows (:func:`token_windows`): non-overlapping windows of
the token stream, a seeded share for calibration and a disjoint one for evaluation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mustat._checks import check_scalar

if TYPE_CHECKING:
    from torch import Tensor

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def python_docs_sentences(min_words: int = 6, max_words: int = 60) -> list[str]:
    """The distinct sentences of ``pydoc_data.topics`` with ``min_words`` to ``max_words`` words,
    in a fixed order (the topics' sorted order, then order of appearance)."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in _SENTENCE.split(text):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words and any(c.isalpha() for c in s):
                seen.setdefault(s, None)
    return list(seen)


def python_docs_text() -> str:
    """The topics joined into one text (sorted by topic), for training a small language model."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split(sentences: list[str], calibration: int, evaluation: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation samples: a permutation drawn with ``seed`` (numpy's
    PCG64, the same on every machine), the first ``calibration`` and the next ``evaluation``."""
    check_scalar(calibration, "calibration", kind=int, low=1)
    check_scalar(evaluation, "evaluation", kind=int, low=0)
    if calibration + evaluation > len(sentences):
        raise ValueError(f"calibration + evaluation = {calibration + evaluation} is more than the "
                         f"{len(sentences)} sentences available")
    order = np.random.default_rng(seed).permutation(len(sentences))
    return ([sentences[i] for i in order[:calibration]],
            [sentences[i] for i in order[calibration:calibration + evaluation]])


def read_text(source: str = "pydoc") -> str:
    """The text to calibrate and evaluate a language model on: ``"pydoc"`` (:func:`python_docs_text`)
    or the path of a UTF-8 text file."""
    if source == "pydoc":
        return python_docs_text()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text {source!r} is neither 'pydoc' nor a file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text {source!r} is empty")
    return text


class Windows(NamedTuple):
    """Calibration and evaluation windows, ``(count, length)`` token tensors, and where each window
    starts in the stream (``*_starts``, multiples of ``length``)."""

    calibration: Tensor
    evaluation: Tensor
    calibration_starts: np.ndarray
    evaluation_starts: np.ndarray


def token_windows(ids, length: int, calibration: int, evaluation: int, *, seed: int = 0,
                  calibration_seed: int | None = None) -> Windows:
    """Disjoint calibration and evaluation windows of a token stream.

    The stream ``ids`` (1-D, integers) is cut into ``len(ids) // length`` non-overlapping windows
    of ``length`` tokens (the tail shorter than ``length`` is dropped); a permutation drawn with
    ``seed`` (numpy's PCG64, the same on every machine) gives its first ``evaluation`` windows to
    evaluation and the next ``calibration`` to calibration, each set in stream order. With
    ``calibration_seed``, the calibration windows are drawn instead from all the windows left over
    by a permutation with that seed: the evaluation set stays the same for every calibration seed
    and count, so methods and seeds are compared on the very same held-out tokens. No token
    position is in both sets, and a window never crosses another. Every method calibrated with the
    same seeds sees the very same tokens.

    Returns
    -------
    Windows
        ``torch.long`` tensors ``(calibration, length)`` and ``(evaluation, length)`` and their starts.
    """
    import torch

    check_scalar(length, "length", kind=int, low=2)
    check_scalar(calibration, "calibration", kind=int, low=0)
    check_scalar(evaluation, "evaluation", kind=int, low=0)
    check_scalar(seed, "seed", kind=int, low=0)
    if calibration_seed is not None:
        check_scalar(calibration_seed, "calibration_seed", kind=int, low=0)
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids must be a 1-D integer sequence of tokens, got shape {tuple(ids.shape)} {ids.dtype}")
    n = len(ids) // length
    if calibration + evaluation > n:
        raise ValueError(f"calibration + evaluation = {calibration + evaluation} windows of {length} tokens is more "
                         f"than the {n} in {len(ids)} tokens")
    order = np.random.default_rng(seed).permutation(n)
    held, rest = np.sort(order[:evaluation]), order[evaluation:]
    if calibration_seed is not None:
        rest = rest[np.random.default_rng(calibration_seed).permutation(len(rest))]
    cal = np.sort(rest[:calibration])
    windows = ids[: n * length].long().view(n, length)
    return Windows(windows[torch.as_tensor(cal, dtype=torch.long)], windows[torch.as_tensor(held, dtype=torch.long)],
                   cal * length, held * length)
