"""Cascade depth in replay: what every depth would have earned and cost on each logged request,
and the depth policies run over them.

``depth_curves`` prices, for each request of a ``ScoredLog`` and each depth M of a grid, the slate
a cascade of depth M serves (the cheap order's top M re-ranked by the full model's expected
value, top k; ``serving.routing.depth``) from the world's ground truth, with one seeded realised
draw per slate. The full model's scores of all K candidates are in the log already, so no depth
needs scoring again for its revenue; its *cost* is measured: the full scorer timed on the top M
of sampled batches of requests (``time.thread_time``), scaled so that depth K costs what the
log measured for the full path (one unit with the binary policies).

Policies (``DepthRun``: a depth per request):

* ``fixed_depth@B``: one global depth, the most revenue within budget B;
* ``depth_table@B``: one depth per surface, the best table within B, searched exactly on the
  replayed day itself (a generous, hindsight baseline);
* ``oracle_segment@B``: one depth per segment (surface x tier) from their true curves, the best
  within B; ``oracle@B``: per request, ``argmax_M R_i(M) - lambda c(M)`` with the true revenue
  and lambda bisected to B (an upper bound: it knows every request's outcome in expectation);
* ``value_aware@B``: the online router (``serving.routing.depth.DepthRouter``), learning during
  the day from what a server would give it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlrm.world import World
from embeddings.clock import ManualClock
from loadtest.counterfactual import ScoredLog
from loadtest.policy_sim import FifoServers, LoadModel, after_warmup, warm_start_clock
from serving.domain import Candidates, Decision, Outcome
from serving.feedback import RoutingFeedback
from serving.ranking import cheap_order, ranking_keys, top_k
from serving.routing.router import RouteContext, Router

EVAL_DEPTHS = (0, 10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500)
"""Depths the baselines choose from (clipped to K): finer than the router's grid, to be generous."""


@dataclass
class DepthCurves:
    depths: np.ndarray
    """Evaluated depths, ascending: 0 (the cheap path) ... K (the full path)."""
    expected: np.ndarray
    """(requests, depths): ground-truth expected dollars of each depth's slate."""
    realised: np.ndarray
    """(requests, depths): one seeded draw of the dollars each slate earned."""
    cost_ms: np.ndarray
    """(depths,): measured CPU ms per request of each depth."""
    orders: list[np.ndarray]
    """Each request's candidate indices in cheap order."""
    measured_ms: dict[int, float] = field(default_factory=dict)
    """The raw timings behind ``cost_ms`` (ms per request), before scaling to the log's full cost."""

    def column(self, depth: int) -> int:
        return int(np.searchsorted(self.depths, depth))


def depth_curves(
    log: ScoredLog,
    world: World,
    full_score: Callable[[list[Any], list[Candidates]], list[np.ndarray]],
    *,
    depths: Iterable[int] = EVAL_DEPTHS,
    seed: int = 0,
    timing_batches: int = 40,
    batch: int = 16,
) -> DepthCurves:
    """Price every depth on every request of ``log`` and measure each depth's cost with
    ``full_score`` (the full scorer's ``score_batch``)."""
    n_cand = min(len(c.item_ids) for c in log.candidates)
    grid = np.unique(np.minimum(np.asarray(list(depths), dtype=np.int64), n_cand))
    values = log.item_values
    orders = []
    slates = np.zeros((len(grid), len(log), log.k), dtype=np.int64)
    for i, (cands, probs) in enumerate(zip(log.candidates, log.full_scores, strict=True)):
        cand_values = None if values is None else values[cands.item_ids]
        order = cheap_order(cands.retrieval_scores, cand_values)
        orders.append(order)
        gain = ranking_keys(probs, cand_values)
        for j, m in enumerate(grid):
            head = order[: max(int(m), log.k)]
            pick = head[: log.k] if m == 0 else head[top_k(gain[head], log.k)]
            slates[j, i] = cands.item_ids[pick]
    rng = np.random.default_rng([seed, 31337])
    expected = np.stack([world.expected_revenue(log.requests, slates[j]) for j in range(len(grid))], axis=1)
    realised = np.zeros_like(expected)
    for j in range(len(grid)):
        events = world.sample_outcomes(log.requests, slates[j], rng)
        realised[:, j] = [sum(e[2] for e in evs if e[1] == "conversion") for evs in events]
    measured = _measure(log, orders, grid, full_score, timing_batches, batch)
    # One unit with the log: depth K costs the full path's measured mean, depth 0 the cheap one's.
    full_ms, cheap_ms = float(log.cost_ms["full"].mean()), float(log.cost_ms["cheap"].mean())
    scale = full_ms / max(measured[int(grid[-1])], 1e-9)
    cost = np.array([cheap_ms] + [cheap_ms + measured[int(m)] * scale for m in grid[1:-1]] + [full_ms])
    return DepthCurves(grid, expected, realised, cost, orders, measured)


def _measure(
    log: ScoredLog,
    orders: list[np.ndarray],
    grid: np.ndarray,
    full_score: Callable[[list[Any], list[Candidates]], list[np.ndarray]],
    timing_batches: int,
    batch: int,
) -> dict[int, float]:
    """CPU ms per request of scoring the top M, for each depth M > 0 of the grid (interleaved
    over the same sampled batches, so that a drift of the machine hits every depth alike; each
    batch scored once untimed first, so that no depth pays the batch's cold cache misses)."""
    n = len(log)
    starts = np.linspace(0, max(n - batch, 0), num=min(timing_batches, max(n // batch, 1))).astype(int)
    spent = {int(m): 0.0 for m in grid if m > 0}
    counted = 0
    for start in starts:
        idx = range(int(start), min(int(start) + batch, n))
        feats = [log.features[i] for i in idx]
        full_score(feats, [log.candidates[i] for i in idx])  # rows in cache, as for hot items
        for m in spent:
            subsets = [log.candidates[i].take(orders[i][:m]) for i in idx]
            full_score(feats, subsets)  # the shapes' first call allocates; the second is timed
            t0 = time.thread_time()
            full_score(feats, subsets)
            spent[m] += time.thread_time() - t0
        counted += len(idx)
    return {m: s * 1000.0 / max(counted, 1) for m, s in spent.items()}


# -- policies -------------------------------------------------------------------------------


@dataclass
class DepthRun:
    name: str
    column: np.ndarray
    """Per request: index into ``DepthCurves.depths`` of the depth served."""
    latency_ms: np.ndarray
    decisions: list[Decision] = field(default_factory=list)
    router_stats: dict[str, Any] = field(default_factory=dict)


def fixed_column(curves: DepthCurves, budget: float) -> int:
    """The global depth with the most revenue whose compute fits ``budget``."""
    total = curves.expected.sum(axis=0)
    fits = curves.cost_ms <= budget * curves.cost_ms[-1] + 1e-12
    return int(np.flatnonzero(fits)[np.argmax(total[fits])]) if fits.any() else 0


def group_table(curves: DepthCurves, groups: list[str], budget: float) -> dict[str, int]:
    """One depth per group that earns the most while the day's compute fits ``budget``: an exact
    multiple-choice knapsack, merging the groups' (cost, revenue) options and keeping the
    Pareto front (few groups, few depths: small fronts)."""
    names = np.array(groups)
    front: list[tuple[float, float, dict[str, int]]] = [(0.0, 0.0, {})]
    for g in sorted(set(groups)):
        members = names == g
        rev = curves.expected[members].sum(axis=0)
        cost = curves.cost_ms * members.sum()
        merged = [(c + cost[j], r + rev[j], {**t, g: j}) for c, r, t in front for j in range(len(rev))]
        merged.sort(key=lambda x: (x[0], -x[1]))
        front = []
        best = -np.inf
        for c, r, t in merged:
            if r > best:
                front.append((c, r, t))
                best = r
    allowed = budget * curves.cost_ms[-1] * len(groups) + 1e-9
    feasible = [f for f in front if f[0] <= allowed]
    return max(feasible, key=lambda f: f[1])[2] if feasible else dict.fromkeys(set(groups), 0)


def table_columns(groups: list[str], table: dict[str, int]) -> np.ndarray:
    return np.array([table[g] for g in groups], dtype=np.int64)


def oracle_columns(curves: DepthCurves, budget: float) -> np.ndarray:
    """Per request ``argmax_j R_ij - lambda c_j`` with lambda bisected so the compute fits."""
    allowed = budget * curves.cost_ms[-1]

    def choose(lam: float) -> np.ndarray:
        return np.argmax(curves.expected - lam * curves.cost_ms, axis=1)

    if curves.cost_ms[choose(0.0)].mean() <= allowed:
        return choose(0.0)
    lo, hi = 0.0, 1.0
    while curves.cost_ms[choose(hi)].mean() > allowed and hi < 1e12:
        hi *= 4.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if curves.cost_ms[choose(mid)].mean() > allowed:
            lo = mid
        else:
            hi = mid
    return choose(hi)


def run_columns(
    curves: DepthCurves, name: str, columns: np.ndarray, times: np.ndarray, load: LoadModel, log: ScoredLog
) -> DepthRun:
    servers = FifoServers(load.cores)
    service = load.overhead_ms + log.retrieval_ms + curves.cost_ms[columns]
    latency = np.array([servers.serve(t, s) for t, s in zip(times, service, strict=True)])
    return DepthRun(name, columns, latency)


def run_depth_router(
    log: ScoredLog,
    curves: DepthCurves,
    name: str,
    make: Callable[[ManualClock], Router],
    times: np.ndarray,
    load: LoadModel,
    warmup: tuple[ScoredLog, DepthCurves, np.ndarray] | None = None,
) -> DepthRun:
    """Decide request by request with a fresh depth router, feeding back what a server would."""
    warm_times = None if warmup is None or not len(warmup[0]) else warmup[2]
    clock = warm_start_clock(times, warm_times)
    router = make(clock)
    if warmup is not None and warm_times is not None:
        _drive(router, warmup[0], warmup[1], warm_times, clock, load)
        times = after_warmup(times, warm_times, clock)
    columns, latency, decisions = _drive(router, log, curves, times, clock, load)
    return DepthRun(name, columns, latency, decisions, router.stats())


def _drive(
    router: Router,
    log: ScoredLog,
    curves: DepthCurves,
    times: np.ndarray,
    clock: ManualClock,
    load: LoadModel,
) -> tuple[np.ndarray, np.ndarray, list[Decision]]:
    servers = FifoServers(load.cores)
    feedback = RoutingFeedback(router)
    columns = np.zeros(len(log), dtype=np.int64)
    latency = np.zeros(len(log))
    decisions = []
    for i in range(len(log)):
        clock.advance(max(0.0, float(times[i]) - clock.now()))
        cands = log.candidates[i]
        ctx = RouteContext(
            request_id=f"{id(log)}-{i}",
            surface=log.surface_names[i],
            segment=log.segments[i],
            deadline_left_s=None,
            request=log.features[i],
            candidates=cands,
            k=log.k,
        )
        decision = router.decide(ctx)
        depth = (
            decision.depth
            if decision.depth is not None
            else (0 if decision.path == "cheap" else len(cands.item_ids))
        )
        j = curves.column(depth)
        columns[i] = j
        compute = float(curves.cost_ms[j])
        latency[i] = servers.serve(float(times[i]), load.overhead_ms + log.retrieval_ms + compute)
        scored = None
        if depth > 0:  # what the full model scored: the cheap order's top M, in that order
            head = curves.orders[i][:depth]
            ctx = RouteContext(
                ctx.request_id,
                ctx.surface,
                ctx.segment,
                None,
                ctx.request,
                cands.take(head),
                ctx.k,
            )
            scored = log.full_scores[i][head]
        feedback.served(ctx, decision, compute, float(latency[i]), scored)
        revenue = float(curves.realised[i, j])
        if revenue != 0.0:
            feedback.outcomes([Outcome(ctx.request_id, 0, "conversion", revenue)])
        decisions.append(decision)
    return columns, latency, decisions


def summarise_depth(log: ScoredLog, curves: DepthCurves, run: DepthRun, load: LoadModel) -> dict[str, Any]:
    n = len(log)
    rows = np.arange(n)
    rev = curves.expected[rows, run.column]
    realised = curves.realised[rows, run.column]
    compute = curves.cost_ms[run.column]
    full_total = curves.cost_ms[-1] * n
    counts = np.bincount(run.column, minlength=len(curves.depths))
    names = np.array(log.surface_names)
    return {
        "revenue": float(rev.sum()),
        "revenue_per_inference": float(rev.mean()) if n else 0.0,
        "realised_revenue": float(realised.sum()),
        "compute_ms": float(compute.sum()),
        "compute_share": float(compute.sum() / full_total) if n else 0.0,
        "mean_depth": float(curves.depths[run.column].mean()) if n else 0.0,
        "depth_mix": {str(int(m)): float(c / n) for m, c in zip(curves.depths, counts, strict=True) if c},
        "latency_p50_ms": float(np.percentile(run.latency_ms, 50)) if n else 0.0,
        "latency_p99_ms": float(np.percentile(run.latency_ms, 99)) if n else 0.0,
        "by_surface": {
            s: {
                "revenue_per_inference": float(rev[names == s].mean()),
                "mean_depth": float(curves.depths[run.column[names == s]].mean()),
            }
            for s in sorted(set(log.surface_names))
        },
    }
