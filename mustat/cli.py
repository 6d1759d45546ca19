"""The ``mustat`` command."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from mustat._argtypes import floats, ints, names


def _prune(args: argparse.Namespace) -> int:
    from mustat.config import RunConfig, TrainConfig
    from mustat.pipeline import run
    from mustat.results import table
    from mustat.uncertainty import WindowWarning

    train = TrainConfig(optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                        batch_size=args.batch_size, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
                        track_epochs=args.track_epochs, sampler=args.sampler)
    config = RunConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model, criteria=args.criteria,
                       se=args.se, scope=args.scope, schedule=args.schedule, target_sparsity=args.target_sparsity,
                       max_tensor_sparsity=args.max_tensor_sparsity, rounds=args.rounds, seeds=args.seeds,
                       train=train, device=args.device)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(config, out=args.out, quiet=args.quiet, save_sparse=args.save_sparse, workers=args.workers)
    from mustat.distributed import is_main

    if not is_main():
        return 0
    windows = [w.message for w in caught if issubclass(w.category, WindowWarning)]
    for w in caught:
        if not issubclass(w.category, WindowWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for name in dict.fromkeys(m.estimator for m in windows):
        mine = [m for m in windows if m.estimator == name]
        short = [m.diagnostics.get("frac_short", float("nan")) for m in mine]
        print(f"\nwindow check ({name}): {len(mine)} of its windows too short for its theory "
              f"({min(short):.0%}-{max(short):.0%} of live weights under-sampled); its SEs are biased there. "
              "See docs/CALIBRATION.md", file=sys.stderr)
    what = "test loss" if results["test_accuracy"].isna().all() else "test accuracy"
    print(f"\n{what} ({args.dataset}, {args.model}, {args.scope} scope, "
          f"seeds {' '.join(map(str, args.seeds))}; mean ± sd over seeds)")
    print(table(results).to_string())
    print(f"\n{len(results)} rows in {time.perf_counter() - t0:.1f} s; results in {results.attrs['out']}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from mustat.benchmark import load_grid, run_benchmark
    from mustat.uncertainty import WindowWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # windows too short for an estimator's theory are recorded per row (se_ok), not printed per round
        warnings.simplefilter("ignore", WindowWarning)
        summary, results = run_benchmark(load_grid(args.grid), args.out, scheduler=args.scheduler,
                                         workers=args.workers, device=args.device, quiet=args.quiet)
    print((Path(args.out) / "report.md").read_text())
    print(f"{len(results)} result rows, {len(summary)} summary rows in {time.perf_counter() - t0:.1f} s; "
          f"written to {args.out}")
    return 0


def _scale(args: argparse.Namespace) -> int:
    import pandas as pd

    from mustat.config import TrainConfig
    from mustat.scaling import plot, scale_experiment
    from mustat.uncertainty import WindowWarning

    config = TrainConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs)
    frames = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WindowWarning)
        for mode in args.modes:
            frames.append(scale_experiment(dataset=args.dataset, model=args.model, cs=args.cs, labels=args.criteria,
                                           sparsity=args.sparsity, mode=mode, track_epochs=args.track_epochs,
                                           config=config, seeds=args.seeds, out=args.out))
    df = pd.concat(frames, ignore_index=True)
    plot(df, Path(args.out) / "scale_invariance.png")
    for mode, g in df.groupby("mode", sort=False):
        t = g.pivot_table(index="c", columns="label", values="test_accuracy", aggfunc="mean", sort=False)
        print(f"\ntest accuracy after global one-shot pruning to {args.sparsity:g}, no retraining; rescaled "
              f"{'after training' if mode == 'after' else 'at initialisation'} (mean over seeds "
              f"{' '.join(map(str, args.seeds))}; largest logit change from the rescaling "
              f"{g.output_change.max():.1e})")
        print(t.round(3).to_string())
    print(f"\nwritten to {args.out}")
    return 0


def runner_options(p: argparse.ArgumentParser, out: str) -> None:
    """The options of a grid runner (calibrate, benchmark)."""
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--scheduler", default="local",
                   help="'local' (a Dask LocalCluster), 'serial' (no Dask), or an existing Dask scheduler address")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the local cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from mustat.config import DEFAULT_CRITERIA, DEFAULT_MAX_TENSOR_SPARSITY, DEFAULT_SE, TrainConfig
    from mustat.criteria import CRITERIA
    from mustat.data import DATASETS
    from mustat.models import MODELS
    from mustat.uncertainty import ESTIMATORS, default_estimators

    d = TrainConfig()  # the defaults, written once

    parser = argparse.ArgumentParser(prog="mustat", description="Magnitude-and-uncertainty pruning with calibrated statistics.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prune", help="train, prune by each criterion, retrain; print and save accuracy vs sparsity",
        description="Train a model, then prune it in rounds by each criterion (retraining after each round), "
                    "and report test accuracy against sparsity. Writes params.json, results.csv and "
                    "accuracy_vs_sparsity.png into --out; rerunning with the same --out resumes. "
                    "Data-parallel on N processes: torchrun --nproc-per-node N -m mustat prune ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS), metavar="NAME",
                   help=f"dataset: {', '.join(sorted(DATASETS))}")
    p.add_argument("--data-dir", default=None, help="folder with your files for mnist/fashion_mnist (IDX) or cifar10 (python batches)")
    p.add_argument("--model", default="mlp", choices=sorted(MODELS), metavar="NAME", help=f"model: {', '.join(sorted(MODELS))}")
    p.add_argument("--criteria", type=names, default=list(DEFAULT_CRITERIA),
                   help=f"criteria to compare, comma- or space-separated, from: {', '.join(sorted(CRITERIA))}; "
                        "one that uses standard errors (mu) runs once per --se estimator, or name one pairing: mu[curvature]")
    p.add_argument("--se", type=names, default=list(DEFAULT_SE),
                   help=f"standard-error estimators for mu, from: {', '.join(sorted(ESTIMATORS))}, or a variant of "
                        f"one: {', '.join(sorted(v for c in ESTIMATORS.values() for v in c.variants))}")
    p.add_argument("--scope", default="global", choices=["global", "layer"], help="rank all weights together, or each layer separately")
    p.add_argument("--schedule", default="geometric", choices=["geometric", "oneshot", "gradual"],
                   help="sparsity per round: geometric (0.5, 0.75, ... then the target), oneshot, or gradual (Zhu & Gupta cubic)")
    p.add_argument("--rounds", type=int, default=5, help="number of rounds of the gradual schedule")
    p.add_argument("--max-tensor-sparsity", type=float, default=DEFAULT_MAX_TENSOR_SPARSITY,
                   help="prune at most this fraction of any one tensor, so global ranking cannot empty a layer "
                        "(0: no cap)")
    p.add_argument("--target-sparsity", type=float, default=0.95, help="final fraction of pruned weights, in (0, 1)")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam", "adadelta"],
                   help="optimizer (sgd uses --momentum)")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="L2 weight decay (without it a perfectly fitting network has no finite optimum to estimate)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size")
    p.add_argument("--sampler", default=d.sampler, choices=["shuffle", "replacement"],
                   help="minibatches drawn with replacement (what the stationary-SGD estimators assume), "
                        "or by epoch-wise reshuffling")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of dense training before pruning")
    p.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs, help="epochs of retraining after each pruning round")
    p.add_argument("--track-epochs", type=int, default=d.track_epochs,
                   help="estimators' window: the last N epochs of each phase (at most the phase)")
    p.add_argument("--seeds", type=ints, default=[0], help="seeds, e.g. '0 1 2'; the table shows mean ± sd")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="output folder (default runs/<id derived from the settings>)")
    p.add_argument("--save-sparse", action="store_true",
                   help="also save each run's final pruned model, compactly, as models/seed<S>-<label>.safetensors "
                        "(load with mustat.load_sparse)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes of one torch thread each, training the seeds' dense models and then every "
                        "(seed, criterion) side by side on the CPU; the numbers equal a serial run's at one thread")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prune)

    b = sub.add_parser(
        "benchmark", help="pruning benchmark over a grid: criteria against magnitude, over seeds, with paired tests",
        description="Run a grid of train -> prune -> retrain experiments (TOML: see mustat.benchmark) and report each "
                    "criterion's accuracy against sparsity with 95% CIs over seeds and paired tests against magnitude. "
                    "Writes params.json, results.csv, summary.csv, report.md and accuracy_vs_sparsity.png into --out; "
                    "rerunning with the same --out resumes, recomputing only unfinished cells.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--grid", required=True, help="TOML grid file (docs/pruning/grid.toml is the one the docs report)")
    runner_options(b, "runs/benchmark")
    b.add_argument("--device", default="cpu", help="device of every cell: cpu, cuda, auto")
    b.set_defaults(func=_benchmark)

    s = sub.add_parser(
        "scale", help="scale-invariance experiment: rescale a hidden layer (function unchanged), prune globally",
        description="Rescale hidden layer 1 of an MLP by c and the next by 1/c (the same function), track every "
                    "estimator after the rescaling, prune globally one-shot without retraining, and report accuracy "
                    "against c for each criterion (mustat.scaling). Writes scale-<mode>.csv and scale_invariance.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--dataset", default="digits", help="dataset")
    s.add_argument("--model", default="mlp", help="an MLP whose submodules '1' and '3' are the Linear layers to rescale")
    s.add_argument("--cs", type=floats, default=[0.1, 0.3, 1.0, 3.0, 10.0], help="scale factors c")
    s.add_argument("--criteria", type=names,
                   default=["magnitude"] + [f"mu[{e}]" for e in default_estimators()],
                   help="criterion labels")
    s.add_argument("--modes", type=names, default=["after", "init"],
                   help="'after' (rescale the trained network) and/or 'init' (rescale the initialisation, then train)")
    s.add_argument("--sparsity", type=float, default=0.95, help="global one-shot sparsity")
    s.add_argument("--optimizer", default="adam", choices=["sgd", "adam"], help="optimizer")
    s.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    s.add_argument("--weight-decay", type=float, default=1e-3, help="L2 weight decay")
    s.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    s.add_argument("--track-epochs", type=int, default=10, help="epochs of tracking after the rescaling")
    s.add_argument("--seeds", type=ints, default=[0, 1, 2], help="seeds")
    s.add_argument("--out", default="runs/scale", help="output folder")
    s.set_defaults(func=_scale)
    from mustat.layerwise.command import add_parser as oneshot_parser

    oneshot_parser(sub)
    from mustat.structured.command import add_parser as structured_parser

    structured_parser(sub)
    _commands_from_plugins(sub)
    return parser


def _commands_from_plugins(sub) -> None:
    """Subcommands other packages register (entry point group ``mustat.commands``: a function
    ``register(subparsers)``); the validation package registers ``calibrate`` this way, so
    the library never imports it."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="mustat.commands"):
        ep.load()(sub)


def main(argv: list[str] | None = None) -> int:
    from mustat.training import DivergenceError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, DivergenceError) as err:
        parser.exit(2, f"mustat {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
