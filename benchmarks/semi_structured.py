"""2:4 sparsity in measured time: dense against ``torch.sparse.to_sparse_semi_structured`` matrix
products on a CUDA GPU of compute capability 8.0 or newer. The device check: on a CPU, or on an
older GPU, it says so and exits 0, since 2:4 gives no speed there.

The layers are all-MiniLM-L6-v2's shapes (384 -> 1536 and 1536 -> 384) and a LLaMA-7B MLP shape
(4096 -> 11008), pruned 2:4 by magnitude. They run in float16 at 128, 2,048 and 16,384 tokens.
It prints the median of 50 timed calls per case (CUDA events, after 10 warm-up calls) and the
speed-up. The sparse output is checked against the dense one.

    python benchmarks/semi_structured.py
"""

from __future__ import annotations

import sys

import torch

from mustat.patterns import nm_keep, parse_pattern


def timed(fn, repeats: int = 50) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        why = "no CUDA GPU" if not torch.cuda.is_available() else f"compute capability {torch.cuda.get_device_capability()}"
        print(f"{why}: semi-structured (2:4) kernels need CUDA compute capability 8.0 or newer; on a CPU 2:4 "
              "sparsity saves memory in a sparse file but no time")
        return 0
    from torch.sparse import to_sparse_semi_structured

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| out x in | tokens | dense ms | 2:4 ms | speed-up |\n|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for out_f, in_f in [(1536, 384), (384, 1536), (11008, 4096), (4096, 11008)]:
        W = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16, generator=g)
        W = W * nm_keep(W.abs(), parse_pattern("2:4")).to(W.dtype)
        Ws = to_sparse_semi_structured(W)
        for tokens in (128, 2048, 16384):
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16, generator=g)
            dense = torch.nn.functional.linear(x, W)
            sparse = torch.nn.functional.linear(x, Ws)
            torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-1)
            td = timed(lambda x=x, W=W: torch.nn.functional.linear(x, W))
            ts = timed(lambda x=x, Ws=Ws: torch.nn.functional.linear(x, Ws))
            print(f"| {out_f} x {in_f} | {tokens} | {td:.4f} | {ts:.4f} | {td / ts:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
