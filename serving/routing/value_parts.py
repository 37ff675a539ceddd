"""The value-aware router's parts, one job each; ``serving.routing.value_aware`` composes them.

* ``PathCosts`` measures what each path costs (and how long the full one takes);
* ``DollarScale`` turns the value model's units into dollars per surface, from realised revenue;
* ``Exploration`` draws the randomised choices and their logged propensities;
* ``LambdaSetter`` turns the controller's full share into lambda over recent value estimates;
* ``OutcomeAttribution`` maps reported outcomes to the requests this router decided, once each;
* ``SegmentStats`` keeps the per-segment counters behind the guardrail and ``stats()``.

None of them locks: the router calls them under its own lock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from serving.decay import DecayingSums
from serving.domain import Outcome, Path_
from serving.routing.controller import LambdaController


class PathCosts:
    """Measured CPU cost per path: a decaying mean, sum(w x) / sum(w), rather than an EMA started
    at the first sample. A process's first calls are slow (lazy initialisation, cold caches; 25x
    the steady cost of the cheap path measured in replay), and an EMA with a half-life of hundreds
    of requests would carry that outlier for as long, skewing the budget's feed-forward share."""

    def __init__(self, half_life: float) -> None:
        self.ms: dict[str, float] = {"full": 1.0, "cheap": 0.1}
        self._sums = {"full": [0.0, 0.0], "cheap": [0.0, 0.0]}
        self._keep = 0.5 ** (1.0 / half_life)
        self.full_latency: deque[float] = deque(maxlen=256)

    def record(self, path: Path_, compute_ms: float, latency_ms: float) -> None:
        sums = self._sums[path]
        sums[0] = sums[0] * self._keep + compute_ms
        sums[1] = sums[1] * self._keep + 1.0
        self.ms[path] = sums[0] / sums[1]
        if path == "full":
            self.full_latency.append(latency_ms)

    @property
    def extra_ms(self) -> float:
        """What the full path costs more than the cheap one."""
        return max(self.ms["full"] - self.ms["cheap"], 1e-6)

    def full_share_for(self, budget_share: float | None) -> float:
        """Share of requests on the full path that spends ``budget_share`` (1 without one)."""
        if budget_share is None:
            return 1.0
        q_full, q_cheap = self.ms["full"], self.ms["cheap"]
        return min(max((budget_share * q_full - q_cheap) / max(q_full - q_cheap, 1e-9), 0.0), 1.0)

    def too_short(self, left_s: float | None, min_full_ms: float) -> bool:
        """Whether ``left_s`` is less than the full path needs: ``min_full_ms``, raised to its
        recent p90 latency."""
        if left_s is None:
            return False
        need_ms = min_full_ms
        if len(self.full_latency) >= 20:
            need_ms = max(need_ms, float(np.percentile(self.full_latency, 90)))
        return left_s * 1000.0 < need_ms


class DollarScale:
    """Dollars per model unit: realised revenue / model value of full-path slates, per surface
    and overall, over decaying windows of the clock."""

    def __init__(self, half_life_s: float, prior: float) -> None:
        self.half_life_s = half_life_s
        self.prior = prior
        self.overall = DecayingSums(half_life_s)
        self._surfaces: dict[str, DecayingSums] = {}

    def of(self, surface: str) -> float:
        """The surface's ratio, shrunk toward the overall one by ``prior`` pseudo-requests; 1.0
        before any revenue was seen."""
        g = self.overall
        if g.get("model_value") <= 0 or g.get("scored") <= 0:
            return 1.0
        overall = g.get("revenue") / g.get("model_value")
        s = self._surfaces.get(surface)
        if s is None:
            return overall
        prior = self.prior * (g.get("model_value") / g.get("scored"))
        return (s.get("revenue") + prior * overall) / (s.get("model_value") + prior)

    def relative_weight(self, surface: str) -> float:
        """Squared dollar scale of the surface relative to the overall one (the value model is
        fitted in model units, but its errors cost dollars)."""
        g = self.overall
        relative = 1.0
        if g.get("model_value") > 0 and g.get("revenue") > 0:
            relative = self.of(surface) / (g.get("revenue") / g.get("model_value"))
        return relative * relative

    def scored(self, now: float, surface: str, model_value: float) -> None:
        self._surface(surface).add(now, model_value=model_value, scored=1.0)
        self.overall.add(now, model_value=model_value, scored=1.0)

    def earned(self, now: float, surface: str, revenue: float) -> None:
        self._surface(surface).add(now, revenue=revenue)
        self.overall.add(now, revenue=revenue)

    def _surface(self, surface: str) -> DecayingSums:
        if surface not in self._surfaces:
            self._surfaces[surface] = DecayingSums(self.half_life_s)
        return self._surfaces[surface]


class Exploration:
    """The router's random draws, from one seeded generator, with the propensity each implies."""

    def __init__(self, epsilon: float, seed: int) -> None:
        self.epsilon = epsilon
        self._rng = np.random.default_rng(seed)

    def cold_start(self, target_full_share: float) -> tuple[Path_, float, str]:
        """Nothing learnt yet: a coin weighted by the budget's full share, so labels come from
        everywhere and the budget is used while the value model warms up."""
        eps = self.epsilon
        p_full = min(max(target_full_share, eps / 2.0), 1.0 - eps / 2.0)
        path: Path_ = "full" if self._rng.random() < p_full else "cheap"
        return path, p_full, f"cold start: full with probability {p_full:.2f}"

    def around(self, rule_full: bool, reason: str) -> tuple[Path_, float, bool, str]:
        """The rule's path, except with probability epsilon, where a fair coin picks it."""
        eps = self.epsilon
        path: Path_ = "full" if rule_full else "cheap"
        explored = bool(eps > 0 and self._rng.random() < eps)
        if explored:
            path = "full" if self._rng.random() < 0.5 else "cheap"
            reason = f"exploration (epsilon {eps})"
        return path, (1.0 - eps) * float(rule_full) + eps / 2.0, explored, reason


class LambdaSetter:
    """Lambda for each request: the quantile of recent value-per-ms estimates above which the
    controller's full share lies (0 when it asks for everyone: any positive uplift)."""

    def __init__(self, controller: LambdaController, window: int) -> None:
        self.controller = controller
        self.value: float | None = None
        # Recent requests: [surface, feature idx, values, value per ms, model fit it is from].
        self._recent: deque[list[Any]] = deque(maxlen=window)
        self._since = 0

    def remember(self, surface: str, feats: tuple[np.ndarray, np.ndarray], per_ms: float, fit: int) -> None:
        self._recent.append([surface, feats[0], feats[1], per_ms, fit])

    def next(
        self,
        feed_forward: float | None,
        *,
        hold: bool,
        fit: int,
        value_per_ms: Callable[[str, np.ndarray, np.ndarray], float],
    ) -> float:
        """Tick the controller and, when a window closed (or every 100 requests), recompute
        lambda; ``value_per_ms`` re-values a request under the current model fit ``fit``."""
        due = self.controller.due()
        share = self.controller.tick(feed_forward, hold=hold, saturated=self.value == 0.0)
        self._since += 1
        if due or self._since >= 100 or self.value is None:
            self._since = 0
            values = self._recent_values(fit, value_per_ms)
            if len(values) < 20 or share >= 1.0:
                self.value = 0.0
            else:
                self.value = max(float(np.quantile(values, 1.0 - share)), 0.0)
        return self.value

    def _recent_values(
        self, fit: int, value_per_ms: Callable[[str, np.ndarray, np.ndarray], float]
    ) -> np.ndarray:
        """Estimates made by an older model fit are recomputed: a refit shifts them all."""
        if fit == 0:
            return np.zeros(0)
        for entry in self._recent:
            if entry[4] != fit:
                entry[3] = value_per_ms(entry[0], entry[1], entry[2])
                entry[4] = fit
        return np.array([entry[3] for entry in self._recent])


class OutcomeAttribution:
    """Which cell and propensity each recent request had, and which outcome keys were applied."""

    def __init__(self, memory: int) -> None:
        self._memory = memory
        self._served: OrderedDict[str, tuple[str, Path_, float]] = OrderedDict()
        self._seen: OrderedDict[tuple[str, int, str], None] = OrderedDict()

    def remember(self, request_id: str, segment: str, path: Path_, propensity: float) -> None:
        self._served[request_id] = (segment, path, propensity)
        if len(self._served) > self._memory:
            self._served.popitem(last=False)

    def new_revenue(self, outcomes: list[Outcome]) -> list[tuple[str, Path_, float, float]]:
        """``(segment, path, propensity, revenue)`` of each outcome with revenue for a request
        remembered here, the first time its key is seen."""
        known = []
        for outcome in outcomes:
            served = self._served.get(outcome.request_id)
            if served is None or outcome.revenue == 0.0 or outcome.key in self._seen:
                continue
            self._seen[outcome.key] = None
            if len(self._seen) > self._memory:
                self._seen.popitem(last=False)
            known.append((*served, outcome.revenue))
        return known


class SegmentStats:
    """Per-segment decaying counters (what ``stats()`` reports) and each segment's recent cheap
    share (what the guardrail reads)."""

    def __init__(self, half_life_s: float, guardrail_half_life: float) -> None:
        self.half_life_s = half_life_s
        self.cheap_share: dict[str, float] = {}
        self._guard_alpha = 1.0 - 0.5 ** (1.0 / guardrail_half_life)
        self._segments: dict[str, DecayingSums] = {}

    def of(self, segment: str) -> DecayingSums:
        if segment not in self._segments:
            self._segments[segment] = DecayingSums(self.half_life_s)
        return self._segments[segment]

    def routed(self, segment: str, path: Path_) -> None:
        share = self.cheap_share.get(segment, 0.0)
        self.cheap_share[segment] = share + self._guard_alpha * (float(path == "cheap") - share)

    def report(self, now: float, scale: Callable[[str], float]) -> dict[str, Any]:
        segments = {}
        for name, seg in sorted(self._segments.items()):
            seg.decay_to(now)
            n = seg.get("requests")
            n_full = seg.get("full")
            n_cheap = max(n - n_full, 0.0)
            dollars = scale(name.split("/", 1)[0])
            segments[name] = {
                "requests": n,
                "full_share": n_full / n if n else 0.0,
                "cheap_share": n_cheap / n if n else 0.0,
                "recent_cheap_share": self.cheap_share.get(name, 0.0),
                "explored": seg.get("explored"),
                "predicted_uplift": seg.get("predicted_uplift") / n if n else 0.0,
                "model_uplift": dollars * seg.get("model_uplift") / seg.get("scored")
                if seg.get("scored")
                else 0.0,
                "ips_uplift": (seg.get("ipw_revenue_full") - seg.get("ipw_revenue_cheap")) / n if n else 0.0,
                "revenue_per_inference_full": seg.get("revenue_full") / n_full if n_full else 0.0,
                "revenue_per_inference_cheap": seg.get("revenue_cheap") / n_cheap if n_cheap else 0.0,
                "dollars_per_model_unit": dollars,
            }
        return segments
