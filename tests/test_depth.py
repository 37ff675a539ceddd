"""Cascade depth: the slate of each depth, the depth router on an injected clock, and the replay's
depth baselines (knapsack tables, the per-request oracle) against brute force."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm.schema import DenseFeature, FeatureSchema, SparseFeature
from embeddings.clock import ManualClock
from loadtest.depth_sim import DepthCurves, fixed_column, group_table, oracle_columns, table_columns
from serving.domain import Candidates, Decision, RequestFeatures
from serving.ranking import cheap_order, cheap_slate
from serving.revenue.local_redis import RedisProcess
from serving.routing.config import DepthConfig
from serving.routing.controller import ControllerConfig
from serving.routing.depth import DepthRouter, depth_values
from serving.routing.router import RouteContext
from serving.routing.shared import MemoryLearning, RedisLearning
from serving.routing.uplift import slate_values

SCHEMA = FeatureSchema(
    name="tiny",
    sparse=(
        SparseFeature("user_id", 1000, 4, "user"),
        SparseFeature("user_tier", 2, 4, "user"),
        SparseFeature("surface", 2, 4, "context"),
        SparseFeature("item_id", 60, 4, "item"),
    ),
    dense=(DenseFeature("activity", "user"),),
)
SURFACES = ("shop", "chat")
K, SLATE = 40, 5
GRID = (0, 5, 10, 20, 40)


# -- the slate of each depth -----------------------------------------------------------------

scores = st.lists(st.floats(-4, 4, allow_nan=False), min_size=SLATE, max_size=60)


@settings(max_examples=60, deadline=None)
@given(scores, st.integers(0, 2**31 - 1))
def test_deeper_never_values_less_and_the_ends_are_the_two_paths(retrieval: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = len(retrieval)
    retrieval_scores = np.array(retrieval, dtype=np.float32)
    values = rng.uniform(0.5, 20.0, size=n)
    full = rng.uniform(0.0, 1.0, size=n)
    order = cheap_order(retrieval_scores, values)
    assert sorted(order.tolist()) == list(range(n))
    assert order[:SLATE].tolist() == cheap_slate(retrieval_scores, values, SLATE).tolist()
    depths = np.array([0, SLATE, *range(SLATE + 1, n + 1, 3), n])
    v = depth_values(order, full, values, depths, SLATE)
    assert np.all(np.diff(v) >= -1e-9)  # the full model's own value of its slate only grows
    v_full, v_cheap = slate_values(full, retrieval_scores, values, SLATE)
    assert v[0] == pytest.approx(v_cheap) and v[-1] == pytest.approx(v_full)


# -- the depth router --------------------------------------------------------------------------


def _ctx(i: int, surface: int, tier: int, rng: np.random.Generator, wait_s: float = 0.0) -> RouteContext:
    request = RequestFeatures(
        sparse=np.array([i % 1000, tier, surface], dtype=np.int64),
        dense=np.array([rng.normal()], dtype=np.float32),
        user_vector=np.zeros(4, dtype=np.float32),
        segment=f"{SURFACES[surface]}/{tier}",
    )
    ids = rng.choice(60, size=K, replace=False).astype(np.int64)
    cands = Candidates(ids, rng.normal(size=K).astype(np.float32))
    return RouteContext(f"r{i}", SURFACES[surface], request.segment, None, request, cands, SLATE, wait_s)


def _full_probs(ctx: RouteContext) -> np.ndarray:
    """Shop: the full model finds its best items deep in the cheap order (ranks 20-40); chat:
    it agrees with the cheap order, so depth buys nothing."""
    assert ctx.candidates is not None
    base = 1.0 / (1.0 + np.exp(-ctx.candidates.retrieval_scores.astype(np.float64)))
    probs = 0.3 * base
    if ctx.surface == "shop":
        order = cheap_order(ctx.candidates.retrieval_scores, None)
        probs[order[20:25]] = 0.9
    return probs


def _cost(depth: int) -> float:
    return 0.05 + depth / K  # a fixed part, paid at any depth, and one per candidate


def _router(budget: float, epsilon: float = 0.02) -> tuple[DepthRouter, ManualClock]:
    clock = ManualClock()
    controller = ControllerConfig(budget_share=budget, window_s=0.5)
    config = DepthConfig(depths=GRID, epsilon=epsilon, controller=controller, cold_start_labels=60)
    return DepthRouter(config, SCHEMA, None, clock, rng_seed=5), clock


def _serve(router: DepthRouter, clock: ManualClock, n: int, rng: np.random.Generator, start: int = 0) -> list:
    out = []
    for i in range(start, start + n):
        clock.advance(0.002)
        ctx = _ctx(i, int(rng.random() < 0.5), int(rng.random() < 0.3), rng)
        d = router.decide(ctx)
        assert d.depth is not None and (d.depth == 0) == (d.path == "cheap")
        router.observe(ctx.segment, d.path, _cost(d.depth), 1.0, d.depth)
        assert ctx.candidates is not None
        order = cheap_order(ctx.candidates.retrieval_scores, None)
        # The caller reports what the shown slate earned: here its value under the true probabilities.
        revenue = depth_values(order, _full_probs(ctx), None, np.array([d.depth]), SLATE)[0]
        router.observe_outcome(ctx.segment, d.path, float(revenue), d.propensity)
        if d.depth:
            head = order[: d.depth]
            scored = ctx.candidates.take(head)
            sub = RouteContext(ctx.request_id, ctx.surface, ctx.segment, None, ctx.request, scored, SLATE)
            router.observe_scored(sub, _full_probs(ctx)[head])
        out.append((ctx, d))
    return out


def test_depth_router_spends_its_budget_going_deep_where_depth_pays() -> None:
    router, clock = _router(budget=0.5)
    rng = np.random.default_rng(1)
    _serve(router, clock, 3000, rng)
    served = _serve(router, clock, 2000, rng, start=3000)
    depth = np.array([d.depth for _, d in served])
    shop = np.array([ctx.surface == "shop" for ctx, _ in served])
    spend = np.mean([_cost(int(m)) for m in depth]) / _cost(K)
    assert spend == pytest.approx(0.5, abs=0.08)
    # Shop's gain lives at ranks 20-40: it gets depth 40; chat gains nothing from any depth.
    assert np.mean(depth[shop] == K) > 0.8 and np.mean(depth[~shop] == 0) > 0.8
    assert all(0.0 < d.propensity <= 1.0 and d.reason for _, d in served)
    stats = router.stats()
    assert stats["action"] == "depth" and stats["value_model"]["labels"] > 0
    shop_mix = stats["segments"]["shop/0"]["depth_mix"]
    assert shop_mix.get("40", 0.0) > 0.5 and sum(shop_mix.values()) == pytest.approx(1.0)


def test_a_smaller_budget_goes_shallower_and_queueing_never_makes_a_request_deeper() -> None:
    mean_depth = {}
    for budget in (0.2, 0.6):
        router, clock = _router(budget)
        rng = np.random.default_rng(2)
        _serve(router, clock, 2500, rng)
        mean_depth[budget] = np.mean([d.depth for _, d in _serve(router, clock, 1000, rng, start=2500)])
    assert mean_depth[0.2] < mean_depth[0.6]

    router, clock = _router(0.6, epsilon=0.0)
    rng = np.random.default_rng(3)
    _serve(router, clock, 2500, rng)
    moved = 0
    for i in range(300):
        ctx = _ctx(10_000 + i, 0, 0, rng)
        calm = router.decide(ctx)
        busy = router.decide(dataclasses.replace(ctx, queue_delay_s=0.05))
        if calm.lam == busy.lam:
            assert busy.depth is not None and calm.depth is not None and busy.depth <= calm.depth
            moved += busy.depth < calm.depth
    assert moved > 0


# -- shared learning and admission's ladder -----------------------------------------------------


def _predictions(router: DepthRouter, n: int = 50) -> np.ndarray:
    rng = np.random.default_rng(11)
    out = []
    for i in range(n):
        ctx = _ctx(20_000 + i, i % 2, 0, rng)
        assert ctx.request is not None and ctx.candidates is not None
        ev = -np.sort(-1.0 / (1.0 + np.exp(-ctx.candidates.retrieval_scores.astype(np.float64))))
        feats = router.featurizer.transform(ctx.request, ctx.candidates, SLATE, ev)
        out.append([m.predict(*feats) for m in router.models])  # model units: the scale is per replica
    return np.array(out)


def test_a_replica_that_served_nothing_learns_what_a_peer_learnt_through_redis(
    own_redis_node: RedisProcess,
) -> None:
    url = f"redis://{own_redis_node.address}/0"
    taught, clock = _router(0.5)
    fresh, _ = _router(0.5)
    taught.share_through(RedisLearning(url, "t:router:", replica="a"))
    fresh.share_through(RedisLearning(url, "t:router:", replica="b"))
    _serve(taught, clock, 1500, np.random.default_rng(4))
    for m in taught.models:
        m.refit()
    assert fresh.labels == 0 and np.all(_predictions(fresh) == 0.0) and np.any(_predictions(taught) != 0.0)
    taught.share_state()
    for _ in range(3):  # exchanging again replaces the peers' part: nothing counted twice
        fresh.share_state()
        assert fresh.labels == taught.labels > 0
        # The same system solved from another start (conjugate gradients, 100 steps at most).
        taught_says = _predictions(taught)
        np.testing.assert_allclose(_predictions(fresh), taught_says, atol=0.01 * np.abs(taught_says).max())
    assert fresh.stats()["value_model"]["peers"] == 1

    # The backend gone: the exchange fails quietly and the replica keeps what it had.
    own_redis_node.kill()
    before = _predictions(fresh)
    fresh.share_state()
    assert fresh.labels == taught.labels and np.array_equal(_predictions(fresh), before)
    assert fresh.decide(_ctx(1, 0, 0, np.random.default_rng(0))).depth is not None


def test_peers_add_their_own_statistics_only() -> None:
    board: dict[str, bytes] = {}
    a, clock_a = _router(0.5)
    b, clock_b = _router(0.5)
    a.share_through(MemoryLearning(board, "a"))
    b.share_through(MemoryLearning(board, "b"))
    _serve(a, clock_a, 800, np.random.default_rng(6))
    _serve(b, clock_b, 800, np.random.default_rng(7))
    for _ in range(2):
        a.share_state()
        b.share_state()
    own = a.models[-1].labels + b.models[-1].labels
    assert a.labels == b.labels == own  # each counts the other's labels once, its own once


def test_admission_steps_down_to_the_deepest_depth_that_fits_before_cheap() -> None:
    router, clock = _router(0.5)
    _serve(router, clock, 400, np.random.default_rng(8))
    costs = router.costs.ms()
    deep = Decision("full", router.name, "test", depth=GRID[-1])
    assert router.fit_budget(deep, costs[-1] / 1000.0 + 1e-6) is deep
    budget = costs[2] / 1000.0 + 1e-6  # room for depth GRID[2], not for any deeper one
    shallow = router.fit_budget(deep, budget)
    assert shallow is not None and shallow.path == "full"
    assert shallow.depth == max(m for m, c in zip(GRID, costs, strict=True) if m > 0 and c / 1000.0 <= budget)
    assert "shallower" in shallow.reason and shallow.propensity == 1.0
    assert router.fit_budget(deep, costs[1] / 1000.0 * 0.5) is None  # nothing fits: cheap


# -- the replay's depth baselines --------------------------------------------------------------


def _curves(rng: np.random.Generator, n: int = 60) -> DepthCurves:
    depths = np.array([0, 10, 20, 50, 100])
    cost = np.array([0.01, 0.05, 0.07, 0.12, 0.2])
    gain = rng.uniform(0, 1, size=(n, 1)) * np.array([0.0, 0.5, 0.7, 0.9, 1.0])
    expected = 1.0 + gain + rng.normal(0, 0.02, size=(n, len(depths)))
    return DepthCurves(depths, expected, expected.copy(), cost, [np.arange(100)] * n)


def test_depth_tables_are_the_exact_best_within_the_budget() -> None:
    rng = np.random.default_rng(4)
    curves = _curves(rng)
    groups = [f"g{i % 3}" for i in range(len(curves.expected))]
    names = sorted(set(groups))
    for budget in (0.15, 0.3, 0.6):
        table = group_table(curves, groups, budget)
        best = -np.inf
        for combo in itertools.product(range(len(curves.depths)), repeat=len(names)):
            columns = table_columns(groups, dict(zip(names, combo, strict=True)))
            if curves.cost_ms[columns].mean() <= budget * curves.cost_ms[-1] + 1e-12:
                best = max(best, curves.expected[np.arange(len(groups)), columns].sum())
        got = table_columns(groups, table)
        assert curves.cost_ms[got].mean() <= budget * curves.cost_ms[-1] + 1e-9
        assert curves.expected[np.arange(len(groups)), got].sum() == pytest.approx(best)


def test_the_per_request_oracle_fits_the_budget_and_beats_any_single_depth() -> None:
    rng = np.random.default_rng(5)
    curves = _curves(rng, n=200)
    rows = np.arange(200)
    for budget in (0.1, 0.3, 0.5, 1.0):
        oracle = oracle_columns(curves, budget)
        assert curves.cost_ms[oracle].mean() <= budget * curves.cost_ms[-1] + 1e-9
        fixed = fixed_column(curves, budget)
        assert curves.cost_ms[fixed] <= budget * curves.cost_ms[-1] + 1e-12
        assert curves.expected[rows, oracle].sum() >= curves.expected[:, fixed].sum() - 1e-9
