"""The in-process revenue tracker, the embedded default: ``serving.revenue.ledger``'s state machine,
made durable by ``serving.revenue.log``'s append-only file when one is configured."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from embeddings.clock import Clock, WallClock
from serving.domain import Outcome, OutcomeReport
from serving.errors import Unavailable
from serving.revenue.config import MemoryTrackerConfig
from serving.revenue.ledger import Cells, Ledger
from serving.revenue.log import InferenceRecord, OutcomeLog, OutcomeRecord
from serving.revenue.tracker import Inference, RevenueTracker, check_outcomes

log = logging.getLogger(__name__)


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
