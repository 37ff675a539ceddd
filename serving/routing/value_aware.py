"""Value-aware routing (after DCAF, Alibaba 2020): request i goes to the full path iff

    uplift_i - lambda * (q_full - q_cheap) > 0

``uplift_i = Q_full,i - Q_cheap,i`` in dollars is the value model's prediction for this request
(``serving.routing.uplift``: a ridge model of the full model's own per-request slate-value uplift, on
routing-time features) times its surface's dollars per model unit, learnt from realised revenue
of full-path requests (``observe_outcome``). ``q_j`` is the measured CPU cost of path j (decayed
means of ``observe``). ``lambda`` comes from ``serving.routing.controller`` and holds the compute budget
and the p99 target. Around that rule, in this order:

1. deadline: a request with less than ``min_full_deadline_ms`` left (or less than the full path
   recently took) goes cheap, deterministically;
2. guardrail: when a segment's recent cheap share reaches ``max_cheap_share``, a request the rule
   sends cheap gets the full path, so every segment keeps producing uplift labels;
3. exploration: with probability ``epsilon`` a fair coin picks the path. The logged propensity
   is the probability of the served path under this randomisation, which makes the per-segment
   inverse-propensity uplift estimate in ``stats()`` unbiased.

The router composes parts with one job each (``serving.routing.value_parts``): path costs,
dollar scale, exploration, lambda, outcome attribution and segment statistics; the value model
and its features are ``serving.routing.uplift``'s.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from dlrm.schema import FeatureSchema
from embeddings.clock import Clock, MonotonicClock
from serving.domain import Decision, Outcome, Path_
from serving.routing.config import ValueAwareConfig
from serving.routing.controller import LambdaController
from serving.routing.router import RouteContext, Router
from serving.routing.uplift import OnlineRidge, RouteFeaturizer, slate_values
from serving.routing.value_parts import (
    DollarScale,
    Exploration,
    LambdaSetter,
    OutcomeAttribution,
    PathCosts,
    SegmentStats,
)


class ValueAwareRouter(Router):
    """See the module docstring."""

    name = "value_aware_binary"

    def __init__(
        self,
        config: ValueAwareConfig,
        schema: FeatureSchema,
        item_values: np.ndarray | None = None,
        clock: Clock | None = None,
        rng_seed: int = 0,
    ) -> None:
        self.config = config
        self.clock = clock or MonotonicClock()
        self.item_values = None if item_values is None else np.asarray(item_values, dtype=np.float64)
        self.featurizer = RouteFeaturizer(schema, config.featurizer, self.item_values)
        self.model = OnlineRidge(self.featurizer.dim, config.l2, config.label_half_life, config.refit_every)
        self.controller = LambdaController(config.controller, self.clock)
        self.costs = PathCosts(config.cost_half_life)
        self.scale = DollarScale(config.stats_half_life_s, config.scale_prior)
        self.exploration = Exploration(config.epsilon, rng_seed)
        self.lam = LambdaSetter(self.controller, config.value_window)
        self.attribution = OutcomeAttribution(config.outcome_memory)
        self.segments = SegmentStats(config.stats_half_life_s, config.guardrail_half_life)
        self._lock = threading.Lock()
        # Features and propensity of full-path requests, until their full scores give a label.
        self._pending: OrderedDict[str, tuple[np.ndarray, np.ndarray, float]] = OrderedDict()
        self._pending_max = 8192

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, ctx: RouteContext) -> Decision:
        with self._lock:
            lam = self._lambda()
            now = self.clock.now()
            seg = self.segments.of(ctx.segment)
            if self.costs.too_short(ctx.deadline_left_s, self.config.min_full_deadline_ms):
                seg.add(now, requests=1.0)
                return Decision("cheap", self.name, "deadline nearly spent", lam, 0.0, 1.0)
            feats = (
                None if ctx.request is None else self.featurizer.transform(ctx.request, ctx.candidates, ctx.k)
            )
            uplift = self._predict(ctx.surface, feats)
            extra_ms = self.costs.extra_ms
            if feats is not None:
                self.lam.remember(ctx.surface, feats, uplift / extra_ms, self.model.fits)
            share = self.segments.cheap_share.get(ctx.segment, 0.0)
            path: Path_
            if self.model.labels < self.config.cold_start_labels:
                path, p_full, reason = self.exploration.cold_start(self._target_full_share())
                explored = True
            else:
                # Queueing delay makes a full-path millisecond dearer: the lowest uplifts go first.
                pressure = 1.0 + ctx.queue_delay_s * 1000.0 / self.config.pressure_ms
                rule_full = uplift - lam * pressure * extra_ms > 0.0
                reason = f"uplift ${uplift:.5f} {'>' if rule_full else '<='} lambda x {extra_ms:.3f} ms extra"
                if pressure > 1.05:
                    reason += (
                        f" (lambda x {pressure:.2f}: full path wait {ctx.queue_delay_s * 1000.0:.1f} ms)"
                    )
                if not rule_full and share >= self.config.max_cheap_share:
                    rule_full = True
                    reason = f"guardrail: cheap share {share:.2f} of {ctx.segment} at its cap"
                path, p_full, explored, reason = self.exploration.around(rule_full, reason)
            propensity = p_full if path == "full" else 1.0 - p_full
            self.segments.routed(ctx.segment, path)
            if feats is not None and path == "full":
                self._pending[ctx.request_id] = (feats[0], feats[1], p_full)
                if len(self._pending) > self._pending_max:
                    self._pending.popitem(last=False)
            self.attribution.remember(ctx.request_id, ctx.segment, path, propensity)
            seg.add(
                now,
                requests=1.0,
                full=float(path == "full"),
                explored=float(explored),
                predicted_uplift=uplift,
            )
            return Decision(path, self.name, reason, lam, uplift, propensity)

    def _predict(self, surface: str, feats: tuple[np.ndarray, np.ndarray] | None) -> float:
        """Estimated uplift in dollars (0 until the value model has fitted once)."""
        if feats is None or self.model.fits == 0:
            return 0.0
        return self.scale.of(surface) * self.model.predict(*feats)

    def _target_full_share(self) -> float:
        return self.costs.full_share_for(self.config.controller.budget_share)

    def _lambda(self) -> float:
        def value_per_ms(surface: str, idx: np.ndarray, val: np.ndarray) -> float:
            return self.scale.of(surface) * self.model.predict(idx, val) / self.costs.extra_ms

        return self.lam.next(
            self._target_full_share() if self.config.feed_forward else None,
            hold=self.model.labels < self.config.cold_start_labels,
            fit=self.model.fits,
            value_per_ms=value_per_ms,
        )

    # -- feedback -----------------------------------------------------------------------------

    def observe(
        self, segment: str, path: Path_, compute_ms: float, latency_ms: float, depth: int | None = None
    ) -> None:
        with self._lock:
            self.costs.record(path, compute_ms, latency_ms)
            self.controller.record(compute_ms, self.costs.ms["full"], latency_ms)

    def observe_scored(self, ctx: RouteContext, full_scores: np.ndarray) -> None:
        if ctx.request is None or ctx.candidates is None or len(full_scores) == 0:
            return
        ids = ctx.candidates.item_ids
        values = None if self.item_values is None else self.item_values[ids]
        v_full, v_cheap = slate_values(full_scores, ctx.candidates.retrieval_scores, values, ctx.k)
        with self._lock:
            pending = self._pending.pop(ctx.request_id, None)
        if pending is None:  # not decided here (forced path) or forgotten: deterministic
            idx, val = self.featurizer.transform(ctx.request, ctx.candidates, ctx.k)
            p_full = 1.0
        else:
            idx, val, p_full = pending
        with self._lock:
            now = self.clock.now()
            self.model.add(idx, val, v_full - v_cheap, self._label_weight(ctx.surface, p_full))
            self.scale.scored(now, ctx.surface, v_full)
            self.segments.of(ctx.segment).add(now, model_uplift=v_full - v_cheap, scored=1.0)

    def _label_weight(self, surface: str, p_full: float) -> float:
        """The surface's relative dollar scale squared, over the propensity of the full path
        (labels exist only where the full path ran; weighting by ``1 / p_full`` fits the model to
        all traffic)."""
        weight = self.scale.relative_weight(surface)
        return weight / p_full if self.config.importance_weighting else weight

    def observe_outcomes(self, outcomes: list[Outcome]) -> None:
        """Outcomes of requests decided here (others, and repeats, are ignored)."""
        with self._lock:
            known = self.attribution.new_revenue(outcomes)
        for segment, path, propensity, revenue in known:
            self.observe_outcome(segment, path, revenue, propensity)

    def observe_outcome(self, segment: str, path: Path_, revenue: float, propensity: float) -> None:
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"{propensity=} must be in (0, 1]")
        with self._lock:
            now = self.clock.now()
            self.segments.of(segment).add(
                now, **{f"revenue_{path}": revenue, f"ipw_revenue_{path}": revenue / propensity}
            )
            if path == "full":
                self.scale.earned(now, segment.split("/", 1)[0], revenue)

    # -- stats --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "policy": self.name,
                "budget_share": self.config.controller.budget_share,
                "lambda": self.lam.value or 0.0,
                "full_share_target": self.controller.share,
                "controller": self.controller.stats(),
                "budget_use": self.controller.last.get("budget_use", math.nan),
                "cost_ms": dict(self.costs.ms),
                "value_model": {"labels": self.model.labels, "fits": self.model.fits},
                "segments": self.segments.report(self.clock.now(), self.scale.of),
            }
