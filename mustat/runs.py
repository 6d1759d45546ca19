"""A run's folder: its settings (``params.json``), a lock, checkpoints and result tables.

Everything a run writes goes through here, atomically (:mod:`mustat._io`), so an
interrupted run (even by SIGKILL) leaves only whole files, and resuming redoes exactly
what was not finished. Files that cannot be read (truncated, garbage, written by
something else) are clear errors naming the file and what to do, raised before anything
is overwritten. One process at a time may use a folder (:class:`FolderLock`).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mustat._io import atomic_write, write_json
from mustat._version import __version__ as mustat_version


class RunFileError(ValueError):
    """A file of a run folder cannot be used (``path`` names it)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)

    def __reduce__(self):  # crosses process boundaries intact (parallel workers)
        return type(self), (str(self), self.path)


def ensure_folder(out: Path) -> Path:
    """Create ``out`` (and its parents), or say clearly why it cannot be written."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        why = err.strerror or str(err)
        raise ValueError(f"cannot write the run folder --out {out}: {why}; choose a folder you can write") from None
    return out


class FolderLock:
    """An exclusive lock on a run folder for as long as a run uses it (``fcntl.flock`` on
    ``<out>/.lock``; the system releases it when the process dies, even by SIGKILL).

    A second run on the same folder fails at once with a message saying so."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock
            return self
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"another mustat run is using {self.path.parent} (it holds {self.path}); wait for it "
                             "to finish, or choose another --out") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def versions() -> dict[str, str]:
    return dict(mustat=mustat_version, torch=torch.__version__, numpy=np.__version__, pandas=pd.__version__,
                python=platform.python_version())


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, (dict, list)) and d:
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def differences(old: dict, new: dict, limit: int = 6) -> str:
    """``"train.lr: 0.001 there, 1000.0 here; ..."`` for the settings that differ."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in dict.fromkeys(list(a) + list(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    shown = [f"{k}: {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} here" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(f"{path} is not a readable settings file ({type(err).__name__}: {err}); it belongs to an "
                           "earlier run in that folder: delete the folder or choose another --out", path) from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path} does not hold a settings object; delete the folder or choose another --out", path)
    return value


def claim(out: Path, key: str, settings: dict, *, finished: bool, volatile: Iterable[str] = (), **extra) -> None:
    """Write ``params.json`` (``{key: settings, "versions": ..., **extra}``), or check that the
    folder's run has the same settings (naming those that differ).

    A folder whose earlier run finished nothing (``finished`` False: it failed before its
    first result) is taken over by the new settings. Keys in ``volatile`` may differ; the
    file is then rewritten (the study's code-level reference settings, which its cell keys
    carry)."""
    path = Path(out) / "params.json"
    settings = json.loads(json.dumps(settings))  # what it reads back as
    if path.exists():
        old = read_json(path).get(key)
        if not isinstance(old, dict):
            old = {}
        fixed_old = {k: v for k, v in old.items() if k not in volatile}
        fixed_new = {k: v for k, v in settings.items() if k not in volatile}
        if fixed_old == fixed_new:
            if old == settings:
                return
        elif finished:
            raise ValueError(f"{out} holds a run with other settings ({differences(fixed_old, fixed_new)}); choose "
                             f"another --out, or delete {out} to start over")
    write_json(path, {key: settings, "versions": versions(), **extra})


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, on the CPU; a clear error naming the
    file if it cannot be read (delete it to redo that part)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage, a pickle of something else
        raise RunFileError(f"checkpoint {path} cannot be read ({type(err).__name__}: it is truncated, empty, or not "
                           "a checkpoint mustat wrote); delete it and rerun to redo that part (finished parts are "
                           "kept)", path) from None
    if not isinstance(state, dict) or "round" not in state or "model" not in state:
        raise RunFileError(f"checkpoint {path} is not a mustat checkpoint; delete it and rerun to redo that part",
                           path)
    return state


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda t: torch.save(state, t))


def read_table(path: Path, required: Iterable[str] = ()) -> pd.DataFrame:
    """A results CSV the runner wrote, with the ``required`` columns; a clear error naming the
    file when it is damaged."""
    try:
        df = pd.read_csv(path)
        missing = [c for c in required if c not in df]
        if missing:
            raise ValueError(f"it lacks the columns {missing}")
    except Exception as err:
        raise RunFileError(f"{path} cannot be read ({type(err).__name__}: {err}); it is damaged: delete it and "
                           "rerun to recompute it", path) from None
    return df


def write_table(path: Path, df: pd.DataFrame) -> Path:
    return atomic_write(path, lambda t: df.to_csv(t, index=False))
