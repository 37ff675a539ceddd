"""Routing policies: which scoring path serves a request.

``Router`` is the ABC the pipeline sees. Policies get the request's segment and remaining
deadline and return a ``Decision`` that says which path and why; they may learn from the
feedback hooks (latency and compute observed per request).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from serving.domain import Decision, Path_


@dataclass(frozen=True)
class RouteContext:
    request_id: str
    surface: str
    segment: str
    deadline_left_s: float | None
    """Seconds until the caller's deadline, or None without one."""


class Router(ABC):
    name: str = "router"

    @abstractmethod
    def decide(self, ctx: RouteContext) -> Decision:
        """Choose the path for one request."""

    def observe(self, segment: str, path: Path_, compute_ms: float, latency_ms: float) -> None:  # noqa: B027
        """Feedback after a request was served (default: ignore)."""

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
