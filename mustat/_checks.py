"""Argument validation shared by the public API: every message names the
argument, the value received and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum
from numbers import Integral, Real
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def check_scalar(
    value: object,
    name: str,
    *,
    kind: type | tuple[type, ...] = Real,
    low: float | None = None,
    high: float | None = None,
    closed: str = "both",
) -> float:
    """Check a number's type and range; return it unchanged.

    ``closed`` says which ends of ``[low, high]`` are included: ``"both"``,
    ``"left"``, ``"right"`` or ``"neither"``.
    """
    if isinstance(value, bool) or not isinstance(value, kind):
        want = "an integer" if kind is Integral else "a real number"
        raise TypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    if isinstance(value, Real) and math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    lo_ok = low is None or (value >= low if closed in ("both", "left") else value > low)
    hi_ok = high is None or (value <= high if closed in ("both", "right") else value < high)
    if not (lo_ok and hi_ok):
        left = "[" if closed in ("both", "left") else "("
        right = "]" if closed in ("both", "right") else ")"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def check_option(value: object, name: str, options: type[E] | Iterable[str]):
    """Return ``value`` as a member of ``options`` (an Enum or a list of names).

    Unknown values raise ``ValueError`` listing the valid names.
    """
    if isinstance(options, type) and issubclass(options, Enum):
        if isinstance(value, options):
            return value
        valid = [m.value for m in options]
        if value in valid:
            return options(value)
    else:
        valid = list(options)
        if value in valid:
            return value
    raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")
