"""Protobuf <-> domain types, and every check of a request that needs no schema or catalog.

Checks that need the feature schema or the catalog (known surfaces and features, id ranges,
known item ids) live in ``serving.features``; everything else is here, once, so the pipeline
only ever sees well-formed domain values. Each failure is an ``InvalidArgument``
naming the field as the caller wrote it (``k``, ``outcomes[3].revenue``...).

The client side (``recommend_request``, ``to_json``) is here too, so that commands and tools
never import generated code themselves.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format

from protos.valuerank.v1 import recommender_pb2 as pb
from serving.domain import (
    MAX_CANDIDATES,
    MAX_K,
    PATHS,
    SCORING_PATHS,
    Decision,
    Outcome,
    OutcomeReport,
    Path_,
    Query,
    Recommendation,
    ScoreResult,
    SlateReply,
    Timings,
)
from serving.errors import InvalidArgument

MAX_REQUEST_ID = 128
"""Longest request id accepted (ids are logged and used as keys)."""
MAX_OUTCOMES = 10_000
"""Default cap on the outcomes of one ReportOutcomes call."""

_EVENTS = {
    pb.EVENT_IMPRESSION: "impression",
    pb.EVENT_CLICK: "click",
    pb.EVENT_CONVERSION: "conversion",
}


# -- requests -> domain ----------------------------------------------------------------------


REQUEST_START_HEADER = "x-request-start"
"""Metadata key of the send time: ``t=<unix seconds>`` (the form front proxies write), or the bare number."""


def request_start(metadata: Any) -> float | None:
    """The send time in a call's metadata (``(key, value)`` pairs), or None when it has none."""
    for key, value in metadata or ():
        if key == REQUEST_START_HEADER:
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                start = float(text.removeprefix("t="))
            except ValueError:
                raise InvalidArgument(
                    REQUEST_START_HEADER, f"must be t=<unix seconds>, got {text!r}"
                ) from None
            if not math.isfinite(start) or start <= 0:
                raise InvalidArgument(REQUEST_START_HEADER, f"must be a positive unix time, got {text!r}")
            return start
    return None


def request_start_metadata(sent_at: float) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_START_HEADER, f"t={sent_at:.6f}"),)


def recommend_query(
    req: pb.RecommendRequest, deadline: float | None = None, request_start: float | None = None
) -> Query:
    """A validated ``Query``; ``deadline`` is absolute, on the pipeline's clock."""
    if not 1 <= req.k <= MAX_K:
        raise InvalidArgument("k", f"must be in 1..{MAX_K}, got {req.k}")
    if not 0 <= req.num_candidates <= MAX_CANDIDATES:
        raise InvalidArgument(
            "num_candidates", f"must be in 0..{MAX_CANDIDATES} (0 = server default), got {req.num_candidates}"
        )
    return Query(
        request_id=_request_id(req.request_id),
        user_id=_user_id(req.user_id),
        surface=_surface(req.surface),
        sparse=dict(req.context.sparse),
        dense=_dense(req.context.dense),
        k=req.k,
        num_candidates=req.num_candidates,
        force_path=_path("force_path", req.force_path),
        deadline=deadline,
        request_start=request_start,
    )


def score_query(req: pb.ScoreRequest, deadline: float | None = None) -> tuple[Query, Path_]:
    """A validated ``Query`` carrying the caller's items, and the path to score them with."""
    if not req.item_ids:
        raise InvalidArgument("item_ids", "at least one item id is required")
    if len(req.item_ids) > MAX_CANDIDATES:
        raise InvalidArgument("item_ids", f"at most {MAX_CANDIDATES} items, got {len(req.item_ids)}")
    query = Query(
        request_id=_request_id(req.request_id),
        user_id=_user_id(req.user_id),
        surface=_surface(req.surface),
        sparse=dict(req.context.sparse),
        dense=_dense(req.context.dense),
        deadline=deadline,
        item_ids=tuple(req.item_ids),
    )
    return query, _path("path", req.path) or "full"


def outcomes(req: pb.ReportOutcomesRequest, max_outcomes: int = MAX_OUTCOMES) -> list[Outcome]:
    if not req.outcomes:
        raise InvalidArgument("outcomes", "at least one outcome is required")
    if len(req.outcomes) > max_outcomes:
        raise InvalidArgument("outcomes", f"at most {max_outcomes} per call, got {len(req.outcomes)}")
    out = []
    for i, o in enumerate(req.outcomes):
        field = f"outcomes[{i}]"
        if not o.request_id:
            raise InvalidArgument(f"{field}.request_id", "must not be empty")
        if len(o.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"{field}.request_id", f"at most {MAX_REQUEST_ID} characters")
        if o.item_id < 0:
            raise InvalidArgument(f"{field}.item_id", f"must be >= 0, got {o.item_id}")
        event = _EVENTS.get(o.event)
        if event is None:
            raise InvalidArgument(f"{field}.event", f"must be IMPRESSION, CLICK or CONVERSION, got {o.event}")
        if not (math.isfinite(o.revenue) and o.revenue >= 0):
            raise InvalidArgument(f"{field}.revenue", f"must be finite and >= 0, got {o.revenue}")
        out.append(Outcome(o.request_id, o.item_id, event, o.revenue))
    return out


def _request_id(value: str) -> str:
    if not value:
        return uuid.uuid4().hex
    if len(value) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID} characters, got {len(value)}")
    return value


def _user_id(value: int) -> int:
    if value < 0:
        raise InvalidArgument("user_id", f"must be >= 0, got {value}")
    return value


def _surface(value: str) -> str:
    if not value:
        raise InvalidArgument("surface", "is required")
    return value


def _dense(values: Mapping[str, float]) -> dict[str, float]:
    for name, value in values.items():
        if not math.isfinite(value):
            raise InvalidArgument(f"context.dense[{name}]", f"must be finite, got {value}")
    return dict(values)


def _path(field: str, value: str, allowed: tuple[Path_, ...] = SCORING_PATHS) -> Path_ | None:
    """A path a caller asks for (a scoring path), or, with ``allowed=PATHS``, one a server answered by."""
    if value == "":
        return None
    for path in allowed:
        if value == path:
            return path
    raise InvalidArgument(field, f"must be one of {list(allowed)} or empty, got {value!r}")


# -- domain -> responses ---------------------------------------------------------------------


def recommend_response(rec: Recommendation) -> pb.RecommendResponse:
    d = rec.decision
    return pb.RecommendResponse(
        request_id=rec.request_id,
        items=[
            pb.ScoredItem(item_id=int(item), score=float(score), rank=rank, expected_value=float(value))
            for rank, (item, score, value) in enumerate(
                zip(rec.item_ids, rec.scores, rec.expected_values, strict=True)
            )
        ],
        path=rec.path,
        model_version=rec.model_version,
        timings=_timings(rec.timings),
        routing=pb.RoutingDecision(
            policy=d.policy,
            reason=d.reason,
            estimated_uplift=d.estimated_uplift,
            propensity=d.propensity,
            segment=rec.segment,
            depth=d.depth,
            **{"lambda": d.lam},
        ),
        num_candidates=rec.num_candidates,
    )


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        request_id=result.request_id,
        scores=[float(s) for s in result.scores],
        path=result.path,
        model_version=result.model_version,
        timings=_timings(result.timings),
    )


def outcomes_response(report: OutcomeReport) -> pb.ReportOutcomesResponse:
    return pb.ReportOutcomesResponse(
        accepted=report.accepted, duplicates=report.duplicates, unknown_requests=report.unknown_requests
    )


def routing_stats_response(stats: Mapping[str, Any]) -> pb.GetRoutingStatsResponse:
    """``Pipeline.routing_stats()`` as protobuf. Router fields a policy does not report stay 0;
    per-segment counts come from the tracker, uplift and cheap share from the router when it
    estimates them (``ips_uplift`` of the value-aware router is its unbiased estimate)."""
    router: Mapping[str, Any] = stats.get("router", {})
    by_segment: Mapping[str, Mapping[str, Any]] = router.get("segments", {})
    segments = []
    for segment, paths in sorted(stats.get("segments", {}).items()):
        surface, _, tier = segment.partition("/")
        inferences = {p: float(c.get("inferences", 0.0)) for p, c in paths.items()}
        revenue = {p: float(c.get("revenue", 0.0)) for p, c in paths.items()}
        total = sum(inferences.values())
        routed = by_segment.get(segment, {})
        segments.append(
            pb.SegmentStats(
                segment=segment,
                surface=surface,
                user_tier=tier,
                inferences=inferences,
                revenue=revenue,
                revenue_per_inference={p: revenue[p] / n for p, n in inferences.items() if n > 0},
                compute_ms={p: float(c.get("compute_ms", 0.0)) for p, c in paths.items()},
                estimated_uplift=_number(routed.get("estimated_uplift", routed.get("ips_uplift"))),
                cheap_share=_number(
                    routed.get("cheap_share", inferences.get("cheap", 0.0) / total if total else 0.0)
                ),
            )
        )
    controller: Mapping[str, Any] = router.get("controller", {})
    return pb.GetRoutingStatsResponse(
        policy=str(router.get("policy", "")),
        budget_use=_number(router.get("budget_use")),
        latency_p99_ms=_number(router.get("latency_p99_ms", controller.get("p99_ms"))),
        segments=segments,
        json=json.dumps(stats, sort_keys=True, default=str),
        **{"lambda": _number(router.get("lambda"))},
    )


def _number(value: Any) -> float:
    """A finite float, or 0 for a figure the policy does not have (None, NaN)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def _timings(t: Timings) -> pb.StageTimings:
    return pb.StageTimings(
        retrieve_ms=t.retrieve_ms,
        route_ms=t.route_ms,
        score_ms=t.score_ms,
        total_ms=t.total_ms,
        queue_ms=t.queue_ms,
    )


# -- client side: domain -> requests, responses -> domain ----------------------------------


def recommend_request(
    *,
    user_id: int,
    surface: str,
    k: int = 10,
    num_candidates: int = 0,
    sparse: Mapping[str, int] | None = None,
    dense: Mapping[str, float] | None = None,
    request_id: str = "",
    force_path: str = "",
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        request_id=request_id,
        user_id=user_id,
        surface=surface,
        context=pb.Context(sparse=dict(sparse or {}), dense=dict(dense or {})),
        k=k,
        num_candidates=num_candidates,
        force_path=force_path,
    )


def query_request(query: Query) -> pb.RecommendRequest:
    return recommend_request(
        user_id=query.user_id,
        surface=query.surface,
        k=query.k,
        num_candidates=query.num_candidates,
        sparse=query.sparse,
        dense=query.dense,
        request_id=query.request_id,
        force_path=query.force_path or "",
    )


def encode_query(query: Query) -> bytes:
    """A Recommend request's wire bytes: a load generator encodes its traffic before its clock starts."""
    return bytes(query_request(query).SerializeToString())


def slate_reply(data: bytes) -> SlateReply:
    """The slate of a Recommend answer's wire bytes (what ``encode_query``'s caller reads back)."""
    resp = pb.RecommendResponse.FromString(data)
    return SlateReply(
        resp.request_id,
        _path("path", resp.path, PATHS) or "full",
        np.fromiter((item.item_id for item in resp.items), dtype=np.int64, count=len(resp.items)),
        resp.routing.reason,
    )


def score_request(query: Query, path: Path_ = "full") -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id=query.request_id,
        user_id=query.user_id,
        surface=query.surface,
        context=pb.Context(sparse=query.sparse, dense=query.dense),
        item_ids=query.item_ids,
        path=path,
    )


def outcomes_request(items: list[Outcome]) -> pb.ReportOutcomesRequest:
    events = {name: value for value, name in _EVENTS.items()}
    return pb.ReportOutcomesRequest(
        outcomes=[
            pb.Outcome(request_id=o.request_id, item_id=o.item_id, event=events[o.event], revenue=o.revenue)
            for o in items
        ]
    )


def recommendation(resp: pb.RecommendResponse) -> Recommendation:
    r = resp.routing
    path = _path("path", resp.path, PATHS) or "full"
    return Recommendation(
        request_id=resp.request_id,
        item_ids=np.array([i.item_id for i in resp.items], dtype=np.int64),
        scores=np.array([i.score for i in resp.items], dtype=np.float32),
        expected_values=np.array([i.expected_value for i in resp.items], dtype=np.float32),
        path=path,
        model_version=resp.model_version,
        decision=Decision(
            path,
            r.policy,
            r.reason,
            getattr(r, "lambda"),
            r.estimated_uplift,
            r.propensity,
            depth=r.depth if r.HasField("depth") else None,
        ),
        segment=r.segment,
        num_candidates=resp.num_candidates,
        timings=_domain_timings(resp.timings),
    )


def score_result(resp: pb.ScoreResponse) -> ScoreResult:
    return ScoreResult(
        request_id=resp.request_id,
        scores=np.array(resp.scores, dtype=np.float32),
        path=_path("path", resp.path) or "full",
        model_version=resp.model_version,
        timings=_domain_timings(resp.timings),
    )


def outcome_report(resp: pb.ReportOutcomesResponse) -> OutcomeReport:
    return OutcomeReport(resp.accepted, resp.duplicates, resp.unknown_requests)


def _domain_timings(t: pb.StageTimings) -> Timings:
    return Timings(t.retrieve_ms, t.route_ms, t.score_ms, t.queue_ms, t.total_ms)


def to_json(message: Any) -> str:
    """A message as indented JSON, field names as in the .proto, zero values included."""
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
    )


def routing_stats_request() -> pb.GetRoutingStatsRequest:
    return pb.GetRoutingStatsRequest()


def reload_request(model_dir: str | None) -> pb.ReloadModelRequest:
    return pb.ReloadModelRequest(model_dir=model_dir or "")


def reload_reply(resp: pb.ReloadModelResponse) -> dict[str, Any]:
    return {
        "model_version": resp.model_version,
        "previous_version": resp.previous_version,
        "load_s": resp.load_seconds,
        "steady_rss_bytes": resp.steady_rss_bytes,
        "peak_rss_bytes": resp.peak_rss_bytes,
    }
