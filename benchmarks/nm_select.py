"""N:M selection speed: :func:`mustat.patterns.nm_keep` (one ``torch.topk(..., largest=False)``
and ``scatter_``, as SparseGPT and Wanda do, with a stable sort only for groups tied across the
cut) against the stable descending sort per group it replaced (reimplemented here as the
baseline).

Both run on a 4096 x 4096 float64 score matrix (seed 0), with 2:4 and 4:8, on one CPU thread.
Random normal scores have no ties; a second case draws integer scores from {0, ..., 9}, so
most groups tie across the cut and take the sort fallback (the worst case). The two are timed
alternately, best of 5 each; the masks are checked to be equal. Prints a Markdown table.

    python benchmarks/nm_select.py
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from mustat.patterns import Pattern, nm_keep, parse_pattern


def sort_keep(scores: Tensor, pattern: Pattern) -> Tensor:
    """The old rule for a 2-D matrix: a stable descending sort of every group, the first N kept."""
    g = scores.to(torch.float64).reshape(scores.shape[0], -1, pattern.m)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., : pattern.n]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True).reshape(scores.shape)


def best_of(fns: dict[str, callable], repeats: int = 5) -> dict[str, float]:
    """Best wall time (s) of each function, the functions run alternately."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> int:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    cases = {"normal": torch.randn(4096, 4096, generator=g, dtype=torch.float64),
             "ties (ints 0-9)": torch.randint(0, 10, (4096, 4096), generator=g).to(torch.float64)}
    print(f"torch {torch.__version__}, 1 thread, 4096 x 4096 float64, best of 5")
    print("| scores | pattern | sort ms | topk ms | sort / topk |\n|---|---|---|---|---|")
    for label, s in cases.items():
        for name in ("2:4", "4:8"):
            p = parse_pattern(name)
            if not torch.equal(sort_keep(s, p), nm_keep(s, p)):
                raise AssertionError(f"the two masks differ ({label}, {name})")
            t = best_of({"sort": lambda s=s, p=p: sort_keep(s, p), "topk": lambda s=s, p=p: nm_keep(s, p)})
            print(f"| {label} | {name} | {1e3 * t['sort']:.1f} | {1e3 * t['topk']:.1f} | "
                  f"{t['sort'] / t['topk']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
