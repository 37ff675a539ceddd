"""Routing policies beyond a fixed path: a static per-surface table and value-aware routing.

``make_router(config, clock)`` builds the policy a ``serving.routing.config.RouterConfig`` names.

Value-aware routing (after DCAF, Alibaba 2020): request i goes to the full path iff

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
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from dlrm.schema import FeatureSchema
from embeddings.clock import Clock, MonotonicClock
from serving.decay import DecayingSums
from serving.domain import Decision, Outcome, Path_
from serving.routing.config import RouterConfig, StaticTiersConfig, ValueAwareConfig
from serving.routing.controller import LambdaController
from serving.routing.router import FixedRouter, RouteContext, Router
from serving.routing.uplift import OnlineRidge, RouteFeaturizer, slate_values


def make_router(
    config: RouterConfig,
    clock: Clock | None = None,
    *,
    schema: FeatureSchema | None = None,
    item_values: np.ndarray | None = None,
) -> Router:
    """Build ``config.policy``; ``value_aware`` needs the feature ``schema`` (and item values, e.g.
    prices; without them every item is worth 1 and the value model ranks by clicks)."""
    if config.policy == "always_full":
        return FixedRouter("full")
    if config.policy == "always_cheap":
        return FixedRouter("cheap")
    if config.policy == "static_tiers":
        return StaticTiersRouter(config.static_tiers)
    if schema is None:
        raise ValueError("value_aware routing needs the feature schema")
    return ValueAwareRouter(config.value_aware, schema, item_values, clock, config.seed)


class StaticTiersRouter(Router):
    """A fixed per-surface table: the surfaces listed get the full path."""

    name = "static_tiers"

    def __init__(self, config: StaticTiersConfig) -> None:
        self.config = config
        self._full = frozenset(config.full_surfaces)

    def decide(self, ctx: RouteContext) -> Decision:
        left = ctx.deadline_left_s
        if left is not None and left * 1000.0 < self.config.min_full_deadline_ms:
            return Decision("cheap", self.name, "deadline nearly spent")
        if ctx.surface in self._full:
            return Decision("full", self.name, f"surface {ctx.surface} is in the full tier")
        return Decision("cheap", self.name, f"surface {ctx.surface} is in the cheap tier")

    def stats(self) -> dict[str, Any]:
        return {"policy": self.name, "full_surfaces": sorted(self._full)}


class ValueAwareRouter(Router):
    """See the module docstring."""

    name = "value_aware"

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
        self._rng = np.random.default_rng(rng_seed)
        self._lock = threading.Lock()
        # Measured cost per path: a decaying mean, sum(w x) / sum(w), rather than an EMA started at
        # the first sample: a process's first calls are slow (lazy initialisation, cold caches;
        # 25x the steady cost of the cheap path measured in replay), and an EMA with a
        # half-life of hundreds of requests would carry that outlier for as long, skewing the
        # budget's feed-forward share.
        self._cost = {"full": 1.0, "cheap": 0.1}
        self._cost_sums = {"full": [0.0, 0.0], "cheap": [0.0, 0.0]}
        self._cost_keep = 0.5 ** (1.0 / config.cost_half_life)
        self._guard_alpha = 1.0 - 0.5 ** (1.0 / config.guardrail_half_life)
        self._cheap_share: dict[str, float] = {}
        self._segments: dict[str, DecayingSums] = {}
        self._surfaces: dict[str, DecayingSums] = {}
        self._global = DecayingSums(config.stats_half_life_s)
        self._full_latency: deque[float] = deque(maxlen=256)
        # Recent requests: [surface, feature idx, values, value per ms, model fit it is from].
        self._recent: deque[list[Any]] = deque(maxlen=config.value_window)
        self._lam: float | None = None
        self._since_lambda = 0
        self._pending: OrderedDict[str, tuple[np.ndarray, np.ndarray, float]] = OrderedDict()
        self._pending_max = 8192
        # Requests decided here, for outcomes reported later, and outcome keys already applied.
        self._served: OrderedDict[str, tuple[str, Path_, float]] = OrderedDict()
        self._seen: OrderedDict[tuple[str, int, str], None] = OrderedDict()
        self._memory = config.outcome_memory

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, ctx: RouteContext) -> Decision:
        with self._lock:
            lam = self._lambda()
            now = self.clock.now()
            seg = self._segment(ctx.segment)
            if self._deadline_too_short(ctx.deadline_left_s):
                seg.add(now, requests=1.0)
                return Decision("cheap", self.name, "deadline nearly spent", lam, 0.0, 1.0)
            feats = self._features(ctx)
            uplift = self._predict(ctx.surface, feats)
            extra_ms = max(self._cost["full"] - self._cost["cheap"], 1e-6)
            if feats is not None:
                self._recent.append([ctx.surface, feats[0], feats[1], uplift / extra_ms, self.model.fits])
            share = self._cheap_share.get(ctx.segment, 0.0)
            eps = self.config.epsilon
            explored = False
            if self.model.labels < self.config.cold_start_labels:
                # Nothing learnt yet: a coin weighted by the budget's full share, so labels come
                # from everywhere and the budget is used while the value model warms up.
                p_full = min(max(self._target_full_share(), eps / 2.0), 1.0 - eps / 2.0)
                path: Path_ = "full" if self._rng.random() < p_full else "cheap"
                reason = f"cold start: full with probability {p_full:.2f}"
                explored = True
            else:
                rule_full = uplift - lam * extra_ms > 0.0
                reason = f"uplift ${uplift:.5f} {'>' if rule_full else '<='} lambda x {extra_ms:.3f} ms extra"
                if not rule_full and share >= self.config.max_cheap_share:
                    rule_full = True
                    reason = f"guardrail: cheap share {share:.2f} of {ctx.segment} at its cap"
                path = "full" if rule_full else "cheap"
                explored = bool(eps > 0 and self._rng.random() < eps)
                if explored:
                    path = "full" if self._rng.random() < 0.5 else "cheap"
                    reason = f"exploration (epsilon {eps})"
                p_full = (1.0 - eps) * float(rule_full) + eps / 2.0
            propensity = p_full if path == "full" else 1.0 - p_full
            self._cheap_share[ctx.segment] = share + self._guard_alpha * (float(path == "cheap") - share)
            if feats is not None and path == "full":
                self._pending[ctx.request_id] = (feats[0], feats[1], p_full)
                if len(self._pending) > self._pending_max:
                    self._pending.popitem(last=False)
            self._served[ctx.request_id] = (ctx.segment, path, propensity)
            if len(self._served) > self._memory:
                self._served.popitem(last=False)
            seg.add(
                now,
                requests=1.0,
                full=float(path == "full"),
                explored=float(explored),
                predicted_uplift=uplift,
            )
            return Decision(path, self.name, reason, lam, uplift, propensity)

    def _features(self, ctx: RouteContext) -> tuple[np.ndarray, np.ndarray] | None:
        if ctx.request is None:
            return None
        return self.featurizer.transform(ctx.request, ctx.candidates, ctx.k)

    def _predict(self, surface: str, feats: tuple[np.ndarray, np.ndarray] | None) -> float:
        """Estimated uplift in dollars (0 until the value model has fitted once)."""
        if feats is None or self.model.fits == 0:
            return 0.0
        return self._scale(surface) * self.model.predict(*feats)

    def _deadline_too_short(self, left_s: float | None) -> bool:
        if left_s is None:
            return False
        need_ms = self.config.min_full_deadline_ms
        if len(self._full_latency) >= 20:
            need_ms = max(need_ms, float(np.percentile(self._full_latency, 90)))
        return left_s * 1000.0 < need_ms

    def _scale(self, surface: str) -> float:
        """Dollars per model unit: realised revenue / model value of full-path slates.

        The surface's ratio, shrunk toward the global one by ``scale_prior`` pseudo-requests;
        1.0 before any revenue was seen."""
        g = self._global
        if g.get("model_value") <= 0 or g.get("scored") <= 0:
            return 1.0
        global_scale = g.get("revenue") / g.get("model_value")
        s = self._surfaces.get(surface)
        if s is None:
            return global_scale
        mean_value = g.get("model_value") / g.get("scored")
        prior = self.config.scale_prior * mean_value
        return (s.get("revenue") + prior * global_scale) / (s.get("model_value") + prior)

    # -- feedback -----------------------------------------------------------------------------

    def observe(self, segment: str, path: Path_, compute_ms: float, latency_ms: float) -> None:
        with self._lock:
            sums = self._cost_sums[path]
            sums[0] = sums[0] * self._cost_keep + compute_ms
            sums[1] = sums[1] * self._cost_keep + 1.0
            self._cost[path] = sums[0] / sums[1]
            if path == "full":
                self._full_latency.append(latency_ms)
            self.controller.record(compute_ms, self._cost["full"], latency_ms)

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
            self._surface(ctx.surface).add(now, model_value=v_full, scored=1.0)
            self._global.add(now, model_value=v_full, scored=1.0)
            self._segment(ctx.segment).add(now, model_uplift=v_full - v_cheap, scored=1.0)

    def _label_weight(self, surface: str, p_full: float) -> float:
        """Squared relative dollar scale of the surface (the model is fitted in model units, but
        its errors cost dollars), over the propensity of the full path (labels exist only where
        the full path ran; weighting by ``1 / p_full`` fits the model to all traffic)."""
        g = self._global
        relative = 1.0
        if g.get("model_value") > 0 and g.get("revenue") > 0:
            relative = self._scale(surface) / (g.get("revenue") / g.get("model_value"))
        weight = relative * relative
        return weight / p_full if self.config.importance_weighting else weight

    def observe_outcomes(self, outcomes: list[Outcome]) -> None:
        """Outcomes of requests decided here (others, and repeats, are ignored)."""
        known = []
        with self._lock:
            for outcome in outcomes:
                served = self._served.get(outcome.request_id)
                if served is None or outcome.revenue == 0.0 or outcome.key in self._seen:
                    continue
                self._seen[outcome.key] = None
                if len(self._seen) > self._memory:
                    self._seen.popitem(last=False)
                known.append((*served, outcome.revenue))
        for segment, path, propensity, revenue in known:
            self.observe_outcome(segment, path, revenue, propensity)

    def observe_outcome(self, segment: str, path: Path_, revenue: float, propensity: float) -> None:
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"{propensity=} must be in (0, 1]")
        with self._lock:
            now = self.clock.now()
            self._segment(segment).add(
                now, **{f"revenue_{path}": revenue, f"ipw_revenue_{path}": revenue / propensity}
            )
            if path == "full":
                surface = segment.split("/", 1)[0]
                self._surface(surface).add(now, revenue=revenue)
                self._global.add(now, revenue=revenue)

    def _recent_values(self) -> np.ndarray:
        """Value-per-ms estimates of the recent requests under the current value model (those
        made by an older model are recomputed: a refit shifts the whole distribution)."""
        if self.model.fits == 0:
            return np.zeros(0)
        extra = max(self._cost["full"] - self._cost["cheap"], 1e-6)
        for entry in self._recent:
            if entry[4] != self.model.fits:
                entry[3] = self._scale(entry[0]) * self.model.predict(entry[1], entry[2]) / extra
                entry[4] = self.model.fits
        return np.array([entry[3] for entry in self._recent])

    def _target_full_share(self) -> float:
        """Share of requests on the full path that spends the budget share (1 without one)."""
        share = self.config.controller.budget_share
        if share is None:
            return 1.0
        q_full, q_cheap = self._cost["full"], self._cost["cheap"]
        return min(max((share * q_full - q_cheap) / max(q_full - q_cheap, 1e-9), 0.0), 1.0)

    def _lambda(self) -> float:
        """Lambda for this request: the quantile of recent value-per-ms estimates above which the
        controller's full share lies (0 when it asks for everyone: any positive uplift)."""
        due = self.controller.due()
        share = self.controller.tick(
            self._target_full_share() if self.config.feed_forward else None,
            hold=self.model.labels < self.config.cold_start_labels,
            saturated=self._lam == 0.0,
        )
        self._since_lambda += 1
        if due or self._since_lambda >= 100 or self._lam is None:
            self._since_lambda = 0
            values = self._recent_values()
            if len(values) < 20 or share >= 1.0:
                self._lam = 0.0
            else:
                self._lam = max(float(np.quantile(values, 1.0 - share)), 0.0)
        return self._lam

    def _segment(self, segment: str) -> DecayingSums:
        if segment not in self._segments:
            self._segments[segment] = DecayingSums(self.config.stats_half_life_s)
        return self._segments[segment]

    def _surface(self, surface: str) -> DecayingSums:
        if surface not in self._surfaces:
            self._surfaces[surface] = DecayingSums(self.config.stats_half_life_s)
        return self._surfaces[surface]

    # -- stats --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock.now()
            segments = {}
            for name, seg in sorted(self._segments.items()):
                seg.decay_to(now)
                n = seg.get("requests")
                n_full = seg.get("full")
                n_cheap = max(n - n_full, 0.0)
                scale = self._scale(name.split("/", 1)[0])
                segments[name] = {
                    "requests": n,
                    "full_share": n_full / n if n else 0.0,
                    "cheap_share": n_cheap / n if n else 0.0,
                    "recent_cheap_share": self._cheap_share.get(name, 0.0),
                    "explored": seg.get("explored"),
                    "predicted_uplift": seg.get("predicted_uplift") / n if n else 0.0,
                    "model_uplift": scale * seg.get("model_uplift") / seg.get("scored")
                    if seg.get("scored")
                    else 0.0,
                    "ips_uplift": (seg.get("ipw_revenue_full") - seg.get("ipw_revenue_cheap")) / n
                    if n
                    else 0.0,
                    "revenue_per_inference_full": seg.get("revenue_full") / n_full if n_full else 0.0,
                    "revenue_per_inference_cheap": seg.get("revenue_cheap") / n_cheap if n_cheap else 0.0,
                    "dollars_per_model_unit": scale,
                }
            return {
                "policy": self.name,
                "budget_share": self.config.controller.budget_share,
                "lambda": self._lam or 0.0,
                "full_share_target": self.controller.share,
                "controller": self.controller.stats(),
                "budget_use": self.controller.last.get("budget_use", math.nan),
                "cost_ms": dict(self._cost),
                "value_model": {"labels": self.model.labels, "fits": self.model.fits},
                "segments": segments,
            }
