"""Argument types of the ``mustat`` command's list options (``--seeds '0 1 2'``, ``--criteria a,b``).

Every subcommand's parser uses them (all are built in :mod:`mustat.cli`; a plugin's command,
such as ``validation.cli``, may too), so they live below all of them. Only :mod:`argparse` is
imported: building the parser for ``mustat --help`` stays fast (tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse


def ints(text: str) -> list[int]:
    """``"0 1 2"`` or ``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        return [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like '0 1 2' or '0,1,2', got {text!r}") from None


def floats(text: str) -> list[float]:
    """``"0.1 1 10"`` or ``"0.1,1,10"`` -> ``[0.1, 1.0, 10.0]``."""
    try:
        return [float(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like '0.1 1 10' or '0.1,1,10', got {text!r}") from None


def names(text: str) -> list[str]:
    """``"a b"`` or ``"a,b"`` -> ``["a", "b"]``; empty items are dropped."""
    return [s for s in text.replace(",", " ").split() if s]
