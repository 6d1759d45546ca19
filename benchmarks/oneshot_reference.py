"""mustat's one-shot driver against the reference drivers' block-by-block loop, on all-MiniLM-L6-v2.

The reference is written here after SparseGPT's ``opt.py`` / ``sparsegpt.py`` and Wanda's
``lib/prune.py`` (the published algorithms, not their code): capture the first block's inputs,
then per block hook every Linear, run the block once on the cached inputs (SparseGPT: the float32
running mean ``H = 2/n sum x x^T``; Wanda: ``scaler_row = ||X_j||^2 / n``), prune each layer
(SparseGPT's ``fasterprune``, float32, ``percdamp=0.01``, ``blocksize=128``; Wanda's per-row
50% of ``|W| sqrt(scaler_row)``), and run the pruned block again for the next block's inputs.
Like the references, it counts padding tokens in the statistics; mustat leaves them out, so the
masks agree on most but not all entries (printed).

mustat runs with its defaults (``driver="auto"``: block by block, float64 solves) and the
order inside a block given by ``--sequential``: ``layer`` (its default, true-sequential) or
``block`` (the references' order). Each side prunes a fresh copy of the model, runs
alternate, one thread, the best of ``--repeats`` is printed with the ratio. The per-layer
solver is timed apart on the model's two layer shapes: mustat's ``solve`` against ``fasterprune``,
both in float32 (mustat sums the Gram in float64 and factors it in the weights' precision).

    python benchmarks/oneshot_reference.py --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from mustat.layerwise import oneshot
from mustat.layerwise import solve as S
from mustat.layerwise.hf import load_encoder, minilm_dir, token_batches
from mustat.patterns import Pattern
from mustat.text import python_docs_sentences, split

CACHE = Path(__file__).resolve().parents[1] / "runs" / "models"


def fasterprune(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128, percdamp: float = 0.01):
    """SparseGPT's layer solver (unstructured, the mask chosen per lazy block), float32."""
    W, H = W.clone().float(), H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


class _Stat:
    """One layer's running statistic, as the references accumulate it."""

    def __init__(self, layer: nn.Linear, method: str):
        self.layer, self.method, self.n = layer, method, 0
        d = layer.in_features
        self.H = torch.zeros(d, d) if method == "sparsegpt" else torch.zeros(d)

    def add(self, module, inp, out):
        x = inp[0].reshape(-1, inp[0].shape[-1]).float()
        t = inp[0].shape[0]   # the references count sequences, not tokens
        self.H *= self.n / (self.n + t)
        self.n += t
        if self.method == "sparsegpt":
            x = (2 / self.n) ** 0.5 * x
            self.H += x.T @ x
        else:
            self.H += x.square().sum(0) / self.n


@torch.no_grad()
def reference(model: nn.Module, batches: list[dict], method: str, sparsity: float = 0.5) -> None:
    blocks = model.encoder.layer
    cache = []

    class Catcher(Exception):
        pass

    def catch(module, args, kwargs):
        cache.append((args, kwargs))
        raise Catcher

    h = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    for b in batches:
        try:
            model(**b)
        except Catcher:
            pass
    h.remove()
    for block in blocks:
        stats = {m: _Stat(m, method) for m in block.modules() if isinstance(m, nn.Linear)}
        handles = [m.register_forward_hook(s.add) for m, s in stats.items()]
        for args, kwargs in cache:
            block(*args, **kwargs)
        for hd in handles:
            hd.remove()
        for m, s in stats.items():
            W = m.weight.data
            if method == "sparsegpt":
                m.weight.data = fasterprune(W, s.H, sparsity).to(W.dtype)
            else:
                metric = W.abs() * s.H.sqrt()[None, :]
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * sparsity)]
                W.scatter_(1, idx, 0)
        outs = [block(*args, **kwargs) for args, kwargs in cache]
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        cache = [((o, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": o})
                 for o, (args, kwargs) in zip(outs, cache)]


def _time(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--no-errors", action="store_true", help="mustat without its per-layer errors (the references "
                    "compute none)")
    ap.add_argument("--sequential", default="layer", choices=["layer", "block"],
                    help="mustat's order inside a block: true-sequential (its default) or the references'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_encoder(minilm_dir(CACHE))
    cal, _ = split(python_docs_sentences(), args.samples, 0, seed=0)
    batches = token_batches(tok, cal, 32)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"sequential={args.sequential}, errors={not args.no_errors}; torch {torch.__version__}, 1 thread; all-MiniLM-L6-v2, {args.samples} sentences, {tokens} tokens "
          f"({sum(b['attention_mask'].numel() for b in batches)} with padding)")
    for method in ("sparsegpt", "wanda"):
        ours, theirs, agree = [], [], 0.0
        for _ in range(args.repeats):
            a, b = copy.deepcopy(model), copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours.append(_time(oneshot, a, batches, method=method, sparsity=0.5, sequential=args.sequential,
                                  errors=not args.no_errors))
            theirs.append(_time(reference, b, batches, method))
            la = {n: m for n, m in a.named_modules() if isinstance(m, nn.Linear)}
            same = [((la[n].weight != 0) == (m.weight != 0)).float().mean() for n, m in b.named_modules()
                    if isinstance(m, nn.Linear)]
            agree = float(torch.stack(same).mean())
        print(f"{method:10s} mustat {min(ours):6.2f} s, reference driver {min(theirs):6.2f} s: "
              f"ratio {min(ours) / min(theirs):.2f}; masks agree on {agree:.2%} of entries")
    # the per-layer solver on the model's two shapes, the same float32 Gram for both
    g = torch.Generator().manual_seed(0)
    for rows, d in ((384, 384), (384, 1536)):
        X = torch.randn(4096, d, generator=g) * torch.rand(d, generator=g)
        H = X.T @ X
        W = torch.randn(rows, d, generator=g)
        gram = S.Gram(d, torch.device("cpu"))
        gram.add(X)
        ones = torch.ones(rows, d, dtype=torch.bool)
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t_ours.append(_time(S.solve, W, gram, method="sparsegpt", sparsity=0.5, scope="layer", pattern=Pattern(),
                                update=True, damping=0.01, block_size=128, alive=ones))
            t_ref.append(_time(fasterprune, W, H, 0.5))
        print(f"solver {rows}x{d}: mustat {min(t_ours) * 1e3:7.1f} ms, fasterprune {min(t_ref) * 1e3:7.1f} ms "
              f"(both float32): ratio {min(t_ours) / min(t_ref):.2f}")


if __name__ == "__main__":
    main()
