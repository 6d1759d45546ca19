"""The ``mustat calibrate`` command, registered by this package (entry point group
``mustat.commands``), so the library never imports the validation package."""

from __future__ import annotations

import argparse
import time


def _calibrate(args: argparse.Namespace) -> int:
    from validation.study import load_grid, quick_grid, run_study

    grid = load_grid(args.grid) if args.grid else quick_grid()
    t0 = time.perf_counter()
    summary, _ = run_study(grid, args.out, scheduler=args.scheduler, workers=args.workers, quiet=args.quiet)
    cols = ["design", "setting", "estimator", "reference", "se_ratio_median", "spearman_z", "coverage95",
            "coverage95_lo", "coverage95_hi", "type1_05"]
    from mustat.uncertainty import ESTIMATORS

    variants = {v for cls in ESTIMATORS.values() for v in cls.variants}  # the main rows, not the variants
    print(summary[~summary.estimator.isin(variants)][cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"\n{len(summary)} summary rows in {time.perf_counter() - t0:.1f} s; report: {args.out}/report.md")
    return 0


def register(sub) -> None:
    """Add ``calibrate`` to the ``mustat`` command's subparsers."""
    from mustat.cli import runner_options

    c = sub.add_parser(
        "calibrate", help="calibration study of the standard-error estimators against exact references",
        description="Compare standard-error estimators with exact references on small designs and report how well "
                    "they are calibrated. Writes params.json, cells.csv, summary.csv, figures and report.md into --out; "
                    "rerunning with the same --out resumes, recomputing only unfinished cells.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--grid", default=None,
                   help="TOML grid file (default: the quick study, about 75-95 s on 2 idle cores: docs/CALIBRATION.md)")
    runner_options(c, "runs/calibration")
    c.set_defaults(func=_calibrate)
