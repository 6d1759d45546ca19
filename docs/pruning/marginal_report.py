"""The report of the finished cells of one or more benchmark runs, for a grid that has not finished
(every finished cell's file is complete: cells are written atomically when they end). Writes
``results.csv``, ``summary.csv`` and ``report.md`` (the benchmark's own summary and tables) into
the last argument.

    python docs/pruning/marginal_report.py runs/pruning-marginal runs/pruning-marginal-small docs/pruning/marginal
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from mustat._io import atomic_write
from mustat.benchmark import report, summarise
from mustat.results import RESULT_COLUMNS
from mustat.runs import read_table


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    *runs, out = map(Path, argv)
    files = sorted(f for r in runs for f in (r / "cells").glob("*.csv"))
    if not files:
        raise SystemExit(f"no finished cells under {', '.join(map(str, runs))}")
    results = pd.concat([read_table(f, RESULT_COLUMNS) for f in files], ignore_index=True)
    summary = summarise(results)
    atomic_write(out / "results.csv", lambda p: results.to_csv(p, index=False))
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    text = report(summary)
    atomic_write(out / "report.md", lambda p: Path(p).write_text(
        f"{len(files)} finished cells from {', '.join(map(str, runs))}\n\n{text}"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
