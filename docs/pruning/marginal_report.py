"""The report of the finished cells of one or more benchmark runs, for a grid that has not finished
(every finished cell's file is complete: cells are written atomically when they end). Each
argument but the last is a run folder (its ``cells/*.csv``) or a ``results.csv`` written here
before; rows of a cell (setting and seed) that two inputs both have are an error. Writes
``results.csv``, ``summary.csv`` and ``report.md`` (the benchmark's own summary and tables) into
the last argument.

    python docs/pruning/marginal_report.py docs/pruning/marginal/results.csv runs/pruning-marginal-rest \
        runs/pruning-marginal-lenet5 docs/pruning/marginal
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
    files = sorted(f for r in runs if r.suffix != ".csv" for f in (r / "cells").glob("*.csv"))
    tables = [r for r in runs if r.suffix == ".csv"]
    if not files and not tables:
        raise SystemExit(f"no finished cells under {', '.join(map(str, runs))}")
    parts = [pd.read_csv(t) for t in tables] + [read_table(f, RESULT_COLUMNS) for f in files]
    cell = ["dataset", "model", "scope", "weight_decay", "seed"]
    seen: set = set()
    for part in parts:
        keys = set(map(tuple, part[cell].drop_duplicates().itertuples(index=False)))
        if keys & seen:
            raise SystemExit(f"cells {sorted(keys & seen)[:3]} appear in two inputs")
        seen |= keys
    n_cells = len(seen)
    results = pd.concat(parts, ignore_index=True)
    summary = summarise(results)
    atomic_write(out / "results.csv", lambda p: results.to_csv(p, index=False))
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    text = report(summary)
    atomic_write(out / "report.md", lambda p: Path(p).write_text(
        f"{n_cells} finished cells from {', '.join(map(str, runs))}\n\n{text}"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
