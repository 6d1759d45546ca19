"""Real English text that ships with Python, for calibrating and evaluating language models offline.

``pydoc_data.topics`` holds the Python language reference's help topics (about 465,000
characters; part of the standard library, so present on every machine). It is split into
sentences, deduplicated and filtered by length; the split into calibration and evaluation sets is
a seeded permutation, so the two never share a sentence.
"""

from __future__ import annotations

import re

import numpy as np

from mustat._checks import check_scalar

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
