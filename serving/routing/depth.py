"""Cascade depth as the routing action (DCAF's formulation): per request, how many candidates the
full model re-ranks.

A request's K retrieved candidates are first ordered by the cheap path's expected value
(``serving.ranking.cheap_order``); depth M sends the top M of that order to the full model and
serves the top k of them by full expected value. M = 0 is the cheap path, M = K the full path.
For each request the router picks, over a small grid of depths,

    argmax_M  Q(M) - lambda * q(M)

* ``Q(M)`` is the revenue depth M adds over the cheap slate, in dollars: a ridge model per depth
  (``serving.routing.uplift.OnlineRidge``) of the full model's own slate-value gain on
  routing-time features, times its surface's dollars per model unit (``DollarScale``, learnt
  from realised revenue). The features are the binary router's (``RouteFeaturizer``: segment,
  context, dense features, retrieval-score statistics) plus the shape of the cheap order's head:
  how fast expected value falls from rank 1 to rank 20k (a flat head means depth matters more).
  Labels come free with every request scored at depth M: the full scores of the cheap order's
  top M value the slate of every depth up to M, so one request labels all shallower depths.
* ``q(M)`` is the measured CPU cost of depth M (decayed means per depth; an unmeasured depth is
  interpolated between measured ones); the request-side work is paid once, whatever M.
* ``lambda``: the controller (``serving.routing.controller``) steers the compute share to spend;
  lambda is the price at which the recent requests' choices would spend that share, found by
  bisection over their predicted curves. Queueing delay raises it (``pressure_ms``), so under load
  every request moves shallower, the lowest-value first.

What the gain models learn is shared by all replicas (``share_through``: the tracker's Redis in
``serve``): each fits on its own statistics plus the others' (``serving.routing.shared``).

Around that rule: a request with almost no deadline left goes cheap; until the models have
``cold_start_labels`` labels a coin sends a request to full depth with the budget's probability
(full-depth labels train every depth); with probability ``epsilon`` a depth is drawn uniformly
from the grid. The logged propensity is the probability of the served depth; labels of depth M
are weighted by 1 / P(served depth >= M), so the models fit all traffic.
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
from serving.domain import Candidates, Decision, Outcome, Path_, RequestFeatures
from serving.ranking import ranking_keys, retrieval_probs, top_k
from serving.routing.config import DepthConfig
from serving.routing.controller import LambdaController
from serving.routing.router import RouteContext, Router
from serving.routing.shared import SharedLearning, pack, unpack
from serving.routing.uplift import OnlineRidge, RouteFeaturizer, examination
from serving.routing.value_parts import DollarScale, OutcomeAttribution

HEAD_RANKS = (1, 2, 5, 10, 20)
"""Ranks, in slates of k, at which the cheap order's expected value is read (relative to rank 1)."""


def depth_options(grid: tuple[int, ...], n_candidates: int) -> np.ndarray:
    """The grid's depths for a request of ``n_candidates``: each clipped to K (M = K is full)."""
    return np.minimum(np.asarray(grid, dtype=np.int64), n_candidates)


def depth_values(
    order: np.ndarray, full_probs: np.ndarray, item_values: np.ndarray | None, depths: np.ndarray, k: int
) -> np.ndarray:
    """Model value of the slate each depth serves, all valued by the full model:
    ``sum_p examine(p) x p_full(item_p) x value(item_p)`` of the top k by full expected value among
    the cheap order's first M (depth 0: the cheap order's first k, in that order).

    ``order``: candidate indices in cheap order, at least ``max(depths)`` long; ``full_probs`` and
    ``item_values`` are aligned with the candidates, and ``full_probs`` need only be known for the
    first ``max(depths)`` of the order."""
    gain = ranking_keys(full_probs, item_values)
    out = np.zeros(len(depths))
    for j, m in enumerate(depths):
        head = order[: max(int(m), k)] if m > 0 else order[:k]
        kk = min(k, len(head))
        disc = examination(kk)
        out[j] = float(disc @ gain[head[top_k(gain[head], kk)]]) if m > 0 else float(disc @ gain[head[:kk]])
    return out


class DepthFeaturizer:
    """``RouteFeaturizer``'s features plus the cheap order's head shape, plain and crossed with
    the surface (the same cross the base features use)."""

    def __init__(self, base: RouteFeaturizer) -> None:
        self.base = base
        self.n_head = len(HEAD_RANKS)
        self.offset = base.dim
        self.cross_offset = base.dim + self.n_head
        self.dim = self.cross_offset + self.n_head * max(base.cross_card, 1)
        self._arange = np.arange(self.n_head, dtype=np.int64)

    def transform(
        self, request: RequestFeatures, candidates: Candidates | None, k: int, cheap_ev: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        idx, val = self.base.transform(request, candidates, k)
        head = np.zeros(self.n_head)
        if cheap_ev is not None and len(cheap_ev):
            ranks = np.minimum(np.asarray(HEAD_RANKS) * k - 1, len(cheap_ev) - 1)
            top = max(float(cheap_ev[0]), 1e-12)
            head = np.log(np.maximum(cheap_ev[ranks], 1e-12) / top)
        c = 0
        if self.base.cross_column >= 0:
            c = min(int(request.sparse[self.base.cross_column]), self.base.cross_card - 1)
        extra_idx = [self.offset + self._arange, self.cross_offset + c * self.n_head + self._arange]
        return np.concatenate([idx, *extra_idx]), np.concatenate([val, head, head])


class DepthCosts:
    """Measured CPU ms per grid depth: decayed means. A depth not measured yet is priced as the
    next deeper measured one (cost grows with depth, and the request-side work makes a shallow
    cascade dearer than a straight line from the cheap path would say: an upper bound keeps the
    budget); a depth deeper than any measured one costs the deepest measured. Before any
    measurement, a prior of the right shape (a fixed part plus one growing with M). The result
    never falls with depth."""

    def __init__(self, grid: tuple[int, ...], half_life: float) -> None:
        self.grid = np.asarray(grid, dtype=np.float64)
        self._sums = np.zeros((len(grid), 2))
        self._keep = 0.5 ** (1.0 / half_life)
        self._prior = 0.1 + self.grid / max(float(self.grid.max()), 1.0)

    def index(self, depth: int) -> int:
        """The grid entry a served depth is measured as: the first at least as deep."""
        return min(int(np.searchsorted(self.grid, depth)), len(self.grid) - 1)

    def record(self, depth: int, compute_ms: float) -> None:
        j = self.index(depth)
        self._sums[j] = self._sums[j] * self._keep + (compute_ms, 1.0)

    def ms(self) -> np.ndarray:
        seen = self._sums[:, 1] > 1e-9
        if not seen.any():
            return self._prior.copy()
        means = np.where(seen, self._sums[:, 0] / np.maximum(self._sums[:, 1], 1e-12), np.inf)
        # Right to left: each depth at most what any deeper measured depth costs.
        out = np.minimum.accumulate(means[::-1])[::-1]
        # Deeper than any measurement: the deepest measured (cold start measures full depth, and
        # grid depths past a request's K are that same full depth).
        deepest = int(np.flatnonzero(seen)[-1])
        out[deepest + 1 :] = means[deepest]
        return out


class DepthRouter(Router):
    """See the module docstring."""

    name = "value_aware"

    def __init__(
        self,
        config: DepthConfig,
        schema: FeatureSchema,
        item_values: np.ndarray | None = None,
        clock: Clock | None = None,
        rng_seed: int = 0,
    ) -> None:
        self.config = config
        self.grid = tuple(config.depths)
        self.clock = clock or MonotonicClock()
        self.item_values = None if item_values is None else np.asarray(item_values, dtype=np.float64)
        self.featurizer = DepthFeaturizer(RouteFeaturizer(schema, config.featurizer, self.item_values))
        dim = self.featurizer.dim
        # One gain model per depth above 0 (depth 0 gains nothing over itself).
        self.models = [
            OnlineRidge(dim, config.l2, config.label_half_life, config.refit_every) for _ in self.grid[1:]
        ]
        self.controller = LambdaController(config.controller, self.clock)
        self.costs = DepthCosts(self.grid, config.cost_half_life)
        self.scale = DollarScale(config.stats_half_life_s, config.scale_prior)
        self.attribution = OutcomeAttribution(config.outcome_memory)
        self._rng = np.random.default_rng(rng_seed)
        self._lock = threading.Lock()
        self._lam = 0.0
        self._since_lambda = 0
        # Recent requests' predicted gain curves ($): what lambda is bisected over.
        # (gains, the model fit they came from): a refit makes older curves stale.
        self._recent: deque[tuple[np.ndarray, int]] = deque(maxlen=config.value_window)
        # Decided requests, until their full scores give labels: features and P(depth >= M) per depth.
        self._pending: OrderedDict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = OrderedDict()
        self._segments: dict[str, DecayingSums] = {}
        self._learning: SharedLearning | None = None
        self._peers = 0

    @property
    def labels(self) -> int:
        """Full-depth labels behind the gain models: this replica's and its peers'."""
        return self.models[-1].labels + self.models[-1].peer_labels if self.models else 0

    # -- shared learning ----------------------------------------------------------------------

    def share_through(self, learning: SharedLearning) -> None:
        self._learning = learning

    def share_state(self) -> None:
        """Publish the gain models' own statistics, read the other replicas', and refit every
        model on both (solved outside the lock: decisions go on meanwhile)."""
        if self._learning is None:
            return
        with self._lock:
            own = [m.export() for m in self.models]
            labels = np.array([m.labels for m in self.models], dtype=np.int64)
        blob = pack(
            {"A": np.stack([a for a, _ in own]), "b": np.stack([b for _, b in own]), "labels": labels}
        )
        states = self._learning.exchange(blob)
        if states is None:
            return
        peer_A = np.zeros((len(self.models), self.featurizer.dim, self.featurizer.dim))
        peer_b = np.zeros((len(self.models), self.featurizer.dim))
        peer_labels = np.zeros(len(self.models), dtype=np.int64)
        peers = 0
        for state in states:
            arrays = unpack(state)
            if arrays["A"].shape != peer_A.shape:
                continue  # another model or grid (a rollout in progress): not comparable
            peer_A += arrays["A"]
            peer_b += arrays["b"]
            peer_labels += arrays["labels"]
            peers += 1
        weights = [m.fit_with_peers(peer_A[j], peer_b[j]) for j, m in enumerate(self.models)]
        with self._lock:
            for j, m in enumerate(self.models):
                m.adopt(peer_A[j], peer_b[j], int(peer_labels[j]), weights[j])
            self._peers = peers

    def close(self) -> None:
        if self._learning is not None:
            self._learning.close()

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, ctx: RouteContext) -> Decision:
        n_cand = 0 if ctx.candidates is None else len(ctx.candidates.item_ids)
        depths = depth_options(self.grid, n_cand)
        cheap_ev = None
        if ctx.candidates is not None and n_cand:
            values = None if self.item_values is None else self.item_values[ctx.candidates.item_ids]
            ev = ranking_keys(retrieval_probs(ctx.candidates.retrieval_scores), values)
            cheap_ev = -np.sort(-ev)
        feats = (
            None
            if ctx.request is None
            else self.featurizer.transform(ctx.request, ctx.candidates, ctx.k, cheap_ev)
        )
        with self._lock:
            lam = self._lambda()
            seg = self._segment(ctx.segment)
            now = self.clock.now()
            left = ctx.deadline_left_s
            if left is not None and left * 1000.0 < self.config.min_full_deadline_ms:
                seg.add(now, requests=1.0, depth_0=1.0)
                return Decision("cheap", self.name, "deadline nearly spent", lam, 0.0, 1.0, depth=0)
            gains = self._predict(ctx.surface, feats)
            costs = self.costs.ms()
            eps = self.config.epsilon
            n = len(self.grid)
            if self.labels < self.config.cold_start_labels or feats is None:
                p_full = min(max(self._budget(), eps / 2.0), 1.0 - eps / 2.0)
                j = n - 1 if self._rng.random() < p_full else 0
                probs = np.zeros(n)
                probs[0], probs[-1] = 1.0 - p_full, p_full
                reason = f"cold start: full depth with probability {p_full:.2f}"
            else:
                pressure = 1.0 + ctx.queue_delay_s * 1000.0 / self.config.pressure_ms
                net = gains - lam * pressure * costs
                rule = int(np.argmax(net))
                probs = np.full(n, eps / n)
                probs[rule] += 1.0 - eps
                j = rule
                reason = (
                    f"depth {int(depths[rule])}: gain ${gains[rule]:.5f} - lambda {lam:.2e}"
                    f" x {costs[rule]:.3f} ms is the best of {n} depths"
                )
                if pressure > 1.05:
                    reason += (
                        f" (lambda x {pressure:.2f}: full path wait {ctx.queue_delay_s * 1000.0:.1f} ms)"
                    )
                if eps > 0 and self._rng.random() < eps:
                    j = int(self._rng.integers(n))
                    reason = f"exploration (epsilon {eps}): depth {int(depths[j])}"
                self._recent.append((gains, self.models[-1].fits))
            depth = int(depths[j])
            # Options that clip to the same depth are one action: their probabilities add up.
            propensity = float(probs[depths == depth].sum())
            path: Path_ = "cheap" if depth == 0 else "full"
            if feats is not None and depth > 0:
                reach = np.array([probs[depths >= m].sum() for m in depths])
                self._pending[ctx.request_id] = (feats[0], feats[1], reach, n_cand)
                if len(self._pending) > 8192:
                    self._pending.popitem(last=False)
            self.attribution.remember(ctx.request_id, ctx.segment, path, propensity)
            seg.add(now, requests=1.0, **{f"depth_{self.grid[j]}": 1.0})
            return Decision(path, self.name, reason, lam, float(gains[j]), propensity, depth=depth)

    def fit_budget(self, decision: Decision, service_budget_s: float) -> Decision | None:
        """Deep -> shallow: the decision when its depth's measured cost fits the budget, else the
        deepest grid depth below it that fits (propensity 1: admission's choice, not the policy's)."""
        if decision.depth is None or decision.depth <= 0:
            return decision if service_budget_s >= 0.0 else None
        with self._lock:
            costs = self.costs.ms()
        if costs[self.costs.index(decision.depth)] / 1000.0 <= service_budget_s:
            return decision
        for j in range(len(self.grid) - 1, 0, -1):
            m = self.grid[j]
            if m < decision.depth and costs[j] / 1000.0 <= service_budget_s:
                reason = (
                    f"shallower: depth {decision.depth} would not fit {service_budget_s * 1000.0:.1f} ms"
                    f" after the queue; depth {m} takes {costs[j]:.2f} ms (router: {decision.reason})"
                )
                return Decision(
                    "full", self.name, reason, decision.lam, decision.estimated_uplift, 1.0, depth=m
                )
        return None

    def _predict(self, surface: str, feats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Predicted dollars each depth adds over the cheap slate (0 before the first fit)."""
        out = np.zeros(len(self.grid))
        if feats is None or self.models[-1].fits == 0:
            return out
        scale = self.scale.of(surface)
        out[1:] = [scale * m.predict(*feats) for m in self.models]
        return out

    def _budget(self) -> float:
        share = self.config.controller.budget_share
        return 1.0 if share is None else min(share, 1.0)

    def _lambda(self) -> float:
        """Tick the controller; every 100 requests (or when a window closes) re-price lambda."""
        due = self.controller.due()
        share = self.controller.tick(self._budget(), hold=self.labels < self.config.cold_start_labels)
        self._since_lambda += 1
        if not (due or self._since_lambda >= 100):
            return self._lam
        self._since_lambda = 0
        if len(self._recent) < 20 or share >= 1.0:
            self._lam = 0.0
            return self._lam
        fit = self.models[-1].fits
        gains = np.stack([g for g, f in self._recent if f == fit] or [g for g, _ in self._recent])
        costs = self.costs.ms()
        self._lam = _price_for_share(gains, costs, share * costs[-1])
        return self._lam

    # -- feedback -----------------------------------------------------------------------------

    def observe(
        self, segment: str, path: Path_, compute_ms: float, latency_ms: float, depth: int | None = None
    ) -> None:
        with self._lock:
            if depth is None:  # a forced path: cheap is depth 0, full the deepest
                depth = 0 if path == "cheap" else self.grid[-1]
            self.costs.record(depth, compute_ms)
            self.controller.record(compute_ms, float(self.costs.ms()[-1]), latency_ms)

    def observe_scored(self, ctx: RouteContext, full_scores: np.ndarray) -> None:
        """``ctx.candidates``: the candidates the full model scored, in cheap order (the top M)."""
        if ctx.request is None or ctx.candidates is None or len(full_scores) == 0:
            return
        with self._lock:
            pending = self._pending.pop(ctx.request_id, None)
        if pending is None:
            return  # not decided here (a forced path): its depth was not drawn from this policy
        idx, val, reach, n_cand = pending
        ids = ctx.candidates.item_ids
        values = None if self.item_values is None else self.item_values[ids]
        scored = len(ids)
        depths = depth_options(self.grid, n_cand)
        labelled = depths <= scored  # every depth up to the one served
        v = depth_values(np.arange(scored), full_scores, values, np.minimum(depths, scored), ctx.k)
        with self._lock:
            now = self.clock.now()
            self.scale.scored(now, ctx.surface, float(v[depths == scored][0]))
            weight = self.scale.relative_weight(ctx.surface)
            for j, model in enumerate(self.models, start=1):
                if labelled[j]:
                    model.add(idx, val, float(v[j] - v[0]), weight / max(float(reach[j]), 1e-3))

    def observe_outcomes(self, outcomes: list[Outcome]) -> None:
        with self._lock:
            known = self.attribution.new_revenue(outcomes)
        for segment, path, propensity, revenue in known:
            self.observe_outcome(segment, path, revenue, propensity)

    def observe_outcome(self, segment: str, path: Path_, revenue: float, propensity: float) -> None:
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"{propensity=} must be in (0, 1]")
        with self._lock:
            now = self.clock.now()
            self._segment(segment).add(now, revenue=revenue)
            if path == "full":
                self.scale.earned(now, segment.split("/", 1)[0], revenue)

    # -- stats --------------------------------------------------------------------------------

    def _segment(self, name: str) -> DecayingSums:
        if name not in self._segments:
            self._segments[name] = DecayingSums(self.config.stats_half_life_s)
        return self._segments[name]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock.now()
            segments = {}
            for name, seg in sorted(self._segments.items()):
                seg.decay_to(now)
                n = seg.get("requests")
                mix = {str(m): seg.get(f"depth_{m}") / n for m in self.grid if n and seg.get(f"depth_{m}")}
                segments[name] = {
                    "requests": n,
                    "depth_mix": mix,
                    "mean_depth": sum(float(m) * s for m, s in mix.items()) if mix else 0.0,
                    "revenue_per_inference": seg.get("revenue") / n if n else 0.0,
                    "dollars_per_model_unit": self.scale.of(name.split("/", 1)[0]),
                }
            return {
                "policy": self.name,
                "action": "depth",
                "depths": list(self.grid),
                "budget_share": self.config.controller.budget_share,
                "lambda": self._lam,
                "compute_share_target": self.controller.share,
                "controller": self.controller.stats(),
                "budget_use": self.controller.last.get("budget_use", math.nan),
                "cost_ms": {str(m): float(c) for m, c in zip(self.grid, self.costs.ms(), strict=True)},
                "value_model": {
                    "labels": self.labels,
                    "fits": self.models[-1].fits if self.models else 0,
                    "peers": self._peers,
                    "peer_labels": self.models[-1].peer_labels if self.models else 0,
                    "shared": self._learning is not None,
                },
                "segments": segments,
            }


def _price_for_share(gains: np.ndarray, costs: np.ndarray, target_ms: float) -> float:
    """The lambda at which the requests' ``argmax_j gains_ij - lambda costs_j`` spend on average at
    most ``target_ms`` (0 when even lambda = 0 fits): bisection in log space, spend falls with lambda."""

    def spend(lam: float) -> float:
        return float(costs[np.argmax(gains - lam * costs, axis=1)].mean())

    if spend(0.0) <= target_ms:
        return 0.0
    lo, hi = 1e-12, 1.0
    while spend(hi) > target_ms and hi < 1e9:
        hi *= 10.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if spend(mid) > target_ms:
            lo = mid
        else:
            hi = mid
    return hi
