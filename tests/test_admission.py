"""Admission and its ladder: full -> cheap -> fallback -> refused, never a queue to the deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.admission import Admission, AdmissionConfig
from serving.assembly import build_pipeline
from serving.batching import MicroBatcher
from serving.config import ScoringConfig, ServeConfig
from serving.domain import Query
from serving.edge import convert
from serving.edge.servicer import RETRY_PUSHBACK_KEY
from serving.errors import DeadlineExceeded, InvalidArgument, Overloaded
from serving.fallback import ALL_SEGMENTS, FallbackSlates
from serving.pipeline import Pipeline, PipelineConfig
from serving.routing.config import DepthConfig, RouterConfig
from serving.routing.controller import ControllerConfig
from serving.routing.depth import DepthCosts, DepthRouter

if TYPE_CHECKING:
    from conftest import ServerThread, ServingFolder

SURFACE = "ecommerce_recommendation"
GATE_S = 30.0


def _query(i: int, **kw: Any) -> Query:
    return Query(f"q{i}", user_id=i % 50, surface=SURFACE, sparse={}, dense={}, k=5, **kw)


# -- the batcher's prediction -------------------------------------------------------------


def test_batcher_predicts_no_wait_when_idle_and_the_queue_when_busy() -> None:
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        if not gate.wait(GATE_S):
            raise TimeoutError("the test never opened the gate")
        return items

    async def scenario() -> tuple[float, float, float, float]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(slow, pool, max_batch_size=1, timeout_s=0.0)
            idle = batcher.expected_wait_s()
            batcher.batch_wall_s = batcher.item_wall_s = 0.2  # as if learnt: 200 ms per batch
            first = asyncio.ensure_future(batcher.submit(1))
            while batcher.queue_depth or batcher._busy_since is None:
                await asyncio.sleep(0)  # yield until the first batch is computing
            busy = batcher.expected_wait_s()
            queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 5)]
            await asyncio.sleep(0)
            behind_three = batcher.expected_wait_s()
            gate.set()
            await asyncio.gather(first, *queued)
            after = batcher.expected_wait_s()
            await batcher.close()
            return idle, busy, behind_three, after

    idle, busy, behind_three, after = asyncio.run(scenario())
    assert idle == 0.0 and after == 0.0  # nothing ahead: starts at once, whatever was learnt
    assert 0.1 <= busy <= 0.2  # the running batch's remainder, at least half an average
    assert behind_three == pytest.approx(busy + 3 * 0.2, abs=0.05)


def test_without_a_timeout_batches_still_grow_from_what_queues_during_a_batch() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def slow(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 1 and not gate.wait(GATE_S):
            raise TimeoutError("the test never opened the gate")
        return [2 * i for i in items]

    async def scenario() -> list[Any]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(slow, pool, max_batch_size=4, timeout_s=0.0)
            first = asyncio.ensure_future(batcher.submit(0))
            while not sizes:
                await asyncio.sleep(0.001)  # the first batch (of one) is computing
            rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
            await asyncio.sleep(0)
            gate.set()
            results = await asyncio.gather(first, *rest)
            await batcher.close()
            return results

    results = asyncio.run(scenario())
    assert [r.value for r in results] == [2 * i for i in range(7)]
    assert sizes == [1, 4, 2]  # six queued behind the first: batches of the most allowed, in order
    assert [r.batch_size for r in results] == [1, 4, 4, 4, 4, 2, 2]


# -- arrival -------------------------------------------------------------------------------


def test_admission_refuses_beyond_in_flight_and_budgets_by_slo_and_deadline() -> None:
    admission = Admission(AdmissionConfig(slo_ms=40.0, max_in_flight=2, retry_after_ms=70))
    assert admission.admit(None) == pytest.approx(0.040)
    assert admission.admit(0.010) == pytest.approx(0.010)  # the deadline is the tighter
    admission.in_flight = 2
    with pytest.raises(Overloaded) as refused:
        admission.admit(1.0)
    assert refused.value.retry_after_ms == 70 and "in flight" in str(refused.value)
    admission.in_flight = 0
    with pytest.raises(DeadlineExceeded):
        admission.admit(0.0)
    assert admission.stats()["refused_in_flight"] == 1 and admission.stats()["refused_deadline"] == 1


def test_time_queued_before_the_server_saw_the_call_is_spent_from_the_slo() -> None:
    admission = Admission(AdmissionConfig(slo_ms=50.0))
    assert admission.admit(None, queued_s=0.020) == pytest.approx(0.030)
    with pytest.raises(Overloaded, match="queued 60 ms"):
        admission.admit(1.0, queued_s=0.060)
    assert admission.stats()["refused_queued"] == 1


@settings(max_examples=60, deadline=None)
@given(st.floats(1.0, 4e9, allow_nan=False), st.booleans())
def test_request_start_header_round_trips_and_bad_values_name_the_header(sent: float, bare: bool) -> None:
    ((key, value),) = convert.request_start_metadata(sent)
    assert key == convert.REQUEST_START_HEADER
    text = value.removeprefix("t=") if bare else value
    assert convert.request_start([("other", "x"), (key, text)]) == pytest.approx(sent, abs=1e-6)
    assert convert.request_start([("other", "x")]) is None
    for bad in ("soon", "t=", "t=-3", "t=nan"):
        with pytest.raises(InvalidArgument) as err:
            convert.request_start([(key, bad)])
        assert err.value.field == convert.REQUEST_START_HEADER


def test_a_loop_kept_busy_is_measured_and_new_requests_refused() -> None:
    async def scenario() -> tuple[float, float]:
        admission = Admission(AdmissionConfig(max_loop_lag_ms=10.0, lag_probe_ms=2.0))
        admission.start()
        for _ in range(20):  # each probe fires ~20 ms late: the loop is held by work
            end = time.perf_counter() + 0.02
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0)
        held = admission.loop_lag_s
        with pytest.raises(Overloaded):
            admission.admit(1.0)
        for _ in range(20):  # the loop breathes: every probe is on time again
            await asyncio.sleep(0.003)
        await admission.stop()
        return held, admission.loop_lag_s

    held, freed = asyncio.run(scenario())
    assert held > 0.010 and freed < 0.010


# -- the fallback tier -----------------------------------------------------------------------


def test_fallback_starts_from_the_seed_and_learns_each_segment() -> None:
    seed = np.array([0.1, 0.2, 0.3, 0.4])
    prices = np.array([4.0, 1.0, 1.0, 1.0])
    slates = FallbackSlates(seed, prices, per_segment=3)
    assert slates.slate("a|1", 2).item_ids.tolist() == [0, 3]  # 0.4 and 0.4 expected: id order
    for _ in range(50):  # segment a|1 shows item 1 with a high click probability
        slates.observe("a|1", np.array([1]), np.array([0.9]))
    slates.refresh()
    learnt = slates.slate("a|1", 3)
    assert learnt.item_ids[0] == 1 and learnt.probs[0] > 0.8
    assert learnt.keys == pytest.approx(learnt.probs * prices[learnt.item_ids])
    assert slates.slate("unseen|0", 3).item_ids[0] == 1  # the all-segments list learnt it too
    assert ALL_SEGMENTS in slates._slates and slates.stats()["segments"] == 2


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 19), st.floats(0.0, 1.0)), max_size=60),
    st.integers(1, 25),
)
def test_fallback_slates_are_distinct_sorted_and_at_most_k(shown: list[tuple[int, float]], k: int) -> None:
    rng = np.random.default_rng(0)
    slates = FallbackSlates(rng.random(20), rng.random(20) + 0.5, per_segment=10)
    for item, prob in shown:
        slates.observe("s|1", np.array([item]), np.array([prob]))
    slates.refresh()
    slate = slates.slate("s|1", k)
    assert len(slate.item_ids) == min(k, 10) == len(set(slate.item_ids.tolist()))
    assert np.all(np.diff(slate.keys) <= 1e-12)
    assert np.all((slate.probs >= 0.0) & (slate.probs <= 1.0))


# -- the ladder, in a pipeline ---------------------------------------------------------------


class Gate:
    """Holds a scorer's or retriever's calls until opened (how the tests make a path busy)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self, *args: Any) -> Any:
        self.entered.set()
        if not self.opened.wait(GATE_S):
            raise TimeoutError("the test never opened the gate")
        return self.fn(*args)


def _pipeline(serving_assets: ServingFolder, **admission: Any) -> Pipeline:
    config = ServeConfig(
        scoring=ScoringConfig(precision="fp32", mlp_precision="fp32"),
        router=RouterConfig(policy="always_full"),
        pipeline=PipelineConfig(admission=AdmissionConfig(**admission)),
    )
    return build_pipeline(serving_assets.load(), config)


async def _while_full_path_busy(pipeline: Pipeline, n: int) -> tuple[list[Any], Any]:
    for i in range(3):  # warm: the batcher learns what a batch costs
        await pipeline.recommend(_query(i))
    scorer = pipeline.scorers["full"]
    gate = Gate(scorer.score_batch)
    scorer.score_batch = gate  # type: ignore[method-assign]
    batcher = pipeline._batchers["full"]
    batcher.batch_wall_s = batcher.item_wall_s = 1.0  # as if a batch took a second
    held = asyncio.ensure_future(pipeline.recommend(_query(100)))
    while not gate.entered.is_set():
        await asyncio.sleep(0.001)
    results = await asyncio.gather(
        *(pipeline.recommend(_query(200 + i)) for i in range(n)), return_exceptions=True
    )
    gate.opened.set()
    return results, await held


@pytest.mark.integration
def test_requests_that_cannot_wait_for_the_full_path_are_degraded_not_queued(
    serving_assets: ServingFolder,
) -> None:
    async def scenario() -> tuple[list[Any], Any, dict[str, Any]]:
        pipeline = _pipeline(serving_assets, slo_ms=200.0)
        try:
            results, held = await _while_full_path_busy(pipeline, 4)
            return results, held, pipeline.routing_stats()
        finally:
            await pipeline.close()

    results, held, stats = asyncio.run(scenario())
    assert held.path == "full"
    assert [r.path for r in results] == ["cheap"] * 4
    assert all(r.decision.reason.startswith("degraded: full path wait") for r in results)
    assert all(len(r.item_ids) == 5 for r in results)
    assert stats["admission"]["degraded"] == 4 and stats["admission"]["answered_cheap"] == 4


@pytest.mark.integration
def test_a_deep_request_that_cannot_wait_goes_shallower_before_cheap(serving_assets: ServingFolder) -> None:
    """The ladder deep -> shallow -> cheap: with a batch running for ~100 ms of a 200 ms budget,
    a request the depth router sends deep (its depth costs 150 ms) is served at the deepest
    depth that still fits (50: 1 ms), on the full path."""

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        config = ServeConfig(
            scoring=ScoringConfig(precision="fp32", mlp_precision="fp32"),
            router=RouterConfig(
                policy="value_aware", depth=DepthConfig(controller=ControllerConfig(budget_share=1.0))
            ),
            pipeline=PipelineConfig(admission=AdmissionConfig(slo_ms=200.0)),
        )
        pipeline = build_pipeline(serving_assets.load(), config)
        try:
            for i in range(3):
                await pipeline.recommend(_query(i))
            router = pipeline.router
            assert isinstance(router, DepthRouter)
            router.costs = DepthCosts(router.grid, 1e6)  # what each depth costs here, measured
            for depth in router.grid[1:]:
                router.costs.record(depth, 1.0 if depth <= 50 else 150.0)
            gate = Gate(pipeline.scorers["full"].score_batch)
            pipeline.scorers["full"].score_batch = gate  # type: ignore[method-assign]
            batcher = pipeline._batchers["full"]
            held = asyncio.ensure_future(pipeline.recommend(_query(100)))
            while not gate.entered.is_set():
                await asyncio.sleep(0.001)
            batcher.batch_wall_s, batcher.item_wall_s = 0.1, 0.001
            asked = [asyncio.ensure_future(pipeline.recommend(_query(200 + i))) for i in range(4)]
            while sum(pipeline.admission.counts[c] for c in ("shallower", "degraded", "answered_cheap")) < 4:
                await asyncio.sleep(0.001)  # every request decided (the full path is still held)
            gate.opened.set()
            await held
            return await asyncio.gather(*asked), pipeline.routing_stats()
        finally:
            await pipeline.close()

    results, stats = asyncio.run(scenario())
    shallow = [r for r in results if r.decision.reason.startswith("shallower")]
    # The cold-start coin sends 99% deep; a request it sent cheap is counted as answered cheap.
    assert len(shallow) >= 3 and stats["admission"]["shallower"] == len(shallow)
    assert all(r.path == "full" and r.decision.depth == 50 and len(r.item_ids) == 5 for r in shallow)
    assert stats["admission"].get("degraded", 0) == 0


@pytest.mark.integration
def test_without_degradation_the_same_requests_are_refused_at_once(serving_assets: ServingFolder) -> None:
    async def scenario() -> list[Any]:
        pipeline = _pipeline(serving_assets, slo_ms=200.0, degrade=False)
        try:
            results, _ = await _while_full_path_busy(pipeline, 3)
            return results
        finally:
            await pipeline.close()

    results = asyncio.run(scenario())
    assert all(isinstance(r, Overloaded) and "full path wait" in str(r) for r in results)


@pytest.mark.integration
def test_when_retrieval_cannot_answer_in_time_the_fallback_tier_does(serving_assets: ServingFolder) -> None:
    async def scenario() -> tuple[Any, list[Any]]:
        pipeline = _pipeline(serving_assets, slo_ms=100.0)
        try:
            for i in range(3):
                await pipeline.recommend(_query(i))
            gate = Gate(pipeline.retriever.retrieve)
            pipeline.retriever.retrieve = gate  # type: ignore[method-assign]
            pipeline._retrieval.batch_wall_s = pipeline._retrieval.item_wall_s = 1.0
            held = asyncio.ensure_future(pipeline.recommend(_query(100)))
            while not gate.entered.is_set():
                await asyncio.sleep(0.001)
            answered = await asyncio.gather(*(pipeline.recommend(_query(200 + i)) for i in range(3)))
            gate.opened.set()
            return await held, answered
        finally:
            await pipeline.close()

    held, answered = asyncio.run(scenario())
    assert held.path == "full"
    for rec in answered:
        assert rec.path == "fallback" and rec.decision.reason.startswith("fallback: retrieval wait")
        assert len(rec.item_ids) == 5 and len(set(rec.item_ids.tolist())) == 5
        assert np.all(np.diff(rec.expected_values) <= 0)


@pytest.mark.integration
def test_a_refusal_is_resource_exhausted_with_a_retry_hint_over_grpc(
    serving_assets: ServingFolder, start_grpc_server: Any
) -> None:
    config = dataclasses.replace(
        ServeConfig(port=0, scoring=ScoringConfig(precision="fp32", mlp_precision="fp32")),
        pipeline=PipelineConfig(admission=AdmissionConfig(max_in_flight=1, retry_after_ms=123)),
    )
    server: ServerThread = start_grpc_server(serving_assets.load(), config).wait_serving()
    assert server.server is not None
    pipeline = server.server.pipeline
    assert pipeline is not None
    pipeline.admission.in_flight = 1  # as if one request were inside
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Recommend(pb.RecommendRequest(user_id=3, surface=SURFACE, k=5), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(refused.value.trailing_metadata())[RETRY_PUSHBACK_KEY] == "123"
        pipeline.admission.in_flight = 0
        request = pb.RecommendRequest(user_id=3, surface=SURFACE, k=5)
        assert len(stub.Recommend(request, timeout=10).items) == 5
        # A call that queued a second before the server saw it (its x-request-start says so).
        with pytest.raises(grpc.RpcError) as late:
            stub.Recommend(request, timeout=10, metadata=convert.request_start_metadata(time.time() - 1.0))
        assert late.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued" in late.value.details()
        with pytest.raises(grpc.RpcError) as bad:
            stub.Recommend(request, timeout=10, metadata=(("x-request-start", "yesterday"),))
        assert (
            bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-request-start" in bad.value.details()
        )
        sent_now = convert.request_start_metadata(time.time())
        assert len(stub.Recommend(request, timeout=10, metadata=sent_now).items) == 5
