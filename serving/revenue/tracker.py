"""Revenue tracking: inferences, compute and realised revenue per segment and path.

``RevenueTracker`` is the ABC the pipeline and the router see. Backends:
``serving.revenue.memory.InMemoryTracker``, the embedded default (state machine in
``serving.revenue.ledger``, durable through the append-only file of ``serving.revenue.log``), and
``serving.revenue.redis.RedisTracker``, shared by all replicas. ``serving.revenue.backends``
builds either from its typed config.

Per cell (segment x path) a tracker keeps lifetime totals and exponentially decaying windows
(half-life on the tracker's clock) of the same ``Counters``. Besides plain sums it keeps
inverse-propensity sums: a request served by path j with probability q adds 1/q to
``ipw_inferences`` of j, and its revenue r adds r/q to ``ipw_revenue``. Their ratio estimates the
revenue per inference path j would earn on the whole segment, without the bias of which requests
the router happened to send there.

Outcomes are idempotent on ``(request_id, item_id, event)``: the first report is applied, later
ones are counted as duplicates. Revenue is attributed to the cell that served the request, which
the tracker remembers for ``request_ttl_s``; an outcome for a forgotten request is accepted (and
deduped) but counted as unknown and earns no cell anything.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from typing import Any

from serving.domain import EVENTS, Outcome, OutcomeReport, Path_
from serving.errors import InvalidArgument
from serving.revenue.ledger import COUNTERS, Cells

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inference:
    """One served request: which cell served it, what it cost, and how likely that path was."""

    request_id: str
    segment: str
    path: Path_
    compute_ms: float
    propensity: float = 1.0
    """Probability that the router chose ``path`` for this request (1.0 when deterministic)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.propensity <= 1.0:
            raise ValueError(f"{self.propensity=} must be in (0, 1]")
        if not (math.isfinite(self.compute_ms) and self.compute_ms >= 0):
            raise ValueError(f"{self.compute_ms=} must be finite and >= 0")


class RevenueTracker(ABC):
    @abstractmethod
    def record_inference(self, inference: Inference) -> None:
        """Remember which cell served a request and what it cost. Runs on the event loop: it is
        cheap and never raises because a backing store is down."""

    @abstractmethod
    def record_outcomes(self, outcomes: list[Outcome]) -> OutcomeReport:
        """Apply outcomes once each; they are durable before this returns. Raises ``Unavailable``
        (nothing acknowledged; retrying is safe) when they cannot be made durable."""

    @abstractmethod
    def cells(self) -> Cells:
        """Lifetime and windowed counters of every cell, decayed to the clock's now."""

    def flush(self) -> None:  # noqa: B027
        """Push buffered inferences to the backing store (raises ``Unavailable`` if it can't)."""

    def health(self) -> dict[str, float]:
        """Error and buffer counters of the backend."""
        return {}

    def close(self) -> None:  # noqa: B027
        """Flush and release resources (files, connections)."""

    def snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        """``segment -> path -> {inferences, compute_ms, revenue, ..., window_inferences, ...}``:
        lifetime counters under their names, windowed ones prefixed ``window_``."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (segment, path), stats in sorted(self.cells().items()):
            row = dict(zip(COUNTERS, astuple(stats.lifetime), strict=True))
            row.update(zip((f"window_{c}" for c in COUNTERS), astuple(stats.window), strict=True))
            out.setdefault(segment, {})[path] = row
        return out

    def stats(self) -> dict[str, Any]:
        return {"segments": self.snapshot(), "health": self.health()}


def check_outcomes(outcomes: Iterable[Outcome]) -> None:
    """Reject a batch before any of it is applied (the converter checks too; this is the tracker's
    own contract, so a bad in-process caller cannot poison the counters)."""
    for i, outcome in enumerate(outcomes):
        if outcome.event not in EVENTS:
            raise InvalidArgument(f"outcomes[{i}].event", f"must be one of {EVENTS}, got {outcome.event!r}")
        if not math.isfinite(outcome.revenue):
            raise InvalidArgument(f"outcomes[{i}].revenue", f"must be finite, got {outcome.revenue}")
