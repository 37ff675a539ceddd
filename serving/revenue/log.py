"""The in-process revenue tracker's append-only log: JSON lines, fsynced before an outcome is
acknowledged, replayed on start.

A log starts with a snapshot (written whole to a temporary file, fsynced and renamed over the
old one, so a crash leaves either the old or the new file) and continues with records::

    {"k":"header","format":"valuerank-revenue-log","version":1,"t":1700000000.0}
    {"k":"cell","s":"ecommerce_recommendation/2","p":"full","ts":..,"life":[6 floats],"win":[6 floats]}
    {"k":"req","r":"req-17","s":"ecommerce_recommendation/2","p":"full","q":0.9,"x":<expires>}
    {"k":"seen","r":"req-3","i":42,"e":"click","x":<expires>}
    {"k":"i","t":..,"r":"req-18","s":"video_effects/0","p":"cheap","c":0.21,"q":1.0}   an inference
    {"k":"o","t":..,"r":"req-17","i":7,"e":"click","v":0.35,"a":["ecommerce_recommendation/2","full",0.9]}

An outcome record carries its attribution (``a``: segment, path, propensity; null for an
unknown request), so replay does not depend on request expiry. A last line without its newline,
or one that does not parse, is what a crash mid-write leaves: it is ignored. Floats are written
with ``repr``, so replay reproduces them bit for bit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from serving.domain import PATHS, Path_

log = logging.getLogger(__name__)

FORMAT = "valuerank-revenue-log"
VERSION = 1

Served = tuple[str, Path_, float]
"""segment, path and propensity of the request an outcome is attributed to."""


@dataclass(frozen=True, slots=True)
class InferenceRecord:
    t: float
    request_id: str
    segment: str
    path: Path_
    compute_ms: float
    propensity: float


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    t: float
    request_id: str
    item_id: int
    event: str
    revenue: float
    served: Served | None
    """None: the request was unknown (never seen, or expired)."""


@dataclass(frozen=True, slots=True)
class CellRecord:
    segment: str
    path: Path_
    ts: float | None
    lifetime: tuple[float, ...]
    window: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request_id: str
    segment: str
    path: Path_
    propensity: float
    expires: float


@dataclass(frozen=True, slots=True)
class SeenRecord:
    request_id: str
    item_id: int
    event: str
    expires: float


Record = InferenceRecord | OutcomeRecord | CellRecord | RequestRecord | SeenRecord


@dataclass(frozen=True)
class LedgerImage:
    """The tracker's state at ``now``, as plain copies taken under its lock."""

    now: float
    cells: list[CellRecord]
    requests: list[tuple[str, tuple[str, Path_, float, float]]]
    """request_id -> (segment, path, propensity, expires_at)."""
    seen: list[tuple[tuple[str, int, str], float]]
    """outcome key -> expires_at."""


class OutcomeLog:
    """One process's log file, locked against a second writer (``<path>.lock``, flock).

    Not thread-safe: the tracker serialises writers. ``rewrite`` must be called once before the
    first ``append`` (the tracker does so right after replay)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise RuntimeError(f"outcome log {path} is in use by another process") from exc
        self._fd: int | None = None
        self.size = 0
        self._snapshot_size = 0

    def replay(self) -> Iterator[Record]:
        """The records of the file in order; a torn tail is skipped (and logged)."""
        if not self.path.exists():
            return
        bad: list[int] = []
        with self.path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("no newline")
                    fields = json.loads(line)
                    if lineno == 1:
                        _check_header(fields)
                        continue
                    record = decode(fields)
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    if lineno == 1:
                        raise ValueError(f"{self.path} is not a {FORMAT} v{VERSION} file: {exc}") from exc
                    bad.append(lineno)
                    continue
                if bad:
                    # Good records after bad ones: not a torn tail but damage. Keep going (the
                    # counters matter less than serving), but loudly.
                    log.error("%s: skipped unreadable lines %s", self.path, bad)
                    bad = []
                yield record
        if bad:
            log.warning("%s: ignored a torn tail (lines %s..%s)", self.path, bad[0], bad[-1])

    def append(self, records: Sequence[InferenceRecord] | Sequence[OutcomeRecord]) -> None:
        if not records:
            return
        data = "".join(encode(r) for r in records).encode()
        self._write_all(data)

    def sync(self) -> None:
        os.fsync(self._require_fd())

    def needs_compaction(self, threshold_bytes: int) -> bool:
        """Past the threshold and at least twice the last snapshot (Redis's AOF-rewrite rule), so
        a large live state does not make every batch rewrite the file."""
        return self.size > max(threshold_bytes, 2 * self._snapshot_size)

    def rewrite(self, image: LedgerImage) -> None:
        """Replace the file by a snapshot of ``image``: temp file, fsync, rename, fsync the dir."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb", buffering=1 << 20) as f:
            f.write(_line({"k": "header", "format": FORMAT, "version": VERSION, "t": image.now}).encode())
            for cell in image.cells:
                f.write(encode(cell).encode())
            for rid, (segment, path, propensity, expires) in image.requests:
                f.write(encode(RequestRecord(rid, segment, path, propensity, expires)).encode())
            for (rid, item, event), expires in image.seen:
                f.write(encode(SeenRecord(rid, item, event, expires)).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = self._snapshot_size = os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _write_all(self, data: bytes) -> None:
        fd = self._require_fd()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
            self.size += n

    def _require_fd(self) -> int:
        if self._fd is None:
            raise OSError(f"outcome log {self.path} is not open")
        return self._fd


def encode(record: Record) -> str:
    """One JSON line."""
    if isinstance(record, InferenceRecord):
        fields: dict[str, Any] = {
            "k": "i",
            "t": record.t,
            "r": record.request_id,
            "s": record.segment,
            "p": record.path,
            "c": record.compute_ms,
            "q": record.propensity,
        }
    elif isinstance(record, OutcomeRecord):
        fields = {
            "k": "o",
            "t": record.t,
            "r": record.request_id,
            "i": record.item_id,
            "e": record.event,
            "v": record.revenue,
            "a": None if record.served is None else list(record.served),
        }
    elif isinstance(record, CellRecord):
        fields = {
            "k": "cell",
            "s": record.segment,
            "p": record.path,
            "ts": record.ts,
            "life": list(record.lifetime),
            "win": list(record.window),
        }
    elif isinstance(record, RequestRecord):
        fields = {
            "k": "req",
            "r": record.request_id,
            "s": record.segment,
            "p": record.path,
            "q": record.propensity,
            "x": record.expires,
        }
    else:
        fields = {
            "k": "seen",
            "r": record.request_id,
            "i": record.item_id,
            "e": record.event,
            "x": record.expires,
        }
    return _line(fields)


def decode(fields: dict[str, Any]) -> Record:
    """The record of one parsed line; KeyError, TypeError or ValueError if it is not one."""
    kind = fields["k"]
    if kind == "i":
        return InferenceRecord(
            float(fields["t"]),
            str(fields["r"]),
            str(fields["s"]),
            _path(fields["p"]),
            float(fields["c"]),
            float(fields["q"]),
        )
    if kind == "o":
        a = fields["a"]
        served = None if a is None else (str(a[0]), _path(a[1]), float(a[2]))
        return OutcomeRecord(
            float(fields["t"]),
            str(fields["r"]),
            int(fields["i"]),
            str(fields["e"]),
            float(fields["v"]),
            served,
        )
    if kind == "cell":
        ts = fields["ts"]
        return CellRecord(
            str(fields["s"]),
            _path(fields["p"]),
            None if ts is None else float(ts),
            tuple(float(v) for v in fields["life"]),
            tuple(float(v) for v in fields["win"]),
        )
    if kind == "req":
        return RequestRecord(
            str(fields["r"]), str(fields["s"]), _path(fields["p"]), float(fields["q"]), float(fields["x"])
        )
    if kind == "seen":
        return SeenRecord(str(fields["r"]), int(fields["i"]), str(fields["e"]), float(fields["x"]))
    raise ValueError(f"unknown record kind {kind!r}")


def _line(fields: dict[str, Any]) -> str:
    # allow_nan=False: a NaN would be written as bare NaN, which strict readers reject.
    return json.dumps(fields, separators=(",", ":"), allow_nan=False) + "\n"


def _path(value: Any) -> Path_:
    if value not in PATHS:
        raise ValueError(f"unknown path {value!r}")
    return cast(Path_, value)


def _check_header(fields: Any) -> None:
    if not isinstance(fields, dict) or fields.get("k") != "header" or fields.get("format") != FORMAT:
        raise ValueError("missing header")
    if fields.get("version") != VERSION:
        raise ValueError(f"version {fields.get('version')!r}, expected {VERSION}")
