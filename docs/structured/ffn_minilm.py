"""Feed-forward neurons of the pretrained sentence encoder all-MiniLM-L6-v2 removed in one shot:
fidelity against measured CPU latency (``mustat.structured.ffn``).

The same text as ``docs/oneshot/encoder.py``: Python documentation sentences, 512 held out,
128 for calibration (seed 0). The same share of the 1,536 neurons of each of the 6 blocks is
removed (25%, 50%, 75%) by Torch-Pruning's group magnitude, the activation-weighted error without
refit, and the OBS score with the least-squares refit of the down projection (and magnitude with
the refit, to separate ranking from refit). Fidelity: mean cosine of the sentence embeddings to
the dense ones on the held-out sentences. Latency: the encoder on 1 and on 128 sequences of 32
tokens, dense and pruned timed alternately (1 intra-op thread). Writes
``docs/structured/ffn_minilm.md``.

    python docs/structured/ffn_minilm.py      # 8 minutes on 2 cores
"""

from __future__ import annotations

import copy
import platform
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mustat._io import atomic_write
from mustat.layerwise.hf import load_encoder, minilm_dir, sentence_embeddings, token_batches
from mustat.structured import latency
from mustat.structured.ffn import prune_ffn
from mustat.text import python_docs_sentences, split

HERE = Path(__file__).parent
CACHE = Path(__file__).resolve().parents[2] / "runs" / "models"
FRACTIONS = (0.25, 0.5, 0.75)
METHODS = {"magnitude": ("magnitude", False), "magnitude + refit": ("magnitude", True),
           "activation": ("activation", False), "obs + refit": ("obs", True)}


class _Ids(nn.Module):
    """``model(input_ids)`` for timing: every token real."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def _times(pruned: nn.Module, dense: nn.Module, batch: int) -> tuple[float, float]:
    ids = torch.randint(1000, 2000, (batch, 32), generator=torch.Generator().manual_seed(0))
    t_p, t_d = [], []
    for _ in range(3):
        t_d.append(latency(_Ids(dense), ids, min_run_time=0.3))
        t_p.append(latency(_Ids(pruned), ids, min_run_time=0.3))
    return float(np.median(t_d)), float(np.median(t_p))


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_encoder(minilm_dir(CACHE))
    sentences = python_docs_sentences()
    pool, held_out = split(sentences, len(sentences) - 512, 512, seed=0)
    cal, _ = split(pool, 128, 0, seed=0)
    eval_batches, cal_batches = token_batches(tok, held_out, 64), token_batches(tok, cal, 32)
    dense = sentence_embeddings(model, eval_batches)
    lines = ["# Feed-forward neurons of all-MiniLM-L6-v2 removed in one shot", "",
             f"Produced by `python docs/structured/ffn_minilm.py` on {date.today()} ({platform.machine()}, torch "
             f"{torch.__version__}, latency on 1 intra-op thread, dense and pruned timed alternately). Cosine: mean "
             "cosine to the dense sentence embeddings on 512 held-out sentences (128 calibration sentences, seed "
             "0). Speed-up: dense / pruned latency of the encoder on 1 and 128 sequences of 32 tokens.", "",
             "| neurons removed | method | cosine | parameters | speed-up batch 1 | speed-up batch 128 |",
             "|---|---|---|---|---|---|"]
    n_dense = sum(p.numel() for p in model.parameters())
    for fraction in FRACTIONS:
        for label, (method, refit) in METHODS.items():
            pruned = copy.deepcopy(model)
            prune_ffn(pruned, cal_batches, fraction, method, refit=refit)
            cos = float((sentence_embeddings(pruned, eval_batches) * dense).sum(1).mean())
            t1d, t1p = _times(pruned, model, 1)
            t128d, t128p = _times(pruned, model, 128)
            params = sum(p.numel() for p in pruned.parameters())
            lines.append(f"| {fraction:.0%} | {label} | {cos:.4f} | {params / n_dense:.2f} of {n_dense:,} | "
                         f"{t1d / t1p:.2f}x | {t128d / t128p:.2f}x |")
            print(lines[-1], flush=True)
    atomic_write(HERE / "ffn_minilm.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
