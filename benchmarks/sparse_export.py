"""Sparse model files and sparse inference, against the dense model in the same run.

    python benchmarks/sparse_export.py [--threads N] [--min-run-time S]

For LeNet-300-100 and LeNet-5 (28x28 inputs, 10 classes, seeded random weights)
pruned by layer-wise magnitude to 50/90/95/98% sparsity (every tensor equally
sparse: global ranking of untrained weights empties layers), prints: the bytes of ``mustat.save_sparse``
over the bytes of ``torch.save`` of the finalized (zero-filled) state dict
(goals: <= 10% at 95%, <= 5% at 98%), and the CPU inference time of
``mustat.sparse_inference`` (CSR Linear layers; convolutions stay dense) over the
dense model's at batch 1 and 128 (goal: LeNet-300-100 at >= 95%, batch 1,
faster than dense), and, to separate kernel from call overhead, LeNet-300-100's 784x300
layer alone at batch 1 (dense ``F.linear`` against the CSR ``torch.addmv``).
Medians of torch.utils.benchmark's blocked_autorange.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import mustat
from mustat.models import build


def nbytes_torch(state) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes


def median(fn, min_run_time):
    return Timer("fn()", globals=dict(fn=fn)).blocked_autorange(min_run_time=min_run_time).median


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--min-run-time", type=float, default=0.5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, threads {torch.get_num_threads()}")
    print("| model | sparsity | file sparse / dense | bytes (sparse, dense) | batch 1: sparse / dense | "
          "batch 128: sparse / dense |")
    print("| --- | --- | --- | --- | --- | --- |")
    tmp = Path(tempfile.mkdtemp())
    for name, label in (("mlp", "LeNet-300-100"), ("lenet5", "LeNet-5")):
        for s in (0.5, 0.9, 0.95, 0.98):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = build(name, (1, 28, 28), 10).eval()
            mustat.prune(model, mustat.score(model, "magnitude"), sparsity=s, scope="layer")
            sparse_bytes = mustat.save_sparse(model, tmp / "m.safetensors").stat().st_size
            dense = mustat.finalize(build(name, (1, 28, 28), 10))
            dense.load_state_dict(mustat.finalize(__import__("copy").deepcopy(model)).state_dict())
            dense.eval()
            dense_bytes = nbytes_torch(dense.state_dict())
            fast = mustat.sparse_inference(model)
            times = []
            for batch in (1, 128):
                x = torch.randn(batch, 1, 28, 28)
                with torch.no_grad():
                    assert torch.allclose(fast(x), dense(x), rtol=1e-4, atol=1e-4)
                    t_dense = median(lambda x=x, f=dense: f(x), args.min_run_time)
                    t_sparse = median(lambda x=x, f=fast: f(x), args.min_run_time)
                times.append(f"{t_sparse / t_dense:.2f}x ({t_sparse * 1e6:.0f} / {t_dense * 1e6:.0f} us)")
            print(f"| {label} | {s:.0%} | {sparse_bytes / dense_bytes:.3f} | {sparse_bytes:,} / {dense_bytes:,} | "
                  f"{times[0]} | {times[1]} |")
            if name == "mlp" and s == 0.95:
                layer = dense[1]
                v = torch.randn(784)
                with torch.no_grad():
                    t_d = median(lambda v=v, w=layer.weight, b=layer.bias: torch.nn.functional.linear(v, w, b),
                                 args.min_run_time)
                    csr = fast[1].weight
                    t_s = median(lambda v=v, w=csr, b=layer.bias: torch.addmv(b, w, v), args.min_run_time)
                layer_line = (f"LeNet-300-100 at 95%, the 784x300 layer alone at batch 1: CSR addmv {t_s * 1e6:.1f} us, "
                              f"dense F.linear {t_d * 1e6:.1f} us ({t_s / t_d:.2f}x)")
    print(layer_line)


if __name__ == "__main__":
    main()
