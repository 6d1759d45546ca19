"""Cost before work: what a long computation will take, estimated from the shapes before it starts,
and said before it starts. One :class:`Cost` serves the estimators' fits
(:meth:`mustat.Estimator.cost`) and one-shot pruning (:attr:`mustat.OneShotReport.estimate`)."""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch

#: an estimated computation longer than this many seconds is announced (logged, and printed with
#: progress bars when ``progress`` is not False)
LONG_FIT_SECONDS = 5.0


@functools.cache
def machine_flops(dtype: torch.dtype = torch.float64) -> float:
    """Multiply-adds per second (counted as 2 flops) of a 512 x 512 matrix product in ``dtype`` on
    this machine with torch's current thread count: the best of three, measured once per process
    and dtype (a few milliseconds). The unit of :attr:`Cost.seconds`."""
    a = torch.randn(512, 512, dtype=dtype, generator=torch.Generator().manual_seed(0))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 512**3 / max(best, 1e-9)


@dataclass(frozen=True)
class Cost:
    """What a computation will cost, estimated from the shapes before any work.

    Attributes
    ----------
    bytes : int
        Peak memory it holds beyond the model and the data.
    seconds : float
        ``flops`` divided by :func:`machine_flops` (a measured matrix-product rate), each stage
        weighted by how far it runs below that rate: an order of magnitude, ``nan`` when time is
        not estimated.
    flops : float
        Floating-point operations of the whole computation.
    parts : tuple of (str, float)
        Seconds per stage, in the order they run.
    factor_bytes : int
        Of ``bytes``, what stays allocated afterwards (an estimator's curvature factors).
    note : str
        A cheaper option, when one is known (shown after the figures).
    memory : tuple of (str, int)
        ``bytes`` by what holds them, where the breakdown is known.
    """

    bytes: int
    seconds: float = math.nan
    flops: float = math.nan
    parts: tuple[tuple[str, float], ...] = ()
    factor_bytes: int = 0
    note: str = ""
    memory: tuple[tuple[str, int], ...] = ()

    @property
    def long(self) -> bool:
        """Whether it is expected to take more than :data:`LONG_FIT_SECONDS`."""
        return self.seconds > LONG_FIT_SECONDS

    def __str__(self) -> str:
        gib = self.bytes / (1 << 30)
        held = ", ".join(f"{k} {v / (1 << 20):.0f} MiB" for k, v in self.memory)
        memory = f"about {gib:.2f} GiB" + (f" ({held})" if held else "")
        if math.isnan(self.seconds):
            return memory
        parts = ", ".join(f"{k} {v:.2g} s" for k, v in self.parts if v >= 0.05)
        return (f"{memory} and {self.seconds:.2g} s" + (f" ({parts})" if parts else "")
                + (f"; {self.note}" if self.note else ""))


def announce(what: str, cost: Cost | None, progress: bool | None, logger: logging.Logger) -> bool:
    """Say a long computation's estimated cost before it starts (``"{what} {cost}"``); returns
    whether to show progress bars.

    ``progress=None`` (auto): bars and a line on stderr when the estimate exceeds
    :data:`LONG_FIT_SECONDS`; ``True``: always; ``False``: never (the estimate still goes to
    ``logger`` at INFO)."""
    long = cost is not None and cost.long
    show = bool(progress) if progress is not None else long
    if cost is not None and (long or show):
        line = f"{what} {cost}"
        logger.info(line)
        if show:
            print(line, file=sys.stderr, flush=True)
    return show
