"""Injectable time, for every layer above: production uses the monotonic clock (or the wall clock
for state shared across processes), tests a manual one (no sleeps)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class WallClock:
    """Seconds since the epoch: the time base of state that outlives the process or is shared by
    replicas (the revenue tracker's decay and expiry), where a monotonic clock would restart."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to (Ray Serve's MockTimer idea)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"{seconds=} must be >= 0")
        self._now += seconds
