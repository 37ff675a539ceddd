"""Run routing policies over a scored log, in time order, and measure what each one earns and costs.

Fixed policies (always-full, always-cheap, per-surface tables, the oracle) are masks over the
requests. Online policies (a ``Router``) decide request by request on an injected clock and get
the feedback the pipeline gives them, through the same ``serving.feedback`` sequence: measured
compute and modelled latency after each request, the full model's scores when it ran, and the
realised revenue of the served slate as a reported outcome.

Latency model: the log's arrival times (one simulated day with diurnal load) are compressed so
that always-full would keep ``cores`` FIFO servers ``peak_utilisation`` busy in the busiest hour.
A request's service time is ``overhead_ms`` (RPC) + the measured retrieval CPU + the measured CPU
of the path it took; its latency is its queueing delay + service time in a ``cores``-server FIFO
queue (simulated exactly, not approximated). Every policy sees the same arrivals, so a policy
that spends less compute also queues less.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embeddings.clock import ManualClock
from loadtest.counterfactual import ScoredLog
from serving.domain import Decision, Outcome
from serving.feedback import RoutingFeedback
from serving.routing.router import RouteContext, Router


@dataclass(frozen=True)
class LoadModel:
    cores: int = 2
    """Servers (CPU cores scoring requests) of the modelled replica."""
    peak_utilisation: float = 0.8
    """How busy always-full would keep them in the busiest hour of the day."""
    overhead_ms: float = 0.26
    """Per-request CPU besides retrieval and scoring (gRPC unary on loopback, PERFORMANCE.md)."""

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise ValueError(f"{self.cores=} must be >= 1")
        if not 0.0 < self.peak_utilisation < 1.0:
            raise ValueError(f"{self.peak_utilisation=} must be in (0, 1)")
        if self.overhead_ms < 0:
            raise ValueError(f"{self.overhead_ms=} must be >= 0")


def arrival_times(log: ScoredLog, load: LoadModel) -> np.ndarray:
    """The log's timestamps compressed so that always-full meets ``load.peak_utilisation``."""
    ts = np.asarray(log.requests.ts, dtype=np.float64)
    if len(ts) < 2:
        return ts - ts.min(initial=0.0)
    hour = np.floor((ts - ts[0]) / 3600.0).astype(np.int64)
    busiest_rate = np.bincount(hour).max() / 3600.0  # requests per log second
    service_s = (load.overhead_ms + log.retrieval_ms + log.cost_ms["full"].mean()) / 1000.0
    target_rate = load.peak_utilisation * load.cores / service_s
    return (ts - ts[0]) * (busiest_rate / target_rate)


class FifoServers:
    """``cores`` servers taking requests first come, first served."""

    def __init__(self, cores: int) -> None:
        self._free = [0.0] * cores

    def serve(self, arrival_s: float, service_ms: float) -> float:
        """Latency in ms of a request arriving at ``arrival_s`` (arrivals must not go back)."""
        free = heapq.heappop(self._free)
        done = max(arrival_s, free) + service_ms / 1000.0
        heapq.heappush(self._free, done)
        return (done - arrival_s) * 1000.0


@dataclass
class PolicyRun:
    name: str
    full: np.ndarray
    """Bool per request: served by the full path."""
    latency_ms: np.ndarray
    decisions: list[Decision] = field(default_factory=list)
    """Online policies: the decision per request (propensities, lambda, estimates)."""
    router_stats: dict[str, Any] = field(default_factory=dict)


def run_mask(log: ScoredLog, name: str, full: np.ndarray, times: np.ndarray, load: LoadModel) -> PolicyRun:
    servers = FifoServers(load.cores)
    cost = np.where(full, log.cost_ms["full"], log.cost_ms["cheap"])
    service = load.overhead_ms + log.retrieval_ms + cost
    latency = np.array([servers.serve(t, s) for t, s in zip(times, service, strict=True)])
    return PolicyRun(name, full.astype(bool), latency)


def run_router(
    log: ScoredLog,
    name: str,
    make: Callable[[ManualClock], Router],
    times: np.ndarray,
    load: LoadModel,
    warmup: tuple[ScoredLog, np.ndarray] | None = None,
) -> PolicyRun:
    """Decide request by request with a fresh router, feeding back what production would.

    ``warmup``: a previous day (its scored log and arrival times) the router runs over first,
    so that the replayed day sees a router in its steady state rather than a cold one; only the
    replayed day is measured."""
    warm_times = None if warmup is None or not len(warmup[0]) else warmup[1]
    clock = warm_start_clock(times, warm_times)
    router = make(clock)
    if warmup is not None and warm_times is not None:
        _drive(router, warmup[0], warm_times, clock, load)
        times = after_warmup(times, warm_times, clock)
    full, latency, decisions = _drive(router, log, times, clock, load)
    return PolicyRun(name, full, latency, decisions, router.stats())


def warm_start_clock(times: np.ndarray, warm_times: np.ndarray | None) -> ManualClock:
    """The router's clock, at the start of the warm-up day when there is one, else of the day."""
    if warm_times is not None:
        return ManualClock(float(warm_times[0]))
    return ManualClock(float(times[0]) if len(times) else 0.0)


def after_warmup(times: np.ndarray, warm_times: np.ndarray, clock: ManualClock) -> np.ndarray:
    """The replayed day's arrivals moved to start one mean gap after the warm-up day ended."""
    return times - times[0] + clock.now() + (warm_times[-1] - warm_times[0]) / max(len(warm_times), 1)


def _drive(
    router: Router, log: ScoredLog, times: np.ndarray, clock: ManualClock, load: LoadModel
) -> tuple[np.ndarray, np.ndarray, list[Decision]]:
    servers = FifoServers(load.cores)
    feedback = RoutingFeedback(router)
    full = np.zeros(len(log), dtype=bool)
    latency = np.zeros(len(log))
    decisions = []
    for i in range(len(log)):
        clock.advance(max(0.0, float(times[i]) - clock.now()))
        ctx = RouteContext(
            request_id=f"{id(log)}-{i}",
            surface=log.surface_names[i],
            segment=log.segments[i],
            deadline_left_s=None,
            request=log.features[i],
            candidates=log.candidates[i],
            k=log.k,
        )
        decision = router.decide(ctx)
        path = decision.path
        compute = float(log.cost_ms[path][i])
        latency[i] = servers.serve(float(times[i]), load.overhead_ms + log.retrieval_ms + compute)
        full[i] = path == "full"
        feedback.served(ctx, decision, compute, float(latency[i]), log.full_scores[i] if full[i] else None)
        revenue = float(log.realised_revenue[path][i])
        if revenue != 0.0:  # the served slate's realised revenue, reported as one conversion
            feedback.outcomes([Outcome(ctx.request_id, 0, "conversion", revenue)])
        decisions.append(decision)
    return full, latency, decisions


def oracle_mask(log: ScoredLog, budget_share: float) -> np.ndarray:
    """Full for the requests with the highest true uplift, while the compute fits the budget."""
    uplift = log.uplift
    extra = log.cost_ms["full"] - log.cost_ms["cheap"]
    room = budget_share * log.cost_ms["full"].sum() - log.cost_ms["cheap"].sum()
    order = np.argsort(-uplift, kind="stable")
    order = order[uplift[order] > 0]
    fits = np.cumsum(extra[order]) <= room
    full = np.zeros(len(log), dtype=bool)
    full[order[fits]] = True
    return full


def segment_oracle_mask(log: ScoredLog, budget_share: float) -> np.ndarray:
    """Full for whole segments in order of their true mean uplift per extra ms, the last one
    partly (its requests in time order), while the compute fits: the best a router that knew
    every segment's uplift exactly, but nothing finer, could do."""
    segments = np.array(log.segments)
    extra = log.cost_ms["full"] - log.cost_ms["cheap"]
    room = budget_share * log.cost_ms["full"].sum() - log.cost_ms["cheap"].sum()
    ranked = []
    for seg in np.unique(segments):
        members = np.flatnonzero(segments == seg)
        gain = float(log.uplift[members].mean())
        if gain > 0:
            ranked.append((gain / max(float(extra[members].mean()), 1e-9), members))
    ranked.sort(key=lambda r: -r[0])
    order = np.concatenate([m for _, m in ranked]) if ranked else np.zeros(0, dtype=np.int64)
    full = np.zeros(len(log), dtype=bool)
    full[order[np.cumsum(extra[order]) <= room]] = True
    return full


def best_static_tables(log: ScoredLog, budgets: tuple[float, ...]) -> dict[float, tuple[str, ...]]:
    """For each budget, the per-surface table (which surfaces get full) that earns the most within
    it, searched exhaustively over all tables and priced with the replay's own counterfactuals:
    the strongest static baseline an operator who had A/B-tested every surface could pick."""
    surfaces = sorted(set(log.surface_names))
    names = np.array(log.surface_names)
    gain = {s: float(log.uplift[names == s].sum()) for s in surfaces}
    extra = {s: float((log.cost_ms["full"] - log.cost_ms["cheap"])[names == s].sum()) for s in surfaces}
    base = float(log.cost_ms["cheap"].sum())
    total_full = float(log.cost_ms["full"].sum())
    out = {}
    for budget in budgets:
        best: tuple[float, tuple[str, ...]] = (0.0, ())
        for r in range(len(surfaces) + 1):
            for table in itertools.combinations(surfaces, r):
                if base + sum(extra[s] for s in table) > budget * total_full + 1e-9:
                    continue
                value = sum(gain[s] for s in table)
                if value > best[0]:
                    best = (value, table)
        out[budget] = best[1]
    return out


def table_mask(log: ScoredLog, full_surfaces: tuple[str, ...]) -> np.ndarray:
    return np.isin(np.array(log.surface_names), list(full_surfaces))


def summarise(log: ScoredLog, run: PolicyRun, load: LoadModel) -> dict[str, Any]:
    n = len(log)
    rev = np.where(run.full, log.expected_revenue["full"], log.expected_revenue["cheap"])
    realised = np.where(run.full, log.realised_revenue["full"], log.realised_revenue["cheap"])
    compute = np.where(run.full, log.cost_ms["full"], log.cost_ms["cheap"])
    per_request_ms = load.overhead_ms + log.retrieval_ms + float(compute.mean()) if n else 0.0
    names = np.array(log.surface_names)
    by_surface = {
        s: {
            "revenue_per_inference": float(rev[names == s].mean()),
            "full_share": float(run.full[names == s].mean()),
        }
        for s in sorted(set(log.surface_names))
    }
    return {
        "revenue": float(rev.sum()),
        "revenue_per_inference": float(rev.mean()) if n else 0.0,
        "realised_revenue": float(realised.sum()),
        "compute_ms": float(compute.sum()),
        "compute_share": float(compute.sum() / log.cost_ms["full"].sum()) if n else 0.0,
        "full_share": float(run.full.mean()) if n else 0.0,
        "latency_p50_ms": float(np.percentile(run.latency_ms, 50)) if n else 0.0,
        "latency_p99_ms": float(np.percentile(run.latency_ms, 99)) if n else 0.0,
        "cpu_ms_per_request": per_request_ms,
        "cost_per_1000_cpu_s": per_request_ms,
        "throughput_per_core": 1000.0 / per_request_ms if per_request_ms else 0.0,
        "by_surface": by_surface,
    }
