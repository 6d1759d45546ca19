"""``mustat structured``: train, remove channels in rounds with retraining, measure latency."""

from __future__ import annotations

import argparse

import pandas as pd

from mustat._argtypes import ints, names


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over seeds of each importance's rows, per round."""
    keys = ["label", "round"]
    cols = ["flop_speedup", "params", "test_accuracy", "speedup_b1", "speedup_b128"]
    agg = results.groupby(keys, sort=False)[cols].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    agg.insert(0, "seeds", results.groupby(keys, sort=False).size())
    return agg.reset_index()


def _run(args: argparse.Namespace) -> int:
    from mustat.config import TrainConfig
    from mustat.structured.schedule import run

    train = TrainConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                        batch_size=args.batch_size, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
                        track_epochs=args.track_epochs)
    results = run(dataset=args.dataset, model=args.model, importances=args.importance, speedup=args.speedup,
                  rounds=args.rounds, seeds=args.seeds, train=train, out=args.out, threads=args.threads,
                  save_models=args.save_models, round_to=args.round_to, quiet=args.quiet)
    table = summary(results)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"results: {args.out}/results.csv")
    return 0


def add_parser(sub) -> None:
    from mustat.config import TrainConfig
    from mustat.data import DATASETS
    from mustat.models import MODELS
    from mustat.structured.surgery import IMPORTANCES

    d = TrainConfig()
    p = sub.add_parser(
        "structured",
        help="remove whole neurons and channels (Torch-Pruning surgery) by a group Wald test; measure speed",
        description="Train the dense model, then remove channels in rounds (MACs falling geometrically to "
                    "dense / SPEEDUP) with retraining after each, for every importance; latency of the pruned and "
                    "dense model is measured after each round at batch 1 and 128. IMPORTANCE is wald[ESTIMATOR] "
                    "(the group Wald statistic per MAC), wald-chi2[ESTIMATOR], wald-pvalue[ESTIMATOR], or one of "
                    f"Torch-Pruning's: {', '.join(i for i in IMPORTANCES if not i.startswith('wald'))}.")
    p.add_argument("--dataset", default="mnist5k", choices=sorted(DATASETS), metavar="NAME",
                   help=f"dataset: {', '.join(sorted(DATASETS))}")
    p.add_argument("--model", default="lenet5", choices=sorted(MODELS), metavar="NAME",
                   help=f"model: {', '.join(sorted(MODELS))}")
    p.add_argument("--importance", type=names, default=["wald[kfac]", "magnitude", "taylor", "lamp"],
                   help="importances, e.g. 'wald[kfac] wald[curvature] magnitude'")
    p.add_argument("--speedup", type=float, default=2.0, help="final reduction of multiply-accumulates, > 1")
    p.add_argument("--rounds", type=int, default=3, help="pruning rounds, each followed by retraining")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam", "adadelta"], help="optimizer")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty on the mean loss")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size")
    p.add_argument("--epochs", type=int, default=15, help="epochs of dense training")
    p.add_argument("--retrain-epochs", type=int, default=3, help="epochs of retraining after each round")
    p.add_argument("--track-epochs", type=int, default=3, help="epochs the trajectory estimators track")
    p.add_argument("--seeds", type=ints, default=[0], help="seeds, e.g. '0 1 2'")
    p.add_argument("--round-to", type=int, default=None, metavar="K",
                   help="keep every layer's width a multiple of K (8 suits most CPU kernels; docs/PERFORMANCE.md)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while latency is measured")
    p.add_argument("--save-models", action="store_true",
                   help="write each pruned model as OUT/models/LABEL-seedK.pt2 (torch.export: plain torch reloads it)")
    p.add_argument("--out", default="runs/structured", help="output folder (resumes what it holds)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
