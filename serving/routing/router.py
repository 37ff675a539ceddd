"""Routing policies: which scoring path serves a request.

``Router`` is the ABC the pipeline sees. Policies get the request's segment, remaining deadline
and (optionally) its resolved features and retrieved candidates, and return a ``Decision`` that
says which path and why. They may learn from four feedback hooks, all called by the pipeline:

* ``observe(segment, path, compute_ms, latency_ms)`` after every served request;
* ``observe_scored(ctx, full_scores)`` after the full path scored a request: the full model's
  scores of all its candidates, from which a policy can value both paths' slates;
* ``observe_outcomes(outcomes)`` with every batch of outcomes the revenue tracker accepted; a
  policy maps them to the requests it decided itself (and ignores repeats), or
  ``observe_outcome(segment, path, revenue, propensity)`` when the caller already knows the cell
  and propensity of the request (offline replay).

The concrete policies beyond ``FixedRouter`` live in ``serving.routing.policies`` (``make_router``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.domain import Candidates, Decision, Outcome, Path_, RequestFeatures


@dataclass(frozen=True)
class RouteContext:
    request_id: str
    surface: str
    segment: str
    deadline_left_s: float | None
    """Seconds until the caller's deadline, or None without one."""
    request: RequestFeatures | None = None
    """The resolved request-side inputs (value-aware routing reads its features)."""
    candidates: Candidates | None = None
    """The retrieved candidates; their retrieval scores give the cheap path's slate for free."""
    k: int = 10
    """Items the caller will show (the slate whose value routing estimates)."""
    queue_delay_s: float = 0.0
    """Predicted wait of the full path now (``MicroBatcher.expected_wait_s``): load to route by."""


class Router(ABC):
    name: str = "router"

    @abstractmethod
    def decide(self, ctx: RouteContext) -> Decision:
        """Choose the path for one request."""

    def observe(  # noqa: B027
        self, segment: str, path: Path_, compute_ms: float, latency_ms: float, depth: int | None = None
    ) -> None:
        """Feedback after a request was served (``depth``: the decision's; default: ignore)."""

    def observe_scored(self, ctx: RouteContext, full_scores: np.ndarray) -> None:  # noqa: B027
        """The full model's scores of ``ctx.candidates`` (default: ignore)."""

    def observe_outcome(self, segment: str, path: Path_, revenue: float, propensity: float) -> None:  # noqa: B027
        """Revenue realised by a request the router served with ``path`` (default: ignore)."""

    def observe_outcomes(self, outcomes: list[Outcome]) -> None:  # noqa: B027
        """Outcomes reported for requests (default: ignore)."""

    def fit_budget(self, decision: Decision, service_budget_s: float) -> Decision | None:
        """Admission's ladder: ``decision`` itself when its service fits ``service_budget_s``
        (what the deadline leaves after the full path's queue), else a cheaper full-path decision
        that fits, else None (the pipeline then serves cheap). Default (a two-path router): the
        decision while the queue alone fits, else None."""
        return decision if service_budget_s >= 0.0 else None

    def share_state(self) -> None:  # noqa: B027
        """Exchange what was learnt with the other replicas (called off the event loop every few
        seconds; default: nothing shared)."""

    def close(self) -> None:  # noqa: B027
        """Release what the router holds (default: nothing)."""

    def stats(self) -> dict[str, Any]:
        return {"policy": self.name}


class FixedRouter(Router):
    """Always the same path, except that a request whose deadline is nearly spent goes cheap."""

    def __init__(self, path: Path_, min_full_budget_s: float = 0.005) -> None:
        self.path = path
        self.name = f"always_{path}"
        self.min_full_budget_s = min_full_budget_s

    def decide(self, ctx: RouteContext) -> Decision:
        if (
            self.path == "full"
            and ctx.deadline_left_s is not None
            and ctx.deadline_left_s < self.min_full_budget_s
        ):
            return Decision("cheap", self.name, "deadline nearly spent")
        return Decision(self.path, self.name, "fixed policy")
