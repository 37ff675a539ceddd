"""The one sequence by which a served request teaches the router and the revenue tracker.

The pipeline and offline replay (``loadtest.policy_sim``) both call it, so what replay measures
is what the server would learn: after a request is served, the tracker records the inference
(cell, measured compute, propensity), the router observes its cost and latency and, when the
full path ran, the full model's scores of every candidate; once outcomes are durable, the router
learns each (request, item, event) once.
"""

from __future__ import annotations

import numpy as np

from serving.domain import Decision, Outcome
from serving.revenue.tracker import Inference, RevenueTracker
from serving.routing.router import RouteContext, Router


class RoutingFeedback:
    def __init__(self, router: Router, tracker: RevenueTracker | None = None) -> None:
        """``tracker``: None in replay, which prices outcomes from the world's ground truth."""
        self.router = router
        self.tracker = tracker

    def served(
        self,
        ctx: RouteContext,
        decision: Decision,
        compute_ms: float,
        latency_ms: float,
        full_scores: np.ndarray | None = None,
    ) -> None:
        """A request was answered by ``decision.path``; ``full_scores`` when the full path ran."""
        if self.tracker is not None:
            self.tracker.record_inference(
                Inference(ctx.request_id, ctx.segment, decision.path, compute_ms, decision.propensity)
            )
        if decision.path == "fallback":
            return  # admission chose it, not the router: nothing for the router to learn
        self.router.observe(ctx.segment, decision.path, compute_ms, latency_ms, decision.depth)
        if decision.path == "full" and full_scores is not None:
            # Full scores of all candidates let the router value the cheap slate too, for free.
            self.router.observe_scored(ctx, full_scores)

    def outcomes(self, outcomes: list[Outcome]) -> None:
        """Outcomes already made durable (or, in replay, drawn from the ground truth)."""
        self.router.observe_outcomes(outcomes)
