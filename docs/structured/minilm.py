"""Feed-forward neurons and attention heads of the pretrained sentence encoder all-MiniLM-L6-v2
removed in one shot: fidelity against measured CPU latency (``mustat.structured.ffn``,
``mustat.structured.heads``).

The same text as ``docs/oneshot/encoder.py``: Python documentation sentences, 512 held out, 128
for calibration (seed 0). The same share (25%, 50%, 75%) of the 1,536 neurons of each of the 6
feed-forward blocks, then of the 12 heads of each attention block, then 50% of both, is removed
by Torch-Pruning's group magnitude, magnitude with the least-squares refit (of the down or the
output projection), the activation-weighted error without refit, and the OBS score with the
refit. Fidelity: mean cosine of the sentence embeddings to the dense ones on the held-out
sentences. Latency depends on the shapes only, which every method at one share leaves the same,
so it is measured once per share: the encoder on 1 and on 128 sequences of 32 tokens, dense and
pruned timed alternately (5 rounds, 1 intra-op thread). Writes ``docs/structured/minilm.md``.

    python docs/structured/minilm.py      # 8 minutes on 2 cores
"""

from __future__ import annotations

import copy
import platform
from datetime import date
from pathlib import Path

import torch
from torch import nn

from mustat._io import atomic_write
from mustat.layerwise.hf import (
    TokenIds,
    load_encoder,
    minilm_dir,
    sentence_embeddings,
    token_batches,
)
from mustat.structured import paired_latency, prune_ffn, prune_heads
from mustat.text import python_docs_sentences, split

HERE = Path(__file__).parent
CACHE = Path(__file__).resolve().parents[2] / "runs" / "models"
FRACTIONS = (0.25, 0.5, 0.75)
METHODS = {"magnitude": ("magnitude", False), "magnitude + refit": ("magnitude", True),
           "activation": ("activation", False), "obs + refit": ("obs", True)}
PARTS = {"neurons": (prune_ffn,), "heads": (prune_heads,), "heads and neurons": (prune_heads, prune_ffn)}


def _speedups(pruned: nn.Module, dense: nn.Module) -> str:
    cells = []
    for batch in (1, 128):
        ids = torch.randint(1000, 2000, (batch, 32), generator=torch.Generator().manual_seed(0))
        t_d, t_p = paired_latency(TokenIds(dense), TokenIds(pruned), ids, repeats=5, min_run_time=0.3)
        cells.append(f"{t_d / t_p:.2f}x")
    return " | ".join(cells)


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_encoder(minilm_dir(CACHE))
    sentences = python_docs_sentences()
    pool, held_out = split(sentences, len(sentences) - 512, 512, seed=0)
    cal, _ = split(pool, 128, 0, seed=0)
    eval_batches, cal_batches = token_batches(tok, held_out, 64), token_batches(tok, cal, 32)
    dense = sentence_embeddings(model, eval_batches)
    n_dense = sum(p.numel() for p in model.parameters())
    lines = ["# Neurons and heads of all-MiniLM-L6-v2 removed in one shot", "",
             f"Produced by `python docs/structured/minilm.py` on {date.today()} ({platform.machine()}, torch "
             f"{torch.__version__}, latency on 1 intra-op thread, dense and pruned timed alternately, 5 rounds). "
             "Cosine: mean cosine to the dense sentence embeddings on 512 held-out sentences (128 calibration "
             "sentences, seed 0). Speed-up: dense / pruned latency of the encoder on 1 and 128 sequences of 32 "
             "tokens, measured once per share (every method at one share gives the same shapes). With heads and "
             "neurons, heads go first and the neurons' Grams are those of the head-pruned model.", "",
             "| removed | method | cosine | parameters | speed-up batch 1 | speed-up batch 128 |",
             "|---|---|---|---|---|---|"]
    for part, steps in PARTS.items():
        for fraction in (0.5,) if len(steps) > 1 else FRACTIONS:
            pruned = {}
            for label, (method, refit) in METHODS.items():
                pruned[label] = copy.deepcopy(model)
                for step in steps:
                    step(pruned[label], cal_batches, fraction, method, refit=refit)
            timing = _speedups(pruned["obs + refit"], model)
            for label, m in pruned.items():
                cos = float((sentence_embeddings(m, eval_batches) * dense).sum(1).mean())
                params = sum(p.numel() for p in m.parameters())
                lines.append(f"| {fraction:.0%} of {part} | {label} | {cos:.4f} | {params / n_dense:.2f} of "
                             f"{n_dense:,} | {timing} |")
                print(lines[-1], flush=True)
    atomic_write(HERE / "minilm.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
