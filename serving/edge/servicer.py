"""The gRPC servicer: convert, call the pipeline, convert back. Nothing else happens here.

Domain errors become status codes in one place, ``status_errors``::

    InvalidArgument   -> INVALID_ARGUMENT   (message names the field)
    NotReady          -> UNAVAILABLE        (model or index still loading)
    Unavailable       -> UNAVAILABLE        (a backing store failed; nothing acknowledged, retry)
    DeadlineExceeded  -> DEADLINE_EXCEEDED
    Overloaded        -> RESOURCE_EXHAUSTED (trailer ``grpc-retry-pushback-ms``: when to retry)
    Unauthenticated   -> UNAUTHENTICATED    (admin calls: ``serving.edge.admin``)
    PermissionDenied  -> PERMISSION_DENIED
    anything else     -> INTERNAL           (logged with its traceback; the server keeps serving)

Until the server hands it a pipeline (``set_pipeline``) every call answers UNAVAILABLE.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.domain import Recommendation
from serving.edge import convert
from serving.edge.process import process_stats
from serving.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotReady,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from serving.pipeline import Pipeline

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
"""``valuerank.v1.Recommender``: the name health checks and reflection know it by."""
RECOMMEND_METHOD = f"/{SERVICE_NAME}/Recommend"

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailer of a RESOURCE_EXHAUSTED answer: milliseconds the caller should wait before retrying
(the key gRPC's own retry policy reads)."""

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def status_errors(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map exceptions raised by a handler to gRPC status codes (see the module docstring)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if isinstance(exc, Overloaded):
                context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(exc.retry_after_ms)),))
            code = next((c for kind, c in _STATUS if isinstance(exc, kind)), None)
            if code is None:
                log.exception("%s failed", method.__name__)
                code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
            else:
                message = str(exc)
        # Outside the except block: abort() raises, and must not chain onto the original error.
        await context.abort(code, message)
        raise RuntimeError("context.abort() returned")  # pragma: no cover - abort() always raises

    return wrapper


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, max_outcomes: int = convert.MAX_OUTCOMES) -> None:
        self.pipeline: Pipeline | None = None
        self.max_outcomes = max_outcomes

    def set_pipeline(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    @status_errors
    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        pipeline = self._ready()
        start = convert.request_start(context.invocation_metadata())
        query = convert.recommend_query(request, _deadline(pipeline, context), start)
        return convert.recommend_response(await pipeline.recommend(query))

    @status_errors
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        pipeline = self._ready()
        query, path = convert.score_query(request, _deadline(pipeline, context))
        return convert.score_response(await pipeline.score(query, path))

    @status_errors
    async def ReportOutcomes(
        self, request: pb.ReportOutcomesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportOutcomesResponse:
        pipeline = self._ready()
        report = await pipeline.report_outcomes(convert.outcomes(request, self.max_outcomes))
        return convert.outcomes_response(report)

    @status_errors
    async def GetRoutingStats(
        self, request: pb.GetRoutingStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRoutingStatsResponse:
        stats = self._ready().routing_stats()
        # The server's CPU time (its group's under serve --workers): a load generator divides its
        # growth by the requests answered.
        stats["process"] = process_stats()
        return convert.routing_stats_response(stats)

    def _ready(self) -> Pipeline:
        if self.pipeline is None:
            raise NotReady("model and index are still loading")
        return self.pipeline


class CannedRecommenderServicer(pb_grpc.RecommenderServicer):
    """The transport's limit: answers every Recommend with one prebuilt response of the real size
    (``valuerank bench capacity`` measures it beside the real server); GetRoutingStats reports
    only the process's CPU time, as the real server's ``process`` section does."""

    def __init__(self, recommendation: Recommendation) -> None:
        self.response = convert.recommend_response(recommendation)

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        return self.response

    async def GetRoutingStats(
        self, request: pb.GetRoutingStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRoutingStatsResponse:
        return convert.routing_stats_response({"process": process_stats()})


def _deadline(pipeline: Pipeline, context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the pipeline's clock (None when the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else pipeline.clock.now() + remaining


def add_to_server(servicer: RecommenderServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)


def stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """A client stub for ``channel`` (sync or aio), for commands that must not import protos."""
    return pb_grpc.RecommenderStub(channel)
