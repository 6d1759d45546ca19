"""What one-shot pruning of all-MiniLM-L6-v2 (36 Linear layers, 10.6M weights) costs.

Each method prunes a fresh copy to 50% from 128 calibration sentences of the Python docs (seed 0).
It is timed against one dense forward pass over the same calibration batches, timed in the same
run: the ratio says how many forward passes' worth the method costs. Peak memory is the largest
resident set seen while pruning (sampled every 5 ms) minus the resident set just before. It is
printed next to the model's own parameter bytes. Prints the minimum of ``--repeats`` runs.

    python benchmarks/oneshot_cost.py
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time
import warnings
from pathlib import Path

import torch

from mustat.layerwise import oneshot
from mustat.layerwise.hf import load_encoder, minilm_dir, sentence_embeddings, token_batches
from mustat.text import python_docs_sentences, split

CACHE = Path(__file__).resolve().parents[1] / "runs" / "models"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """The largest resident set seen while the block runs."""

    def __enter__(self):
        self.base, self.peak, self.stop = rss(), rss(), False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_encoder(minilm_dir(CACHE))
    cal, _ = split(python_docs_sentences(), 128, 0, seed=0)
    batches = token_batches(tok, cal, 32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    forward = min(_time(lambda: sentence_embeddings(model, batches)) for _ in range(args.repeats))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {size / 2**20:.1f} MiB of parameters")
    print(f"dense forward over the calibration batches: {forward:.2f} s")
    for label, kw in [("magnitude", dict(method="magnitude")), ("wanda", dict(method="wanda")),
                      ("sparsegpt", dict(method="sparsegpt", scope="layer")),
                      ("mu + update", dict(method="mu", scope="layer", update=True)),
                      ("mu-sandwich + update", dict(method="mu-sandwich", update=True))]:
        times, peaks = [], []
        for _ in range(args.repeats):
            pruned = copy.deepcopy(model)
            with warnings.catch_warnings(), Peak() as peak:
                warnings.simplefilter("ignore")
                t = time.perf_counter()
                oneshot(pruned, batches, sparsity=0.5, **kw)
                times.append(time.perf_counter() - t)
            peaks.append(peak.peak - peak.base)
            del pruned
        print(f"{label:22s} {min(times):6.2f} s = {min(times) / forward:5.1f} forward passes; "
              f"peak memory +{min(peaks) / 2**20:6.1f} MiB = {min(peaks) / size:4.2f}x the model")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
