"""The ``mustat`` command."""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like '0 1 2' or '0,1,2', got {text!r}") from None


def _names(text: str) -> list[str]:
    return [s for s in text.replace(",", " ").split() if s]


def _prune(args: argparse.Namespace) -> int:
    from mustat.pipeline import TrainConfig, run, table
    from mustat.uncertainty import WindowWarning

    config = TrainConfig(optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
                         track_epochs=args.track_epochs, sampler=args.sampler)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(dataset=args.dataset, data_dir=args.data_dir, model=args.model, criteria=args.criteria,
                      se=args.se, scope=args.scope, schedule_kind=args.schedule, target_sparsity=args.target_sparsity,
                      max_tensor_sparsity=args.max_tensor_sparsity or None,
                      rounds=args.rounds, seeds=args.seeds, config=config, device=args.device, out=args.out,
                      quiet=args.quiet, save_sparse=args.save_sparse)
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


def _calibrate(args: argparse.Namespace) -> int:
    from validation.study import Grid, load_grid, run_study

    grid = load_grid(args.grid) if args.grid else Grid()
    t0 = time.perf_counter()
    summary, _ = run_study(grid, args.out, scheduler=args.scheduler, workers=args.workers, quiet=args.quiet)
    cols = ["design", "setting", "estimator", "se_ratio_median", "loglog_slope", "spearman_z", "coverage95", "type1_05"]
    head = summary[summary.estimator.isin(["pseudo", "calibrated", "bootstrap", "wald"])][cols]
    print(head.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"\n{len(summary)} summary rows in {time.perf_counter() - t0:.1f} s; report: {args.out}/report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mustat.criteria import CRITERIA
    from mustat.data import DATASETS
    from mustat.models import MODELS
    from mustat.pipeline import DEFAULT_CRITERIA, DEFAULT_MAX_TENSOR_SPARSITY, DEFAULT_SE, TrainConfig
    from mustat.uncertainty import ESTIMATORS

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
    p.add_argument("--criteria", type=_names, default=list(DEFAULT_CRITERIA),
                   help=f"criteria to compare, comma- or space-separated, from: {', '.join(sorted(CRITERIA))}; "
                        "one that uses standard errors (mu) runs once per --se estimator, or name one pairing: mu[curvature]")
    p.add_argument("--se", type=_names, default=list(DEFAULT_SE),
                   help=f"standard-error estimators for mu, from: {', '.join(sorted(ESTIMATORS))}")
    p.add_argument("--scope", default="global", choices=["global", "layer"], help="rank all weights together, or each layer separately")
    p.add_argument("--schedule", default="geometric", choices=["geometric", "oneshot", "gradual"],
                   help="sparsity per round: geometric (0.5, 0.75, ... then the target), oneshot, or gradual (Zhu & Gupta cubic)")
    p.add_argument("--rounds", type=int, default=5, help="number of rounds of the gradual schedule")
    p.add_argument("--max-tensor-sparsity", type=float, default=DEFAULT_MAX_TENSOR_SPARSITY,
                   help="prune at most this fraction of any one tensor, so global ranking cannot empty a layer "
                        "(0: no cap)")
    p.add_argument("--target-sparsity", type=float, default=0.95, help="final fraction of pruned weights, in (0, 1)")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam"], help="optimizer (sgd uses --momentum)")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="L2 weight decay (without it a perfectly fitting network has no finite optimum to estimate)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size")
    p.add_argument("--sampler", default=d.sampler, choices=["shuffle", "replacement"],
                   help="minibatches drawn with replacement (what the calibrated and batch-means SEs assume), "
                        "or by epoch-wise reshuffling")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of dense training before pruning")
    p.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs, help="epochs of retraining after each pruning round")
    p.add_argument("--track-epochs", type=int, default=d.track_epochs,
                   help="estimators' window: the last N epochs of each phase (at most the phase)")
    p.add_argument("--seeds", type=_ints, default=[0], help="seeds, e.g. '0 1 2'; the table shows mean ± sd")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="output folder (default runs/<id derived from the settings>)")
    p.add_argument("--save-sparse", action="store_true",
                   help="also save each run's final pruned model, compactly, as models/seed<S>-<label>.safetensors "
                        "(load with mustat.load_sparse)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prune)

    c = sub.add_parser(
        "calibrate", help="calibration study of standard-error estimators (pseudo bootstrap, calibrated, bootstrap, Wald)",
        description="Compare standard-error estimators with exact references on small designs and report how well "
                    "they are calibrated. Writes params.json, cells.csv, summary.csv, figures and report.md into --out; "
                    "rerunning with the same --out resumes, recomputing only unfinished cells.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--grid", default=None, help="TOML grid file (default: the quick study, a few minutes on 2 cores)")
    c.add_argument("--out", default="runs/calibration", help="output folder")
    c.add_argument("--scheduler", default="local",
                   help="'local' (a Dask LocalCluster), 'serial' (no Dask), or an existing Dask scheduler address")
    c.add_argument("--workers", type=int, default=2, help="worker processes of the local cluster")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"mustat {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
