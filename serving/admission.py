"""Admission: answer within the request's budget, degrading by tier, or refuse at once.

A request's budget is the smaller of its deadline and what is left of the SLO after the time it
queued before the server saw it (the caller's ``x-request-start`` header, when it sends one:
kernel and gRPC-core queues are invisible from inside). On arrival it is refused
(``Overloaded``, RESOURCE_EXHAUSTED with a retry hint, in well under a millisecond) only when
even the fallback could not answer in time: it already queued the whole SLO, too many requests
are already inside, or an event loop so far behind (``loop_lag_s``, how late a short timer
fires) that any answer would be late (DEADLINE_EXCEEDED when it is the request's own deadline
that is too close to meet).
Otherwise it moves down the ladder as its predicted waits require:

    deep      the router's depth: the model batcher's predicted wait plus that depth's cost fit
    shallow   a shallower depth that fits after the wait ("shallower"; ``Router.fit_budget``)
    cheap     the router chose it, or no depth fits after the wait ("degraded")
    fallback  even retrieval's predicted wait would not fit: the segment's top items, no model

so a queue never grows past what can be served within the SLO. The router sees the full path's
predicted wait too (``RouteContext.queue_delay_s``): value-aware routing raises its lambda with
it, so the lowest-value requests move down first, before any request needs this hard check.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from serving.errors import DeadlineExceeded, Overloaded

LAG_PROBES = 4
"""Probes the lag is the minimum of: sustained lateness, not one stall."""


@dataclass(frozen=True)
class AdmissionConfig:
    slo_ms: float = 50.0
    """Latency target of an answered request: the budget of a request whose deadline is longer."""
    degrade: bool = True
    """Move a request whose predicted wait exceeds its budget down the ladder (full -> cheap ->
    fallback); off, such a request is refused instead (capacity measurements of one path)."""
    max_in_flight: int = 256
    """Requests inside the pipeline at once; one more is refused on arrival."""
    max_loop_lag_ms: float = 20.0
    """Event-loop lag above which new requests are refused on arrival."""
    lag_probe_ms: float = 5.0
    """Interval of the timer whose lateness measures the event loop's lag."""
    retry_after_ms: int = 100
    """Retry hint sent with a refusal (trailer ``grpc-retry-pushback-ms``)."""
    fallback_refresh_s: float = 2.0
    """How often the fallback tier's lists are rebuilt from the slates served since."""

    def __post_init__(self) -> None:
        if self.slo_ms <= 0 or self.max_loop_lag_ms <= 0 or self.lag_probe_ms <= 0:
            raise ValueError(f"{self.slo_ms=}, {self.max_loop_lag_ms=} and {self.lag_probe_ms=} must be > 0")
        if self.max_in_flight < 1:
            raise ValueError(f"{self.max_in_flight=} must be >= 1")
        if self.retry_after_ms < 0 or self.fallback_refresh_s <= 0:
            raise ValueError(f"{self.retry_after_ms=} must be >= 0 and {self.fallback_refresh_s=} > 0")


class Admission:
    """Counts requests in flight, measures the loop's lag, refuses what cannot be answered in time."""

    def __init__(self, config: AdmissionConfig = AdmissionConfig()) -> None:
        self.config = config
        self.in_flight = 0
        self.loop_lag_s = 0.0
        self.counts: Counter[str] = Counter()
        """admitted, refused_in_flight, refused_lag, refused_deadline, degraded, fallback, ..."""
        self._probe: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the lag probe on the running loop (idempotent)."""
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._measure_lag())

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None

    def admit(self, deadline_left_s: float | None, queued_s: float = 0.0) -> float:
        """The request's budget in seconds, or ``Overloaded`` when not even the fallback fits.

        ``queued_s``: how long the call waited before the server saw it (``x-request-start``),
        spent from the SLO; a call that already waited the whole SLO is refused at once.
        """
        config = self.config
        reason = None
        if queued_s * 1000.0 >= config.slo_ms:
            reason, why = "refused_queued", f"queued {queued_s * 1000.0:.0f} ms before the server saw it"
        elif self.in_flight >= config.max_in_flight:
            reason, why = "refused_in_flight", f"{self.in_flight} requests in flight"
        elif self.loop_lag_s * 1000.0 > config.max_loop_lag_ms:
            reason, why = "refused_lag", f"event loop {self.loop_lag_s * 1000.0:.0f} ms behind"
        elif deadline_left_s is not None and deadline_left_s <= self.loop_lag_s:
            # A retry with the same deadline cannot succeed either: the deadline's own code.
            self.counts["refused_deadline"] += 1
            raise DeadlineExceeded(f"{deadline_left_s * 1000.0:.1f} ms left of the deadline on arrival")
        if reason is not None:
            self.counts[reason] += 1
            raise Overloaded(f"overloaded: {why}; retry in {config.retry_after_ms} ms", config.retry_after_ms)
        self.counts["admitted"] += 1
        budget = config.slo_ms / 1000.0 - max(queued_s, 0.0)
        return budget if deadline_left_s is None else min(budget, deadline_left_s)

    def stats(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "loop_lag_ms": self.loop_lag_s * 1000.0,
            "slo_ms": self.config.slo_ms,
            **{name: int(n) for name, n in sorted(self.counts.items())},
        }

    async def _measure_lag(self) -> None:
        interval = self.config.lag_probe_ms / 1000.0
        recent: deque[float] = deque([0.0], maxlen=LAG_PROBES)
        while True:
            expected = time.perf_counter() + interval
            await asyncio.sleep(interval)
            recent.append(max(time.perf_counter() - expected, 0.0))
            # The least late of the last few: one stall (a collection, a first call) is not
            # overload; every probe late is.
            self.loop_lag_s = min(recent)
