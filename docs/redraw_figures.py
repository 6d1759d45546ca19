"""Redraw every committed figure under docs/ from the committed tables; nothing is retrained.

    .venv/bin/python docs/redraw_figures.py

- calibration studies (``python -m validation.report DIR``): ``coverage.png`` and
  ``hidden_layers.png`` from each ``summary.csv``; ``loglog_se.png`` and ``qq_null_pvalues.png``
  from the per-weight ``cells.csv`` (not committed: tens of MB) or from the figures' points that
  a study writes since 2026-12-07 (``loglog_points.csv``, ``qq_points.csv``). Studies committed
  before then have neither, so their log-log and QQ figures stay as their runs drew them until
  they are rerun;
- ``calibration/window.png`` from ``calibration/window.csv`` (``window.py --redraw``);
- ``pruning/{full,collapse}/accuracy_vs_sparsity.png`` from their ``results.csv``;
- ``pruning/scale/scale_invariance.png`` from ``scale-after.csv`` and ``scale-init.csv``;
- ``structured/accuracy_vs_latency.png`` from ``structured/results.csv``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

DOCS = Path(__file__).resolve().parent


def _script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> list[Path]:
    import matplotlib

    from mustat import benchmark, scaling
    from mustat._io import atomic_write
    from validation.report import redraw

    written = []
    # the calibration figures set seaborn's theme; the others are drawn in matplotlib's defaults, as their runs draw them
    with matplotlib.rc_context():
        for summary in sorted((DOCS / "calibration").rglob("summary.csv")):
            written += redraw(summary.parent)
        window = _script(DOCS / "calibration" / "window.py")
        window.save_figure(pd.read_csv(DOCS / "calibration" / "window.csv"), DOCS / "calibration")
        written.append(DOCS / "calibration" / "window.png")
    for name in ("full", "collapse"):
        folder = DOCS / "pruning" / name
        written.append(benchmark.plot(pd.read_csv(folder / "results.csv"), folder / "accuracy_vs_sparsity.png"))
    scale = DOCS / "pruning" / "scale"
    frames = [pd.read_csv(scale / f"scale-{mode}.csv") for mode in ("after", "init")]
    written.append(scaling.plot(pd.concat(frames, ignore_index=True), scale / "scale_invariance.png"))
    structured = _script(DOCS / "structured" / "benchmark.py")
    fig = structured.figure(pd.read_csv(DOCS / "structured" / "results.csv"))
    path = DOCS / "structured" / "accuracy_vs_latency.png"
    atomic_write(path, lambda t: fig.savefig(t, dpi=110, format="png"))
    written.append(path)
    return written


if __name__ == "__main__":
    for p in main():
        print(p.relative_to(DOCS.parent))
