"""The decision log: what a server writes so that routing policies can be evaluated offline.

One JSON object per line, two kinds, joined on ``request_id`` by ``valuerank replay --log``::

    {"type": "decision", "v": 1, "request_id": "r1", "ts": 1732950000.1,
     "segment": "ecommerce_recommendation/2", "surface": "ecommerce_recommendation",
     "path": "full", "propensity": 0.975, "policy": "value_aware", "lam": 0.012,
     "estimated_uplift": 0.004, "compute_ms": 0.31, "latency_ms": 2.4}
    {"type": "outcome", "v": 1, "request_id": "r1", "item_id": 42, "event": "conversion",
     "revenue": 0.35}

``propensity`` is the probability with which the router chose the served ``path`` (1.0 when the
choice was deterministic): inverse-propensity estimates need it, and they can only evaluate a
policy on requests the logging policy could have served either way. Outcomes may come in any
order and more than once; readers count each ``(request_id, item_id, event)`` once. Unknown keys
are ignored by readers, so fields can be added without a version bump.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from serving.domain import PATHS, Decision, Outcome, Path_

VERSION = 1


@dataclass(frozen=True)
class DecisionRecord:
    request_id: str
    ts: float
    """Seconds (the server's wall clock) when the decision was made."""
    segment: str
    surface: str
    path: Path_
    propensity: float
    """P(router chose ``path``) for this request."""
    policy: str = ""
    lam: float = 0.0
    estimated_uplift: float = 0.0
    compute_ms: float = 0.0
    latency_ms: float = 0.0
    depth: int | None = None
    """Candidates the full model re-ranked (0: cheap); None: the path's default. With depth
    routing, ``propensity`` is the probability of this depth."""

    def __post_init__(self) -> None:
        if self.depth is not None and self.depth < 0:
            raise ValueError(f"{self.depth=} must be >= 0 or None")
        if self.path not in PATHS:
            raise ValueError(f"{self.path=} must be one of {PATHS}")
        if not 0.0 < self.propensity <= 1.0:
            raise ValueError(f"{self.propensity=} must be in (0, 1]")

    @property
    def p_full(self) -> float:
        """P(full) under the logging policy."""
        return self.propensity if self.path == "full" else 1.0 - self.propensity

    @classmethod
    def of(
        cls,
        request_id: str,
        ts: float,
        segment: str,
        surface: str,
        decision: Decision,
        compute_ms: float = 0.0,
        latency_ms: float = 0.0,
    ) -> DecisionRecord:
        return cls(
            request_id,
            ts,
            segment,
            surface,
            decision.path,
            decision.propensity,
            decision.policy,
            decision.lam,
            decision.estimated_uplift,
            compute_ms,
            latency_ms,
            decision.depth,
        )


def to_line(record: DecisionRecord | Outcome) -> str:
    if isinstance(record, DecisionRecord):
        body: dict[str, Any] = {"type": "decision", "v": VERSION, **asdict(record)}
    else:
        body = {
            "type": "outcome",
            "v": VERSION,
            "request_id": record.request_id,
            "item_id": record.item_id,
            "event": record.event,
            "revenue": record.revenue,
        }
    return json.dumps(body, separators=(",", ":"))


def from_line(line: str) -> DecisionRecord | Outcome:
    """Parse one line; raises ValueError naming what is wrong."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("a log line must be a JSON object")
    kind = raw.get("type")
    try:
        if kind == "decision":
            return DecisionRecord(
                request_id=str(raw["request_id"]),
                ts=float(raw["ts"]),
                segment=str(raw["segment"]),
                surface=str(raw["surface"]),
                path=raw["path"],
                propensity=float(raw["propensity"]),
                policy=str(raw.get("policy", "")),
                lam=float(raw.get("lam", 0.0)),
                estimated_uplift=float(raw.get("estimated_uplift", 0.0)),
                compute_ms=float(raw.get("compute_ms", 0.0)),
                latency_ms=float(raw.get("latency_ms", 0.0)),
                depth=None if raw.get("depth") is None else int(raw["depth"]),
            )
        if kind == "outcome":
            return Outcome(
                str(raw["request_id"]), int(raw["item_id"]), str(raw["event"]), float(raw.get("revenue", 0.0))
            )
    except KeyError as exc:
        raise ValueError(f"{kind} record is missing {exc}") from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"bad {kind} record: {exc}") from exc
    raise ValueError(f"unknown record type {kind!r}")


class DecisionLog:
    """Appends records to a JSONL file (line-buffered; an analytics log, not fsynced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, record: DecisionRecord | Outcome) -> None:
        line = to_line(record) + "\n"
        with self._lock:
            if self._file is None:
                raise ValueError(f"decision log {self.path} is closed")
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
