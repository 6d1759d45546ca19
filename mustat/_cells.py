"""Run independent cells of a grid serially or on Dask distributed: the one piece of
machinery the calibration study and the pruning benchmark share. A cell function writes
its own result files atomically, so whatever finished before an interruption is kept."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any


def one_thread_in_dask_worker() -> None:
    """Inside a Dask worker process use one torch thread: the workers give the parallelism."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    import torch

    torch.set_num_threads(1)


def run_cells(fn: Callable[..., str], todo: Sequence[Any], *, total: int, scheduler: str = "local", workers: int = 2,
              quiet: bool = False, desc: str = "cells", on_cell: Callable[[str], None] | None = None,
              **kwargs) -> None:
    """Call ``fn(cell, **kwargs)`` for every cell in ``todo`` (each returns its key).

    ``scheduler``: ``"serial"`` (this process), ``"local"`` (a Dask LocalCluster of
    ``workers`` single-threaded processes) or the address of a running Dask scheduler.
    ``total`` cells make up the grid (the progress bar starts at the finished ones).
    """
    from tqdm import tqdm

    bar = tqdm(total=total, initial=total - len(todo), desc=desc, disable=quiet, file=sys.stderr)
    try:
        if todo and scheduler == "serial":
            for cell in todo:
                key = fn(cell, **kwargs)
                bar.update(1)
                if on_cell:
                    on_cell(key)
        elif todo:
            from distributed import Client, LocalCluster, as_completed

            cluster = None
            if scheduler == "local":
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
                client = Client(cluster)
            else:
                client = Client(scheduler)
            try:
                for fut in as_completed(client.map(fn, todo, pure=False, **kwargs)):
                    key = fut.result()
                    bar.update(1)
                    if on_cell:
                        on_cell(key)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        bar.close()


def read_grid(path, known: set[str]) -> dict:
    """The TOML grid file at ``path`` as a dict; a missing file, invalid TOML or a top-level key
    outside ``known`` is an error naming the file (and the valid keys)."""
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    return spec
