"""Time of the exact 1-swap refinement (``mustat.layerwise.solve.swap_refine``) on layers of SmolLM2-135M's
shapes at 70%: random weights and a Gram of 4,096 random inputs, magnitude masks, 4 and 16 swaps a row,
one thread. The refinement evaluates every (kept, pruned) pair of every row in each round, so a round
costs rows x kept x pruned float64 evaluations.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/swap_cost.py
"""

import time

import torch

from mustat.layerwise.solve import UNSTRUCTURED, swap_refine


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for rows, d in [(576, 576), (576, 1536)]:             # q/o projections; the MLP's down projection
        X = torch.randn(4096, d, dtype=torch.float64)
        H = X.T @ X / 4096 + 0.01 * torch.eye(d, dtype=torch.float64)
        W0 = torch.randn(rows, d)
        s = W0.abs()
        keep = s > s.quantile(0.7, dim=1, keepdim=True)
        alive = torch.ones_like(keep)
        for k in (4, 16):
            t = time.perf_counter()
            _, _, made = swap_refine(W0, W0 * keep, keep, alive, H, max_swaps=k, pattern=UNSTRUCTURED)
            print(f"{rows} x {d}, up to {k} swaps a row: {time.perf_counter() - t:.1f} s "
                  f"(mean swaps made {float(made.float().mean()):.1f})")


if __name__ == "__main__":
    main()
