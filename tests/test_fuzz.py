"""The gRPC boundary fuzzed: hypothesis sends arbitrary RecommendRequest, ScoreRequest and
ReportOutcomesRequest messages (every field; extreme, unicode and non-finite values; long
repeated fields) to a real server. Every answer is OK or a status that names what was wrong,
never UNKNOWN or INTERNAL; the server keeps serving; outcomes are counted once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import ServerThread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.config import ServeConfig

pytestmark = pytest.mark.integration

ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,  # a field out of range; the message names it
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # admission: refused at once
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
SURFACES = ("ecommerce_recommendation", "local_services_dispatch", "general_assistant", "video_effects")
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)  # proto strings are UTF-8
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
NAMES = st.one_of(st.sampled_from(("user_tier", "surface", "activity", "item_id", "hour", "")), TEXT)
CONTEXT = st.builds(
    pb.Context,
    sparse=st.dictionaries(NAMES, INT64, max_size=8),
    dense=st.dictionaries(NAMES, FLOATS, max_size=8),
)
SURFACE = st.one_of(st.sampled_from(SURFACES), TEXT)
PATH = st.one_of(st.sampled_from(("", "full", "cheap", "fallback")), TEXT)


@pytest.fixture(scope="module")
def fuzzed(serving_assets: Any) -> Iterator[pb_grpc.RecommenderStub]:
    thread = ServerThread(serving_assets.load(), ServeConfig(port=0, grace_s=1.0))
    try:
        channel = grpc.insecure_channel(thread.start().wait_serving().target)
        yield pb_grpc.RecommenderStub(channel)
    finally:
        thread.stop()


def _answer(call: Any, request: Any) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, call(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in ANSWERS, f"{exc.code()} {exc.details()} for {request!r:.300}"
        return exc.code(), exc.details()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    st.builds(
        pb.RecommendRequest,
        request_id=TEXT,
        user_id=INT64,
        surface=SURFACE,
        context=CONTEXT,
        k=INT32,
        num_candidates=INT32,
        force_path=PATH,
    )
)
def test_recommend_answers_every_message(
    fuzzed: pb_grpc.RecommenderStub, request: pb.RecommendRequest
) -> None:
    code, answer = _answer(fuzzed.Recommend, request)
    if code == grpc.StatusCode.OK:
        assert 1 <= len(answer.items) <= request.k
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        assert ":" in answer  # "field: what is wrong"


@FUZZ
@given(
    st.builds(
        pb.ScoreRequest,
        request_id=TEXT,
        user_id=INT64,
        surface=SURFACE,
        context=CONTEXT,
        item_ids=st.lists(st.one_of(st.integers(-5, 300), INT64), max_size=600),
        path=PATH,
    )
)
def test_score_answers_every_message(fuzzed: pb_grpc.RecommenderStub, request: pb.ScoreRequest) -> None:
    code, answer = _answer(fuzzed.Score, request)
    if code == grpc.StatusCode.OK:
        assert len(answer.scores) == len(request.item_ids)


OUTCOME = st.builds(
    pb.Outcome,
    request_id=st.one_of(st.sampled_from([f"fuzz-{i}" for i in range(8)]), TEXT),
    item_id=st.one_of(st.integers(0, 300), INT64),
    event=st.integers(-3, 6),  # proto3 keeps unknown enum values
    revenue=st.floats(allow_nan=True, allow_infinity=True),
)


@FUZZ
@given(st.lists(OUTCOME, max_size=60))
def test_report_outcomes_counts_each_outcome_once(
    fuzzed: pb_grpc.RecommenderStub, outcomes: list[pb.Outcome]
) -> None:
    for i in range(8):  # requests the outcomes may belong to (idempotent: same id, same answer)
        fuzzed.Recommend(pb.RecommendRequest(request_id=f"fuzz-{i}", user_id=i, surface=SURFACES[i % 4], k=5))
    request = pb.ReportOutcomesRequest(outcomes=outcomes)
    code, answer = _answer(fuzzed.ReportOutcomes, request)
    if code != grpc.StatusCode.OK:
        return
    # Unknown requests' outcomes are recorded too (unattributed): a part of the accepted ones.
    assert answer.accepted + answer.duplicates == len(outcomes)
    assert 0 <= answer.unknown_requests <= answer.accepted
    again = fuzzed.ReportOutcomes(request, timeout=30)
    assert (again.accepted, again.duplicates) == (0, len(outcomes))  # nothing counted twice


def test_huge_repeated_fields_are_refused_and_the_server_serves_on(fuzzed: pb_grpc.RecommenderStub) -> None:
    huge_score = pb.ScoreRequest(user_id=1, surface=SURFACES[0], item_ids=list(range(200_000)))
    huge_report = pb.ReportOutcomesRequest(
        outcomes=[pb.Outcome(request_id="x", item_id=1, event=pb.EVENT_CLICK)] * 50_000
    )
    for call, request in ((fuzzed.Score, huge_score), (fuzzed.ReportOutcomes, huge_report)):
        code, details = _answer(call, request)
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), details
    ok = fuzzed.Recommend(pb.RecommendRequest(user_id=2, surface=SURFACES[0], k=3), timeout=30)
    assert len(ok.items) == 3
