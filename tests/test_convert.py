"""serving.edge.convert: request validation and proto <-> domain mapping (no network)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos.valuerank.v1 import recommender_pb2 as pb
from serving.config import ServeConfig
from serving.domain import MAX_CANDIDATES, MAX_K, Decision, Outcome, Recommendation, ScoreResult, Timings
from serving.edge import convert
from serving.errors import InvalidArgument
from serving.pipeline import PipelineConfig
from serving.routing.config import RouterConfig

SURFACE = "video_effects"


def _rec(**kw: object) -> pb.RecommendRequest:
    base: dict[str, object] = {"user_id": 1, "surface": SURFACE, "k": 10}
    base.update(kw)
    return pb.RecommendRequest(**base)  # type: ignore[arg-type]


def _field(call: object) -> str:
    with pytest.raises(InvalidArgument) as info:
        call()  # type: ignore[operator]
    return info.value.field


# -- RecommendRequest ----------------------------------------------------------------------


@given(st.integers(-(2**31), 2**31 - 1))
def test_k_is_accepted_exactly_in_1_to_max(k: int) -> None:
    if 1 <= k <= MAX_K:
        assert convert.recommend_query(_rec(k=k)).k == k
    else:
        assert _field(lambda: convert.recommend_query(_rec(k=k))) == "k"


@given(st.integers(-(2**31), 2**31 - 1))
def test_num_candidates_is_0_or_up_to_max(n: int) -> None:
    if 0 <= n <= MAX_CANDIDATES:
        assert convert.recommend_query(_rec(num_candidates=n)).num_candidates == n
    else:
        assert _field(lambda: convert.recommend_query(_rec(num_candidates=n))) == "num_candidates"


def test_empty_request_id_is_generated_uuid4_hex_and_given_one_is_kept() -> None:
    ids = {convert.recommend_query(_rec()).request_id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert convert.recommend_query(_rec(request_id="abc")).request_id == "abc"
    assert _field(lambda: convert.recommend_query(_rec(request_id="x" * 129))) == "request_id"


@given(st.sampled_from(["", "full", "cheap", "FULL", " cheap"]) | st.text(max_size=8))
def test_force_path_is_empty_full_or_cheap(text: str) -> None:
    if text in ("", "full", "cheap"):
        assert convert.recommend_query(_rec(force_path=text)).force_path == (text or None)
    else:
        assert _field(lambda: convert.recommend_query(_rec(force_path=text))) == "force_path"


@given(st.floats(width=32))
def test_dense_values_must_be_finite(value: float) -> None:
    request = _rec(context=pb.Context(dense={"hour_sin": value}))
    if math.isfinite(value):
        assert convert.recommend_query(request).dense == {"hour_sin": value}
    else:
        assert _field(lambda: convert.recommend_query(request)) == "context.dense[hour_sin]"


def test_user_id_and_surface_are_checked_and_context_is_copied() -> None:
    assert _field(lambda: convert.recommend_query(_rec(user_id=-3))) == "user_id"
    assert _field(lambda: convert.recommend_query(_rec(surface=""))) == "surface"
    query = convert.recommend_query(_rec(context=pb.Context(sparse={"hour": 3})), deadline=12.5)
    assert query.sparse == {"hour": 3} and query.deadline == 12.5 and query.force_path is None


# -- ScoreRequest --------------------------------------------------------------------------


def test_score_query_needs_1_to_max_items_and_defaults_to_full() -> None:
    request = pb.ScoreRequest(user_id=1, surface=SURFACE, item_ids=[4, 2, 9])
    query, path = convert.score_query(request)
    assert query.item_ids == (4, 2, 9) and path == "full"
    assert (
        convert.score_query(pb.ScoreRequest(user_id=1, surface=SURFACE, item_ids=[1], path="cheap"))[1]
        == "cheap"
    )
    assert _field(lambda: convert.score_query(pb.ScoreRequest(user_id=1, surface=SURFACE))) == "item_ids"
    too_many = pb.ScoreRequest(user_id=1, surface=SURFACE, item_ids=range(MAX_CANDIDATES + 1))
    assert _field(lambda: convert.score_query(too_many)) == "item_ids"
    bad_path = pb.ScoreRequest(user_id=1, surface=SURFACE, item_ids=[1], path="fast")
    assert _field(lambda: convert.score_query(bad_path)) == "path"


# -- ReportOutcomesRequest -----------------------------------------------------------------

outcome_strategy = st.builds(
    Outcome,
    request_id=st.text(min_size=1, max_size=20),
    item_id=st.integers(0, 2**40),
    event=st.sampled_from(["impression", "click", "conversion"]),
    revenue=st.floats(0.0, 1e6, allow_nan=False),
)


@given(st.lists(outcome_strategy, min_size=1, max_size=20))
def test_outcomes_round_trip(outcomes: list[Outcome]) -> None:
    assert convert.outcomes(convert.outcomes_request(outcomes)) == outcomes


@given(st.floats() | st.just(-0.0))
def test_revenue_must_be_finite_and_not_negative(revenue: float) -> None:
    request = pb.ReportOutcomesRequest(
        outcomes=[pb.Outcome(request_id="r", item_id=1, event=pb.EVENT_CONVERSION, revenue=revenue)]
    )
    if math.isfinite(revenue) and revenue >= 0:
        assert convert.outcomes(request)[0].revenue == revenue
    else:
        assert _field(lambda: convert.outcomes(request)) == "outcomes[0].revenue"


def test_outcome_fields_and_batch_limits() -> None:
    good = pb.Outcome(request_id="r", item_id=1, event=pb.EVENT_CLICK)

    def field_of(*outcomes: pb.Outcome, limit: int = 100) -> str:
        return _field(lambda: convert.outcomes(pb.ReportOutcomesRequest(outcomes=outcomes), limit))

    assert field_of() == "outcomes"
    assert field_of(good, good, good, limit=2) == "outcomes"
    assert field_of(good, pb.Outcome(request_id="r", item_id=1)) == "outcomes[1].event"
    unknown_event = pb.Outcome(request_id="r", item_id=1, event=7)  # type: ignore[arg-type]
    assert field_of(unknown_event) == "outcomes[0].event"
    assert field_of(pb.Outcome(item_id=1, event=pb.EVENT_CLICK)) == "outcomes[0].request_id"
    assert field_of(pb.Outcome(request_id="r", item_id=-1, event=pb.EVENT_CLICK)) == "outcomes[0].item_id"
    assert len(convert.outcomes(pb.ReportOutcomesRequest(outcomes=[good, good]), 2)) == 2


# -- responses -----------------------------------------------------------------------------


def test_recommendation_round_trips_through_the_response() -> None:
    rec = Recommendation(
        request_id="r1",
        item_ids=np.array([7, 3, 5], dtype=np.int64),
        scores=np.array([0.5, 0.9, 0.25], dtype=np.float32),
        expected_values=np.array([4.0, 1.5, 0.5], dtype=np.float32),
        path="cheap",
        model_version="world-abc",
        decision=Decision("cheap", "value_aware", "low value", 0.3, 0.01, 0.9),
        segment=f"{SURFACE}/2",
        num_candidates=100,
        timings=Timings(1.0, 2.0, 3.0, 4.0, 10.0),
    )
    resp = convert.recommend_response(rec)
    assert [(i.item_id, i.rank) for i in resp.items] == [(7, 0), (3, 1), (5, 2)]
    assert getattr(resp.routing, "lambda") == pytest.approx(0.3)
    back = convert.recommendation(resp)
    np.testing.assert_array_equal(back.item_ids, rec.item_ids)
    np.testing.assert_array_equal(back.scores, rec.scores)
    np.testing.assert_array_equal(back.expected_values, rec.expected_values)
    assert (back.decision, back.timings, back.segment, back.path) == (
        rec.decision,
        rec.timings,
        rec.segment,
        rec.path,
    )
    assert json.loads(convert.to_json(resp))["routing"]["segment"] == f"{SURFACE}/2"


def test_score_result_round_trips() -> None:
    result = ScoreResult("r2", np.array([0.5, 0.125], dtype=np.float32), "full", "v1")
    back = convert.score_result(convert.score_response(result))
    np.testing.assert_array_equal(back.scores, result.scores)
    assert (back.request_id, back.path, back.model_version) == ("r2", "full", "v1")


def test_routing_stats_response_derives_shares_and_revenue_per_inference() -> None:
    stats = {
        "router": {"policy": "always_full"},
        "segments": {
            f"{SURFACE}/1": {
                "full": {"inferences": 3.0, "compute_ms": 9.0, "revenue": 0.6, "window_inferences": 2.0},
                "cheap": {"inferences": 1.0, "compute_ms": 0.1, "revenue": 0.0},
            }
        },
    }
    resp = convert.routing_stats_response(stats)
    assert resp.policy == "always_full" and getattr(resp, "lambda") == 0.0
    (seg,) = resp.segments
    assert (seg.surface, seg.user_tier) == (SURFACE, "1")
    assert seg.revenue_per_inference["full"] == pytest.approx(0.2)
    assert seg.cheap_share == pytest.approx(0.25)
    assert json.loads(resp.json) == stats


def test_routing_stats_response_reads_value_aware_router_figures() -> None:
    segment = f"{SURFACE}/0"
    stats = {
        "router": {
            "policy": "value_aware",
            "lambda": 0.5,
            "budget_use": math.nan,  # no budget configured
            "controller": {"p99_ms": 12.5},
            "segments": {segment: {"ips_uplift": 0.02, "cheap_share": 0.4}},
        },
        "segments": {segment: {"full": {"inferences": 1.0, "compute_ms": 2.0, "revenue": 0.0}}},
    }
    resp = convert.routing_stats_response(stats)
    assert (resp.policy, getattr(resp, "lambda"), resp.budget_use) == ("value_aware", 0.5, 0.0)
    assert resp.latency_p99_ms == 12.5
    (seg,) = resp.segments
    assert (seg.estimated_uplift, seg.cheap_share) == (pytest.approx(0.02), pytest.approx(0.4))


# -- ServeConfig ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "build"),
    [
        ("port", lambda: ServeConfig(port=-1)),
        ("port", lambda: ServeConfig(port=70000)),
        ("grace_s", lambda: ServeConfig(grace_s=-1.0)),
        ("policy", lambda: ServeConfig(router=RouterConfig(policy="nope"))),
        ("max_batch_size", lambda: ServeConfig(pipeline=PipelineConfig(max_batch_size=0))),
        ("max_outcomes", lambda: ServeConfig(max_outcomes=0)),
    ],
)
def test_serve_config_rejects_bad_values(field: str, build: Callable[[], ServeConfig]) -> None:
    with pytest.raises(ValueError, match=field):
        build()
