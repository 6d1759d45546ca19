"""Peak resident memory of the loss's output factor (``mustat.statistics.output_fisher``) on SmolLM2-135M.

The pass behind ``oneshot(..., sigma="loss")``: one backward pass of the causal-LM loss per
calibration batch. Prints the process's peak RSS before and after the pass, its time, and a
checksum of the factor (equal across implementations that compute the same thing); with
``--grams``, the input Grams of every layer collected in the same pass (what ``scope="global"``
reads), their checksum too. Needs
``make bench-llm`` and the plain folder that ``docs/oneshot/smollm2.py`` makes under runs/models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/output_fisher_memory.py [--batch-size 8] [--grams]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from mustat._params import entries
from mustat.causal_lm import load_causal_lm
from mustat.layers import find_targets
from mustat.statistics import Collector, causal_lm_loss, output_fisher
from mustat.text import token_windows

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "runs" / "models" / "smollm2-135m-q4_1-dequantized"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch (of 32 x 256 tokens)")
    ap.add_argument("--grams", action="store_true", help="collect every layer's input Gram in the same pass")
    args = ap.parse_args()
    if not (FOLDER / "config.json").exists():
        raise SystemExit(f"{FOLDER} is missing: run `python docs/oneshot/smollm2.py --report` after make bench-llm")
    torch.set_num_threads(1)
    model, _ = load_causal_lm(FOLDER, tokenizer=False)
    ids = torch.load(FOLDER.with_name(FOLDER.name + ".pydoc-tokens.pt"))
    windows = token_windows(ids, 256, 32, 32, seed=0, calibration_seed=0)
    batches = [{"input_ids": b} for b in windows.calibration.split(args.batch_size)]
    targets, _ = find_targets(model, entries(model), None, ("lm_head",))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    collector = Collector(targets, False, torch.device("cpu")) if args.grams else None
    factor = output_fisher(model, batches, targets, causal_lm_loss, collector)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grams = "" if collector is None else (
        f", Grams checksum {sum(float(g.H.trace()) for k, g in collector.grams.items() if k not in collector.shared):.9e}")
    print(f"{len(targets)} layers, {len(batches)} batches of {args.batch_size} x 256 tokens: peak RSS {before:.0f} -> "
          f"{after:.0f} MB, {time.perf_counter() - t:.1f} s, checksum {sum(float(v.sum()) for v in factor.values()):.9e}"
          f"{grams}")


if __name__ == "__main__":
    main()
