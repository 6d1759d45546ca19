"""``mustat structured``: train, remove channels in rounds with retraining, measure latency.

Its parser is in :mod:`mustat.cli`, which imports this module only when the command runs (the
package imports torch and Torch-Pruning, too slow for ``mustat --help``).
"""

from __future__ import annotations

import argparse

import pandas as pd


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over seeds of each importance's rows, per round."""
    keys = ["label", "round"]
    cols = ["flop_speedup", "params", "test_accuracy", "speedup_b1", "speedup_b128"]
    agg = results.groupby(keys, sort=False)[cols].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    agg.insert(0, "seeds", results.groupby(keys, sort=False).size())
    return agg.reset_index()


def run(args: argparse.Namespace) -> int:
    """Run ``mustat structured`` with the parsed ``args``; returns the exit status."""
    from mustat._checks import check_option
    from mustat.config import TrainConfig
    from mustat.data import DATASETS
    from mustat.models import MODELS
    from mustat.structured.schedule import run as run_schedule

    # the parser lists the built-in names without importing the registries; check against them here,
    # before any training, so a name a plugin registered is accepted and a wrong one lists the valid ones
    check_option(args.dataset, "--dataset", sorted(DATASETS))
    check_option(args.model, "--model", sorted(MODELS))
    train = TrainConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                        batch_size=args.batch_size, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
                        track_epochs=args.track_epochs)
    results = run_schedule(dataset=args.dataset, model=args.model, importances=args.importance, speedup=args.speedup,
                           rounds=args.rounds, seeds=args.seeds, train=train, out=args.out, threads=args.threads,
                           save_models=args.save_models, round_to=args.round_to, quiet=args.quiet)
    table = summary(results)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"results: {args.out}/results.csv")
    return 0
