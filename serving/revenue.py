"""Revenue tracking: inferences, compute and realised revenue per segment and path.

``RevenueTracker`` is the ABC; ``InMemoryTracker`` the embedded default. Outcomes are
idempotent on ``(request_id, item_id, event)``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from serving.domain import Outcome, OutcomeReport, Path_


@dataclass(frozen=True)
class Inference:
    request_id: str
    segment: str
    path: Path_
    compute_ms: float
    propensity: float = 1.0


class RevenueTracker(ABC):
    @abstractmethod
    def record_inference(self, inference: Inference) -> None:
        """Remember which segment and path served a request, and what it cost."""

    @abstractmethod
    def record_outcomes(self, outcomes: list[Outcome]) -> OutcomeReport:
        """Record outcomes durably (before returning); duplicates are counted, not applied."""

    @abstractmethod
    def snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        """``segment -> path -> {inferences, compute_ms, revenue}``."""

    def close(self) -> None:  # noqa: B027
        """Release resources (files, connections)."""


class InMemoryTracker(RevenueTracker):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, tuple[str, Path_]] = {}
        self._seen: set[tuple[str, int, str]] = set()
        self._stats: dict[str, dict[str, dict[str, float]]] = defaultdict(
            lambda: defaultdict(lambda: {"inferences": 0.0, "compute_ms": 0.0, "revenue": 0.0})
        )

    def record_inference(self, inference: Inference) -> None:
        with self._lock:
            self._requests[inference.request_id] = (inference.segment, inference.path)
            cell = self._stats[inference.segment][inference.path]
            cell["inferences"] += 1
            cell["compute_ms"] += inference.compute_ms

    def record_outcomes(self, outcomes: list[Outcome]) -> OutcomeReport:
        accepted = duplicates = unknown = 0
        with self._lock:
            for outcome in outcomes:
                if outcome.key in self._seen:
                    duplicates += 1
                    continue
                self._seen.add(outcome.key)
                accepted += 1
                served = self._requests.get(outcome.request_id)
                if served is None:
                    unknown += 1
                    continue
                self._stats[served[0]][served[1]]["revenue"] += outcome.revenue
        return OutcomeReport(accepted, duplicates, unknown)

    def snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        with self._lock:
            return {seg: {p: dict(c) for p, c in paths.items()} for seg, paths in self._stats.items()}

    def stats(self) -> dict[str, Any]:
        return {"segments": self.snapshot()}
