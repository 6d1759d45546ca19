"""The one grid runner the calibration study and the pruning benchmark share: read a TOML
grid, claim and lock the output folder, run the unfinished cells serially or on Dask
distributed, and read their tables back. A cell function writes its own result files
atomically, so whatever finished before an interruption is kept and a resumed grid
recomputes only what is missing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
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


def read_grid(path, known: set[str], lists: Iterable[str] = ()) -> dict:
    """The TOML grid file at ``path`` as a dict; a missing, binary or invalid file, an empty
    one, a top-level key outside ``known`` or a key of ``lists`` that is not a non-empty list
    is an error naming the file (and the valid keys)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        spec = tomllib.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; a grid is a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    if not spec:
        raise ValueError(f"{path} is empty; a grid needs at least its blocks (see the module notes)")
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    for key in lists:
        if key in spec and spec[key] == []:
            raise ValueError(f"{path}: {key} is an empty list; give at least one value, or leave {key} out")
        if key in spec and not isinstance(spec[key], list):
            raise ValueError(f"{path}: {key} must be a non-empty list, e.g. {key} = [{spec[key]!r}], "
                             f"got {spec[key]!r}")
    return spec


def grid_values(path, what: str, build: Callable[[], Any]) -> Any:
    """``build()``, with a wrong value or type in the grid (a TypeError or ValueError from the
    settings' own checks) reported as an error naming the file and the block."""
    try:
        return build()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {what}: {err}") from None


def run_grid(fn: Callable[..., str], cells: Sequence[Any], out: Path, *, key: str, settings: dict,
             done: Callable[[Any], bool], volatile: Iterable[str] = (), scheduler: str = "local", workers: int = 2,
             quiet: bool = False, desc: str = "cells", on_cell: Callable[[str], None] | None = None, **kwargs) -> None:
    """Run every cell of a grid not yet ``done`` into ``out`` (locked for the duration), after
    writing ``params.json`` or checking it holds the same ``settings`` (the differing ones are
    named; ``volatile`` keys may change, see :func:`mustat.runs.claim`)."""
    from mustat.runs import FolderLock, claim, ensure_folder

    out = ensure_folder(out)
    with FolderLock(out):
        finished = (out / "cells").is_dir() and any((out / "cells").iterdir())
        claim(out, key, settings, finished=finished, volatile=volatile)
        todo = [c for c in cells if not done(c)]
        run_cells(fn, todo, total=len(cells), scheduler=scheduler, workers=workers, quiet=quiet, desc=desc,
                  on_cell=on_cell, out=str(out.resolve()), **kwargs)
