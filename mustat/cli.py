"""The ``mustat`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    import mustat

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(y), generator=g)
    X = torch.tensor(X, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(y)[perm]
    Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
    results = {}
    for criterion in ("mu", "magnitude", "random"):
        torch.manual_seed(args.seed)
        model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        tracker = mustat.PseudoBootstrap(model)
        tracker.attach(opt)
        for sparsity in (0.0, 0.5, 0.75, 0.9, 0.95):
            if sparsity:
                scores = mustat.score(model, criterion, se=tracker.std(), seed=args.seed)
                mustat.prune(model, scores, sparsity=sparsity)
            for epoch in range(5):
                if epoch == 3:  # the window: the last 2 epochs, after the transient
                    tracker.reset()
                for idx in torch.randperm(len(ytr), generator=g).split(64):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
                    opt.step()
            with torch.no_grad():
                acc = (model(Xte).argmax(1) == yte).float().mean().item()
            results.setdefault(sparsity, {})[criterion] = acc
    print("sparsity  " + "  ".join(f"{c:>9s}" for c in ("mu", "magnitude", "random")))
    for s, row in results.items():
        print(f"{s:8.3f}  " + "  ".join(f"{row[c]:9.3f}" for c in ("mu", "magnitude", "random")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mustat", description="Magnitude-and-uncertainty pruning with calibrated statistics.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, prune by mu/magnitude/random, retrain (digits, seconds)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
