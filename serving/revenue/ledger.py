"""The revenue tracker's state machine: cells of counters with decaying windows, remembered
requests and outcome keys. The in-process tracker runs it live, and log replay runs it again
from the recorded times, so the two reach the same state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from serving.decay import decay
from serving.domain import Outcome, Path_
from serving.revenue.config import MemoryTrackerConfig
from serving.revenue.log import (
    CellRecord,
    InferenceRecord,
    LedgerImage,
    OutcomeRecord,
    Record,
    RequestRecord,
    SeenRecord,
    Served,
)


@dataclass(frozen=True)
class Counters:
    """Sums over one cell (segment x path), lifetime or decayed."""

    inferences: float = 0.0
    """Requests served."""
    compute_ms: float = 0.0
    """CPU milliseconds spent scoring them."""
    revenue: float = 0.0
    """Revenue of the outcomes attributed to them."""
    outcomes: float = 0.0
    """Outcomes attributed to them."""
    ipw_inferences: float = 0.0
    """Sum of 1/propensity over requests served: estimates the segment's request count."""
    ipw_revenue: float = 0.0
    """Sum of revenue/propensity over attributed outcomes: estimates the segment's revenue had
    every request taken this path."""

    @property
    def revenue_per_inference(self) -> float:
        return self.revenue / self.inferences if self.inferences > 0 else 0.0

    @property
    def ipw_revenue_per_inference(self) -> float:
        """Self-normalised inverse-propensity estimate of this path's revenue per request."""
        return self.ipw_revenue / self.ipw_inferences if self.ipw_inferences > 0 else 0.0

    @property
    def compute_ms_per_inference(self) -> float:
        return self.compute_ms / self.inferences if self.inferences > 0 else 0.0


COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(Counters))


@dataclass(frozen=True)
class CellStats:
    lifetime: Counters
    window: Counters
    """Each contribution weighted by 2^(-age / half_life_s)."""


Cells = dict[tuple[str, Path_], CellStats]


class Cell:
    """Lifetime sums and decaying window sums of one segment x path.

    The window is stored as its value at ``ts``, the latest time added; an earlier contribution
    is decayed to ``ts`` before it is added, so the result does not depend on arrival order
    (replay reproduces live state exactly)."""

    __slots__ = ("lifetime", "ts", "window")

    def __init__(self) -> None:
        self.lifetime = [0.0] * len(COUNTERS)
        self.window = [0.0] * len(COUNTERS)
        self.ts: float | None = None

    def add(self, t: float, half_life_s: float, deltas: Mapping[int, float]) -> None:
        if self.ts is None:
            self.ts = t
        if t > self.ts:
            factor = 2.0 ** (-(t - self.ts) / half_life_s)
            self.window = [v * factor for v in self.window]
            self.ts = t
        scale = decay(1.0, self.ts - t, half_life_s)
        for i, x in deltas.items():
            self.lifetime[i] += x
            self.window[i] += x * scale

    def stats(self, now: float, half_life_s: float) -> CellStats:
        age = now - self.ts if self.ts is not None else 0.0
        window = [decay(v, age, half_life_s) for v in self.window]
        return CellStats(Counters(*self.lifetime), Counters(*window))


I_INFERENCES, I_COMPUTE_MS, I_REVENUE, I_OUTCOMES, I_IPW_INFERENCES, I_IPW_REVENUE = range(len(COUNTERS))
"""Positions of the counters in a Cell's lists."""


class Ledger:
    """Cells, remembered requests and outcome keys, with expiry by time and caps on memory.

    Not thread-safe: the tracker holds its lock. Every record carries its time, so log replay
    drives the ledger exactly as live traffic did."""

    def __init__(self, config: MemoryTrackerConfig) -> None:
        self.config = config
        self.cells_: dict[tuple[str, Path_], Cell] = {}
        self.requests: OrderedDict[str, tuple[str, Path_, float, float]] = OrderedDict()
        """request_id -> (segment, path, propensity, expires_at), oldest first."""
        self.seen: OrderedDict[tuple[str, int, str], float] = OrderedDict()
        """outcome key -> expires_at, oldest first."""
        self.requests_evicted = 0
        self.keys_evicted = 0

    def infer(self, r: InferenceRecord) -> None:
        self.expire(r.t)
        self.remember(r.request_id, (r.segment, r.path, r.propensity, r.t + self.config.request_ttl_s))
        deltas = {I_INFERENCES: 1.0, I_COMPUTE_MS: r.compute_ms, I_IPW_INFERENCES: 1.0 / r.propensity}
        self.cell(r.segment, r.path).add(r.t, self.config.half_life_s, deltas)

    def classify(self, t: float, outcomes: Iterable[Outcome]) -> tuple[list[OutcomeRecord], int]:
        """The new outcomes, each with the cell it is attributed to (``served`` None: unknown
        request), and the number of duplicates (seen before, or repeated in the batch).
        Changes nothing: the tracker applies them once they are durable."""
        new: list[OutcomeRecord] = []
        batch: set[tuple[str, int, str]] = set()
        duplicates = 0
        for o in outcomes:
            key = o.key
            if key in batch or self.is_seen(t, key):
                duplicates += 1
                continue
            batch.add(key)
            new.append(
                OutcomeRecord(t, o.request_id, o.item_id, o.event, o.revenue, self.served(t, o.request_id))
            )
        return new, duplicates

    def apply(self, new: Iterable[OutcomeRecord]) -> int:
        """Apply classified outcomes; returns how many had no known request."""
        unknown = 0
        for r in new:
            self.mark_seen((r.request_id, r.item_id, r.event), r.t + self.config.dedupe_ttl_s)
            if r.served is None:
                unknown += 1
                continue
            segment, path, propensity = r.served
            deltas = {I_REVENUE: r.revenue, I_OUTCOMES: 1.0, I_IPW_REVENUE: r.revenue / propensity}
            self.cell(segment, path).add(r.t, self.config.half_life_s, deltas)
        return unknown

    def apply_record(self, record: Record) -> None:
        """Replay one log record."""
        if isinstance(record, InferenceRecord):
            self.infer(record)
        elif isinstance(record, OutcomeRecord):
            # A batch written before a failed fsync and retried is in the log twice: first wins.
            if not self.is_seen(record.t, (record.request_id, record.item_id, record.event)):
                self.apply([record])
        elif isinstance(record, CellRecord):
            cell = self.cell(record.segment, record.path)
            cell.ts, cell.lifetime, cell.window = record.ts, list(record.lifetime), list(record.window)
        elif isinstance(record, RequestRecord):
            self.remember(record.request_id, (record.segment, record.path, record.propensity, record.expires))
        elif isinstance(record, SeenRecord):
            self.mark_seen((record.request_id, record.item_id, record.event), record.expires)
        else:
            raise TypeError(f"not a log record: {record!r}")

    def is_seen(self, t: float, key: tuple[str, int, str]) -> bool:
        return self.seen.get(key, -math.inf) > t

    def served(self, t: float, request_id: str) -> Served | None:
        entry = self.requests.get(request_id)
        if entry is None or entry[3] <= t:
            return None
        return entry[0], entry[1], entry[2]

    def remember(self, request_id: str, entry: tuple[str, Path_, float, float]) -> None:
        self.requests[request_id] = entry
        self.requests.move_to_end(request_id)
        while len(self.requests) > self.config.max_requests:
            self.requests.popitem(last=False)
            self.requests_evicted += 1

    def mark_seen(self, key: tuple[str, int, str], expires: float) -> None:
        self.seen[key] = expires
        self.seen.move_to_end(key)
        while len(self.seen) > self.config.max_outcome_keys:
            old, _ = self.seen.popitem(last=False)
            # Forgetting a key while its request is still known would let a re-report count
            # twice; forget the request too, so later outcomes for it are unknown instead.
            self.requests.pop(old[0], None)
            self.keys_evicted += 1

    def expire(self, now: float) -> None:
        """Drop expired entries from the old end (insertion order is nearly expiry order)."""
        requests, seen = self.requests, self.seen
        while requests and next(iter(requests.values()))[3] <= now:
            requests.popitem(last=False)
        while seen and next(iter(seen.values())) <= now:
            seen.popitem(last=False)

    def cell(self, segment: str, path: Path_) -> Cell:
        cell = self.cells_.get((segment, path))
        if cell is None:
            cell = self.cells_[(segment, path)] = Cell()
        return cell

    def cells(self, now: float) -> Cells:
        return {key: cell.stats(now, self.config.half_life_s) for key, cell in self.cells_.items()}

    def image(self, now: float) -> LedgerImage:
        """A copy of the state, written as a snapshot after the tracker's lock is released."""
        # Plain copies (C speed) under the lock; the log encodes them after it is released.
        cells = [
            CellRecord(s, p, c.ts, tuple(c.lifetime), tuple(c.window)) for (s, p), c in self.cells_.items()
        ]
        return LedgerImage(now, cells, list(self.requests.items()), list(self.seen.items()))

    def health(self) -> dict[str, float]:
        return {
            "requests": float(len(self.requests)),
            "outcome_keys": float(len(self.seen)),
            "requests_evicted": float(self.requests_evicted),
            "outcome_keys_evicted": float(self.keys_evicted),
        }
