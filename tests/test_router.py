"""Routing policies, the lambda controller and the value model, on an injected clock."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dlrm.schema import DenseFeature, FeatureSchema, SparseFeature
from embeddings.clock import ManualClock
from loadtest.offpolicy import LoggedData, estimate
from serving.domain import Candidates, Outcome, RequestFeatures
from serving.routing.config import POLICY_NAMES, RouterConfig, StaticTiersConfig, ValueAwareConfig
from serving.routing.controller import ControllerConfig, LambdaController
from serving.routing.policies import make_router
from serving.routing.router import FixedRouter, RouteContext
from serving.routing.uplift import FeaturizerConfig, OnlineRidge, RouteFeaturizer, slate_values
from serving.routing.value_aware import ValueAwareRouter

SCHEMA = FeatureSchema(
    name="tiny",
    sparse=(
        SparseFeature("user_id", 1000, 4, "user"),
        SparseFeature("user_tier", 2, 4, "user"),
        SparseFeature("surface", 2, 4, "context"),
        SparseFeature("item_id", 50, 4, "item"),
    ),
    dense=(DenseFeature("activity", "user"),),
)
SURFACES = ("shop", "chat")
N_ITEMS = 50


def _ctx(
    i: int, surface: int, tier: int, rng: np.random.Generator, deadline: float | None = None
) -> RouteContext:
    request = RequestFeatures(
        sparse=np.array([i % 1000, tier, surface], dtype=np.int64),
        dense=np.array([rng.normal()], dtype=np.float32),
        user_vector=np.zeros(4, dtype=np.float32),
        segment=f"{SURFACES[surface]}/{tier}",
    )
    ids = rng.choice(N_ITEMS, size=20, replace=False).astype(np.int64)
    cands = Candidates(ids, rng.normal(size=20).astype(np.float32))
    return RouteContext(f"r{i}", SURFACES[surface], request.segment, deadline, request, cands, k=5)


def _full_scores(ctx: RouteContext, gain: float) -> np.ndarray:
    """Full-model probabilities whose best slate beats the retrieval slate by about ``gain``."""
    assert ctx.candidates is not None
    base = 1.0 / (1.0 + np.exp(-ctx.candidates.retrieval_scores.astype(np.float64)))
    boost = np.zeros_like(base)
    worst = np.argsort(ctx.candidates.retrieval_scores)[:5]  # the cheap slate never shows these
    boost[worst] = gain
    return np.clip(base * 0.5 + boost, 0.0, 1.0).astype(np.float32)


# -- fixed policies ----------------------------------------------------------------------------


def test_fixed_and_static_policies_send_a_request_with_no_time_left_to_cheap() -> None:
    rng = np.random.default_rng(0)
    for router in (
        FixedRouter("full"),
        make_router(RouterConfig("static_tiers", static_tiers=StaticTiersConfig(full_surfaces=("shop",)))),
    ):
        assert router.decide(_ctx(1, 0, 0, rng)).path == "full"
        late = router.decide(_ctx(2, 0, 0, rng, deadline=0.001))
        assert late.path == "cheap" and "deadline" in late.reason
    static = make_router(
        RouterConfig("static_tiers", static_tiers=StaticTiersConfig(full_surfaces=("shop",)))
    )
    assert static.decide(_ctx(3, 1, 0, rng)).path == "cheap"


def test_make_router_knows_every_policy_and_rejects_others() -> None:
    for name in POLICY_NAMES:
        assert make_router(RouterConfig(name), schema=SCHEMA).name == name
    with pytest.raises(ValueError, match="policy"):
        RouterConfig("bandit")
    with pytest.raises(ValueError, match="schema"):
        make_router(RouterConfig("value_aware"))


@pytest.mark.parametrize(
    "bad",
    [
        {"epsilon": 1.5},
        {"max_cheap_share": 0.0},
        {"l2": 0.0},
        {"refit_every": 0},
        {"value_window": 3},
        {"min_full_deadline_ms": -1.0},
    ],
)
def test_value_aware_config_rejects_bad_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ValueAwareConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [{"budget_share": 0.0}, {"window_s": 0.0}, {"ki": 0.0}, {"max_boost": 2.0}, {"p99_target_ms": -1.0}],
)
def test_controller_config_rejects_bad_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ControllerConfig(**bad)  # type: ignore[arg-type]


# -- the controller ----------------------------------------------------------------------------


def _drive_plant(
    controller: LambdaController,
    clock: ManualClock,
    rates: list[float],
    seconds_each: float,
    feed_forward: float,
    latency: bool = False,
) -> list[tuple[float, float, float]]:
    """A replica whose full path costs 1 ms and cheap 0.05 ms; a request takes the full path with
    the probability the controller asks for. Returns (rate, spend ms/s, p99) per second."""
    rng = np.random.default_rng(1)
    out = []
    for rate in rates:
        for _ in range(int(seconds_each)):
            spent, lat = 0.0, []
            n = int(rate)
            for _ in range(n):
                clock.advance(1.0 / n)
                share = controller.tick(feed_forward)
                full = rng.random() < share
                cost = 1.0 if full else 0.05
                busy = rate * (share * 1.0 + 0.05) / 1000.0  # utilisation of one core
                ms = cost + (rng.exponential(2.0 / max(1e-3, 1.0 - min(busy, 0.99))) if latency else 0.0)
                controller.record(cost, 1.0, ms)
                spent += cost
                lat.append(ms)
            out.append((rate, spent, float(np.percentile(lat, 99))))
    return out


def test_controller_corrects_a_wrong_feed_forward_to_hold_the_budget_share() -> None:
    clock = ManualClock()
    controller = LambdaController(ControllerConfig(budget_share=0.3, window_s=0.5), clock)
    # The router believes 60% full spends the budget; the truth is about 25%.
    trace = _drive_plant(controller, clock, [400.0], 40, feed_forward=0.6)
    settled = np.mean([spent / rate for rate, spent, _ in trace[-10:]])
    assert settled == pytest.approx(0.3, rel=0.1)
    assert controller.correction < -0.2


def test_controller_holds_a_cpu_budget_when_load_steps_up_and_down() -> None:
    clock = ManualClock()
    controller = LambdaController(
        ControllerConfig(budget_share=None, budget_ms_per_s=300.0, window_s=0.5), clock
    )
    trace = _drive_plant(controller, clock, [400.0, 1000.0, 400.0], 25, feed_forward=1.0)
    for phase in range(3):
        tail = trace[phase * 25 + 15 : (phase + 1) * 25]
        spend = np.mean([spent for _, spent, _ in tail])
        rate = tail[0][0]
        if rate * 1.05 <= 300.0:  # the budget cannot bind: everyone gets the full path
            assert spend == pytest.approx(rate * 1.0, rel=0.1)
        else:
            assert spend == pytest.approx(300.0, rel=0.1), f"phase {phase}: {spend:.0f} ms/s at {rate}/s"
    assert controller.share > 0.6  # back at low load, the share recovered


def test_controller_holds_the_p99_target_under_a_load_step() -> None:
    clock = ManualClock()
    controller = LambdaController(
        ControllerConfig(budget_share=None, p99_target_ms=20.0, window_s=0.5, min_window_requests=50), clock
    )
    trace = _drive_plant(controller, clock, [300.0, 800.0], 30, feed_forward=1.0, latency=True)
    low = np.mean([p99 for _, _, p99 in trace[20:30]])
    high = np.mean([p99 for _, _, p99 in trace[50:60]])
    assert low < 20.0  # light load: under target with (nearly) everyone on the full path
    assert high == pytest.approx(20.0, rel=0.25)
    assert controller.share < 0.9


# -- value-aware routing -------------------------------------------------------------------------


def _router(clock: ManualClock, **changes: object) -> ValueAwareRouter:
    controller = changes.pop("controller", ControllerConfig(budget_share=0.5, window_s=1.0))
    config = ValueAwareConfig(controller=controller, **changes)  # type: ignore[arg-type]
    return ValueAwareRouter(config, SCHEMA, np.ones(N_ITEMS), clock, rng_seed=3)


def _serve(
    router: ValueAwareRouter, clock: ManualClock, n: int, rng: np.random.Generator, start: int = 0
) -> list:
    """Shop requests gain a lot from the full path, chat requests little; outcomes follow."""
    out = []
    for i in range(start, start + n):
        clock.advance(0.002)
        surface = int(rng.random() < 0.5)
        ctx = _ctx(i, surface, int(rng.random() < 0.3), rng)
        d = router.decide(ctx)
        cost = 1.0 if d.path == "full" else 0.05
        router.observe(ctx.segment, d.path, cost, cost + 1.0)
        gain = 0.6 if surface == 0 else 0.02
        if d.path == "full":
            router.observe_scored(ctx, _full_scores(ctx, gain))
        revenue = (1.0 + (gain if d.path == "full" else 0.0)) * rng.exponential(1.0)
        router.observe_outcome(ctx.segment, d.path, revenue, d.propensity)
        out.append((ctx, d))
    return out


def test_value_aware_spends_the_budget_on_the_surface_that_gains() -> None:
    clock = ManualClock()
    router = _router(clock)
    rng = np.random.default_rng(0)
    _serve(router, clock, 3000, rng)
    served = _serve(router, clock, 2000, rng, start=3000)
    full = np.array([d.path == "full" for _, d in served])
    shop = np.array([ctx.surface == "shop" for ctx, _ in served])
    cost = np.where(full, 1.0, 0.05)
    assert cost.sum() / len(cost) == pytest.approx(0.5, rel=0.12)
    assert full[shop].mean() > 0.85 > 0.2 > full[~shop].mean()
    d = served[-1][1]
    assert d.policy == "value_aware_binary" and d.lam >= 0 and d.reason
    stats = router.stats()
    assert stats["segments"]["shop/0"]["model_uplift"] > stats["segments"]["chat/0"]["model_uplift"]
    assert 0.0 <= stats["budget_use"] < 2.0


def test_queueing_delay_raises_lambda_and_moves_requests_down_never_up() -> None:
    clock = ManualClock()
    router = _router(clock, epsilon=0.0, pressure_ms=10.0)
    rng = np.random.default_rng(1)
    _serve(router, clock, 3000, rng)  # the value model has learnt: shop gains, chat hardly
    probe = [_ctx(10_000 + i, int(rng.random() < 0.5), 0, rng) for i in range(400)]

    def decided(delay_s: float) -> list:
        return [router.decide(dataclasses.replace(ctx, queue_delay_s=delay_s)) for ctx in probe]

    idle, queued = decided(0.0), decided(0.006)  # lambda x 1.6 at a 6 ms wait
    # The rule's own choices: the guardrail (a segment's cheap share at its cap) overrides it.
    ruled = np.array(
        [not (a.reason + b.reason).count("guardrail") for a, b in zip(idle, queued, strict=True)]
    )
    full_idle = np.array([d.path == "full" for d in idle]) & ruled
    full_queued = np.array([d.path == "full" for d in queued]) & ruled
    uplift = np.array([d.estimated_uplift for d in idle])
    assert ruled.mean() > 0.8
    assert full_queued.sum() < 0.7 * full_idle.sum()  # load moves requests down
    assert not np.any(full_queued & ~full_idle)  # and never up
    moved = full_idle & ~full_queued
    # Those moved are the ones whose uplift no longer pays the dearer millisecond.
    threshold = np.array([d.lam * 1.6 for d in queued]) * router.costs.extra_ms
    assert np.all(uplift[moved] <= threshold[moved] + 1e-9)
    assert any("full path wait 6.0 ms" in d.reason for d in queued)


def test_exploration_propensities_match_the_empirical_shares_and_make_ips_unbiased() -> None:
    clock = ManualClock()
    # Never fed scores, the value model never fits: the rule always says cheap, so a request is
    # full only through exploration, with probability epsilon / 2.
    router = _router(clock, epsilon=0.2, max_cheap_share=1.0, cold_start_labels=0)
    rng = np.random.default_rng(5)
    paths, props, rewards, segments = [], [], [], []
    for i in range(6000):
        clock.advance(0.002)
        ctx = _ctx(i, int(rng.random() < 0.5), 0, rng)
        d = router.decide(ctx)
        paths.append(d.path == "full")
        props.append(d.propensity)
        # Known truth: full earns 2.0 on average, cheap 1.0.
        rewards.append(rng.exponential(2.0 if d.path == "full" else 1.0))
        segments.append(ctx.segment)
    full = np.array(paths)
    prop = np.array(props)
    assert np.allclose(prop[full], 0.1) and np.allclose(prop[~full], 0.9)
    assert full.mean() == pytest.approx(0.1, abs=0.015)
    data = LoggedData(
        surface=np.array([s.split("/")[0] for s in segments], dtype=object),
        segment=np.array(segments, dtype=object),
        full=full,
        propensity=prop,
        reward=np.array(rewards),
        compute_ms=np.zeros(len(full)),
    )
    est = estimate(data, np.ones(len(full)))
    assert abs(est["ips"] - 2.0) < 4 * est["ips_se"]
    assert abs(est["dr"] - 2.0) < 4 * est["dr_se"]
    assert estimate(data, np.zeros(len(full)))["ips"] == pytest.approx(1.0, abs=0.1)


def test_a_request_with_little_deadline_left_goes_cheap_deterministically() -> None:
    clock = ManualClock()
    router = _router(clock, epsilon=0.5, min_full_deadline_ms=8.0)
    rng = np.random.default_rng(2)
    for i in range(200):
        d = router.decide(_ctx(i, 0, 0, rng, deadline=0.004))
        assert d.path == "cheap" and d.propensity == 1.0 and "deadline" in d.reason
    assert router.decide(_ctx(999, 0, 0, rng, deadline=None)).reason != "deadline nearly spent"


def test_guardrail_caps_the_cheap_share_of_every_segment() -> None:
    clock = ManualClock()
    router = _router(clock, epsilon=0.0, max_cheap_share=0.8, cold_start_labels=0, guardrail_half_life=50.0)
    rng = np.random.default_rng(4)
    decisions = []
    for i in range(2000):
        clock.advance(0.002)
        ctx = _ctx(i, int(rng.random() < 0.5), 0, rng)
        decisions.append((ctx.segment, router.decide(ctx)))
    for seg in ("shop/0", "chat/0"):
        paths = [d.path for s, d in decisions[500:] if s == seg]
        cheap = np.mean([p == "cheap" for p in paths])
        assert cheap == pytest.approx(0.8, abs=0.03)
    assert any("guardrail" in d.reason for _, d in decisions)


# -- the value model ---------------------------------------------------------------------------


def test_online_ridge_recovers_a_sparse_linear_model() -> None:
    rng = np.random.default_rng(0)
    dim = 40
    truth = rng.normal(size=dim)
    model = OnlineRidge(dim, l2=1e-3, half_life=1e9, refit_every=100)
    for _ in range(3000):
        idx = np.sort(rng.choice(dim, size=6, replace=False))
        val = rng.normal(size=6)
        model.add(idx, val, float(truth[idx] @ val))
    model.refit()
    assert model.fits > 10
    assert np.abs(model.weights - truth).max() < 1e-3


def test_featurizer_indices_are_distinct_and_inside_the_dimension() -> None:
    fz = RouteFeaturizer(SCHEMA, FeaturizerConfig(max_cardinality=10), np.arange(1, N_ITEMS + 1.0))
    rng = np.random.default_rng(0)
    for i in range(50):
        ctx = _ctx(i, i % 2, (i // 2) % 2, rng)
        assert ctx.request is not None
        idx, val = fz.transform(ctx.request, ctx.candidates, ctx.k)
        assert len(set(idx.tolist())) == len(idx) == len(val)
        assert idx.min() >= 0 and idx.max() < fz.dim
        assert np.isfinite(val).all()
    assert fz.feature_names == ["user_tier", "surface"]  # user ids are too many to one-hot


def test_slate_values_rank_each_slate_as_served_and_price_both_with_the_full_model() -> None:
    probs = np.array([0.9, 0.1, 0.5, 0.2])
    retrieval = np.array([0.0, 3.0, 1.0, 2.0])  # two-tower P(click) 0.50, 0.95, 0.73, 0.88
    values = np.array([1.0, 1.0, 2.0, 1.0])
    disc = 1.0 / np.log2(np.arange(2) + 2.0)
    # By expected value: the full slate is items 2 (0.5 x 2), 0 (0.9); the cheap one 2 (1.46), 1 (0.95).
    v_full, v_cheap = slate_values(probs, retrieval, values, k=2)
    assert v_full == pytest.approx(disc @ np.array([0.5 * 2.0, 0.9]))
    assert v_cheap == pytest.approx(disc @ np.array([0.5 * 2.0, 0.1]))
    # By click (no values): full 0, 2; cheap 1, 3.
    v_full, v_cheap = slate_values(probs, retrieval, None, k=2)
    assert v_full == pytest.approx(disc @ np.array([0.9, 0.5]))
    assert v_cheap == pytest.approx(disc @ np.array([0.1, 0.2]))
    assert not math.isnan(v_full - v_cheap)


def test_reported_outcomes_reach_the_segment_that_served_them_once() -> None:
    clock = ManualClock()
    router = _router(clock, epsilon=0.0, cold_start_labels=0, max_cheap_share=1.0)
    rng = np.random.default_rng(6)
    ctx = _ctx(1, 0, 1, rng)
    decision = router.decide(ctx)
    sale = Outcome(ctx.request_id, 3, "conversion", 4.0)
    router.observe_outcomes([sale, sale, Outcome("unknown", 1, "conversion", 9.0)])
    router.observe_outcomes([sale])  # a retried report
    seg = router.stats()["segments"]["shop/1"]
    assert seg[f"revenue_per_inference_{decision.path}"] == pytest.approx(4.0)
    assert seg["ips_uplift"] == pytest.approx(4.0 if decision.path == "full" else -4.0)


def test_a_slow_first_call_does_not_skew_the_measured_cost_for_long() -> None:
    """A process's first scoring calls are slow (lazy initialisation); the cost estimate behind
    the budget's feed-forward share must forget them after a few requests, not a half-life."""
    router = _router(ManualClock(), cost_half_life=500.0)
    router.observe("shop/0", "cheap", 0.3, 1.0)  # 25x the steady cost, as measured in replay
    for _ in range(50):
        router.observe("shop/0", "cheap", 0.012, 1.0)
    assert router.stats()["cost_ms"]["cheap"] == pytest.approx(0.012 + 0.288 / 51, rel=0.02)
