"""Revenue tracking: inferences, compute and realised revenue per segment and path.

``RevenueTracker`` is the ABC the pipeline and the router see. Backends: ``InMemoryTracker``
here, the embedded default (state machine in ``serving.revenue.ledger``, durable through the
append-only file of ``serving.revenue.log``), and ``serving.revenue.redis.RedisTracker``, shared
by all replicas. ``serving.revenue.config.make_tracker`` builds either from its typed config.

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
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from embeddings.clock import Clock, WallClock
from serving.domain import EVENTS, Outcome, OutcomeReport, Path_
from serving.errors import InvalidArgument, Unavailable
from serving.revenue.config import MemoryTrackerConfig
from serving.revenue.ledger import COUNTERS, Cells, CellStats, Counters, Ledger, decay
from serving.revenue.log import InferenceRecord, OutcomeLog, OutcomeRecord

__all__ = [
    "COUNTERS",
    "CellStats",
    "Cells",
    "Counters",
    "InMemoryTracker",
    "Inference",
    "RevenueTracker",
    "check_outcomes",
    "decay",
]

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


class InMemoryTracker(RevenueTracker):
    """The in-process tracker. With ``outcome_log`` set, every inference and outcome is appended
    to that file and outcomes are fsynced before they are acknowledged; on start the file is
    replayed (a torn last line, left by a crash, is ignored) and compacted.

    Inference records are written without fsync: the fsync of the next outcome batch covers them,
    and as they precede it in the file, a request is always in the log before its outcomes are
    acknowledged. A crash loses at most the inferences recorded since then."""

    def __init__(self, config: MemoryTrackerConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or MemoryTrackerConfig()
        self.clock = clock or WallClock()
        self.ledger = Ledger(self.config)
        # Lock order: _io_lock (one log writer at a time) before _lock (state). record_inference
        # takes only _lock, so an fsync in progress never blocks the event loop.
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._pending: list[InferenceRecord] = []
        self._log: OutcomeLog | None = None
        self._log_broken = False
        self._closed = False
        self._io_errors = 0
        if self.config.outcome_log is not None:
            self._log = self._open_log(Path(self.config.outcome_log))

    def record_inference(self, inference: Inference) -> None:
        with self._lock:
            record = InferenceRecord(
                self.clock.now(),
                inference.request_id,
                inference.segment,
                inference.path,
                inference.compute_ms,
                inference.propensity,
            )
            self.ledger.infer(record)
            if self._log is None:
                return
            self._pending.append(record)
            due = len(self._pending) >= self.config.write_every
        if due:
            self._write_pending(self._log)

    def record_outcomes(self, outcomes: list[Outcome]) -> OutcomeReport:
        check_outcomes(outcomes)
        with self._io_lock:
            if self._closed:
                raise Unavailable("revenue tracker is closed")
            with self._lock:
                now = self.clock.now()
                self.ledger.expire(now)
                new, duplicates = self.ledger.classify(now, outcomes)
                if self._log is None:
                    return OutcomeReport(len(new), duplicates, self.ledger.apply(new))
                pending, self._pending = self._pending, []
            if self._log_broken:
                self._rewrite(self._log)
            else:
                self._append(self._log, pending)
            self._append(self._log, new)
            self._sync(self._log)
            with self._lock:
                unknown = self.ledger.apply(new)
            if self._log.needs_compaction(self.config.compact_bytes):
                try:
                    self._rewrite(self._log)
                except Unavailable:
                    log.exception("compacting %s failed; retried after the next batch", self._log.path)
        return OutcomeReport(len(new), duplicates, unknown)

    def cells(self) -> Cells:
        with self._lock:
            return self.ledger.cells(self.clock.now())

    def flush(self) -> None:
        if self._log is None:
            return
        with self._io_lock:
            if self._closed:
                return
            with self._lock:
                pending, self._pending = self._pending, []
            if self._log_broken:
                self._rewrite(self._log)
                return
            self._append(self._log, pending)
            self._sync(self._log)

    def health(self) -> dict[str, float]:
        with self._lock:
            out = self.ledger.health()
            out["pending_inferences"] = float(len(self._pending))
        out["log_io_errors"] = float(self._io_errors)
        out["log_bytes"] = float(self._log.size if self._log is not None else 0)
        return out

    def close(self) -> None:
        if self._log is None:
            return
        try:
            self.flush()
        except Unavailable:
            log.exception("outcome log %s: inferences since the last fsync lost at close", self._log.path)
        with self._io_lock:
            self._closed = True
            self._log.close()

    # -- log upkeep: callers hold _io_lock, except _write_pending which takes it if free ----------

    def _open_log(self, path: Path) -> OutcomeLog:
        """Replay the log into the ledger, then compact it (which also drops a torn tail)."""
        log_ = OutcomeLog(path)
        try:
            replayed = 0
            for record in log_.replay():
                self.ledger.apply_record(record)
                replayed += 1
            self.ledger.expire(self.clock.now())
            self._rewrite(log_)
        except BaseException:
            log_.close()
            raise
        log.info("outcome log %s: replayed %s records", path, replayed)
        return log_

    def _append(self, log_: OutcomeLog, records: list[InferenceRecord] | list[OutcomeRecord]) -> None:
        try:
            log_.append(records)
        except OSError as exc:
            raise self._failed(log_, exc) from exc

    def _sync(self, log_: OutcomeLog) -> None:
        try:
            log_.sync()
        except OSError as exc:
            raise self._failed(log_, exc) from exc

    def _failed(self, log_: OutcomeLog, exc: OSError) -> Unavailable:
        # What reached the disk is unknown (a failed fsync may drop dirty pages, PostgreSQL's
        # "fsyncgate"), so the next writer rebuilds the whole file from memory first.
        self._log_broken = True
        self._io_errors += 1
        log.error("outcome log %s: %s; nothing acknowledged", log_.path, exc)
        return Unavailable(f"outcome log {log_.path}: {exc}")

    def _write_pending(self, log_: OutcomeLog) -> None:
        """Write buffered inference records, without fsync. Runs on the event loop: it never waits
        for a writer (the one holding the lock drains the buffer itself) and never raises."""
        if not self._io_lock.acquire(blocking=False):
            return
        try:
            with self._lock:
                pending, self._pending = self._pending, []
            if not (self._log_broken or self._closed):  # else the rewrite from memory carries them
                self._append(log_, pending)
        except Unavailable:
            pass  # counted and logged; the next outcome batch rewrites the log
        finally:
            self._io_lock.release()

    def _rewrite(self, log_: OutcomeLog) -> None:
        """Replace the log by a snapshot of memory: compaction, and recovery after an I/O error."""
        with self._lock:
            image = self.ledger.image(self.clock.now())
            self._pending = []  # already in the image
        try:
            log_.rewrite(image)
        except OSError as exc:
            raise self._failed(log_, exc) from exc
        self._log_broken = False
