"""An asyncio client of the Recommender that speaks domain types (tools, load generator, demo).

Errors arrive as ``grpc.aio.AioRpcError`` with the server's status code and message.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import grpc

from serving.domain import Outcome, OutcomeReport, Path_, Query, Recommendation, ScoreResult, SlateReply
from serving.edge import convert
from serving.edge.servicer import RECOMMEND_METHOD, SERVICE_NAME, stub

RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.02s",
                "maxBackoff": "0.3s",
                "backoffMultiplier": 3,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
"""What a caller does when a server process dies or drains under it: retry UNAVAILABLE a few
times, quickly (the reconnect lands on another worker of the port). Every call is safe to retry:
outcomes are idempotent, and a Recommend only serves again."""


class RecommenderClient:
    def __init__(self, target: str, options: list[tuple[str, Any]] | None = None) -> None:
        self.target = target
        retries = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY))]
        self._channel = grpc.aio.insecure_channel(target, options=[*retries, *(options or [])])
        self._stub = stub(self._channel)
        # Pre-encoded requests in, slates out: the load generator's lean path (bytes pass through).
        self._recommend_encoded = self._channel.unary_unary(
            RECOMMEND_METHOD, request_serializer=None, response_deserializer=convert.slate_reply
        )

    async def __aenter__(self) -> RecommenderClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def recommend(self, query: Query, timeout_s: float | None = None) -> Recommendation:
        resp = await self._stub.Recommend(convert.query_request(query), timeout=timeout_s)
        return convert.recommendation(resp)

    async def recommend_encoded(
        self, data: bytes, timeout_s: float | None = None, sent_at: float | None = None
    ) -> SlateReply:
        """Recommend with a request already encoded by ``convert.encode_query``; ``sent_at`` (Unix
        time) goes in the ``x-request-start`` header, so the server sees how long it queued."""
        metadata = None if sent_at is None else convert.request_start_metadata(sent_at)
        reply: SlateReply = await self._recommend_encoded(data, timeout=timeout_s, metadata=metadata)
        return reply

    async def score(self, query: Query, path: Path_ = "full", timeout_s: float | None = None) -> ScoreResult:
        resp = await self._stub.Score(convert.score_request(query, path), timeout=timeout_s)
        return convert.score_result(resp)

    async def report_outcomes(self, outcomes: list[Outcome], timeout_s: float | None = None) -> OutcomeReport:
        resp = await self._stub.ReportOutcomes(convert.outcomes_request(outcomes), timeout=timeout_s)
        return convert.outcome_report(resp)

    async def reload_model(
        self, token: str, model_dir: str | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Admin.ReloadModel (``model_dir`` None: the served folder again) with the bearer ``token``."""
        from serving.edge.admin import admin_stub

        resp = await admin_stub(self._channel).ReloadModel(
            convert.reload_request(model_dir),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=timeout_s,
        )
        return convert.reload_reply(resp)

    async def routing_stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's full routing snapshot (the response's ``json`` field, parsed)."""
        resp = await self._stub.GetRoutingStats(convert.routing_stats_request(), timeout=timeout_s)
        return dict(json.loads(resp.json))
