"""The serving pipeline: validate -> retrieve -> route -> score -> rank -> record.

It knows nothing of gRPC (the servicer converts at the edge) and sees only the ``Retriever``,
``Scorer``, ``Router`` and ``RevenueTracker`` interfaces. Faiss and torch run on worker
threads: retrieval and the cheap path on one pool, the full model behind a micro-batcher on
another, so a queue of full-path work never delays a cheap answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from embeddings.clock import Clock, MonotonicClock
from serving.batching import MicroBatcher
from serving.decision_log import DecisionLog, DecisionRecord
from serving.domain import (
    MAX_CANDIDATES,
    Candidates,
    Decision,
    Outcome,
    OutcomeReport,
    Path_,
    Query,
    Recommendation,
    RequestFeatures,
    ScoreResult,
    Timings,
)
from serving.errors import DeadlineExceeded, InvalidArgument
from serving.features import FeatureResolver
from serving.feedback import RoutingFeedback
from serving.ranking import ranking_keys, top_k
from serving.retriever import Retriever
from serving.revenue.tracker import RevenueTracker
from serving.routing.router import RouteContext, Router
from serving.scoring import Scorer


@dataclass(frozen=True)
class PipelineConfig:
    default_candidates: int = 500
    """Candidates retrieved when the request does not say."""
    max_batch_size: int = 16
    """Most requests scored together by the full model."""
    batch_timeout_ms: float = 0.5
    """How long the batcher waits for more requests after the first one."""

    def __post_init__(self) -> None:
        if not 1 <= self.default_candidates <= MAX_CANDIDATES:
            raise ValueError(f"{self.default_candidates=} must be in 1..{MAX_CANDIDATES}")
        if self.max_batch_size < 1:
            raise ValueError(f"{self.max_batch_size=} must be >= 1")
        if self.batch_timeout_ms < 0:
            raise ValueError(f"{self.batch_timeout_ms=} must be >= 0")


ScoreJob = tuple[RequestFeatures, Candidates]


class Pipeline:
    def __init__(
        self,
        resolver: FeatureResolver,
        retriever: Retriever,
        scorers: dict[Path_, Scorer],
        router: Router,
        tracker: RevenueTracker,
        model_version: str,
        config: PipelineConfig = PipelineConfig(),
        clock: Clock | None = None,
        decision_log: DecisionLog | None = None,
        item_values: np.ndarray | None = None,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        """``item_values``: what a click on each item id earns, relatively (the catalog's
        prices); the slate is the top k by ``P(click) x value`` (``serving.ranking``), or by
        ``P(click)`` when None. ``on_close``: releases what the pipeline owns besides its parts
        (an item store it was built with), called after the scorers have stopped."""
        self._on_close = list(on_close)
        self.resolver = resolver
        self.item_values = item_values
        self.retriever = retriever
        self.scorers = scorers
        self.router = router
        self.tracker = tracker
        self.feedback = RoutingFeedback(router, tracker)
        self.model_version = model_version
        self.config = config
        self.clock = clock or MonotonicClock()
        self._light_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vr-light")
        self._model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vr-model")
        # Durable outcome writes (fsync, Redis) get their own thread: a slow disk never delays
        # retrieval or the cheap path.
        self._outcome_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vr-outcomes")
        self.decision_log = decision_log
        self._batchers: dict[Path_, MicroBatcher[ScoreJob, np.ndarray]] = {}
        for path, scorer in scorers.items():
            pool = self._model_pool if path == "full" else self._light_pool
            self._batchers[path] = MicroBatcher(
                _batch_fn(scorer),
                pool,
                max_batch_size=config.max_batch_size if path == "full" else 1,
                timeout_s=config.batch_timeout_ms / 1000.0 if path == "full" else 0.0,
            )

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        for scorer in self.scorers.values():
            scorer.close()
        self._light_pool.shutdown(wait=True)
        self._model_pool.shutdown(wait=True)
        self._outcome_pool.shutdown(wait=True)
        if self.decision_log is not None:
            self.decision_log.close()
        await asyncio.get_running_loop().run_in_executor(None, self.tracker.close)
        for release in self._on_close:
            release()

    # -- Recommend ----------------------------------------------------------------------------

    async def recommend(self, query: Query) -> Recommendation:
        started = self.clock.now()
        t0 = time.perf_counter()
        features = self.resolver.resolve(query)
        n_cand = query.num_candidates or self.config.default_candidates
        if query.k > n_cand:
            raise InvalidArgument("k", f"k={query.k} exceeds the {n_cand} candidates to retrieve")
        self._check_deadline(query)
        loop = asyncio.get_running_loop()
        ids, scores = await loop.run_in_executor(
            self._light_pool, self.retriever.retrieve, features.user_vector[None, :], n_cand
        )
        candidates = Candidates(ids[0], scores[0])
        t1 = time.perf_counter()

        left = None if query.deadline is None else query.deadline - self.clock.now()
        route = RouteContext(
            query.request_id,
            query.surface,
            features.segment,
            left,
            request=features,
            candidates=candidates,
            k=query.k,
        )
        if query.force_path is not None:
            decision = Decision(query.force_path, "forced", "force_path set by caller")
        else:
            decision = self.router.decide(route)
        if decision.path not in self._batchers:
            raise InvalidArgument("force_path", f"path {decision.path!r} is not served here")
        t2 = time.perf_counter()
        self._check_deadline(query)
        self.scorers[decision.path].prefetch(features, candidates)  # e.g. item rows from Redis
        result = await self._batchers[decision.path].submit(
            (features, candidates), weight=len(candidates.item_ids)
        )
        t3 = time.perf_counter()

        values = None if self.item_values is None else self.item_values[candidates.item_ids]
        keys = ranking_keys(result.value, values)
        top = top_k(keys, query.k)
        compute_ms = result.compute_cpu_s * 1000.0
        latency_ms = (self.clock.now() - started) * 1000.0
        self.feedback.served(route, decision, compute_ms, latency_ms, result.value)
        if self.decision_log is not None:
            self.decision_log.write(
                DecisionRecord.of(
                    query.request_id,
                    time.time(),
                    features.segment,
                    query.surface,
                    decision,
                    compute_ms,
                    latency_ms,
                )
            )
        timings = Timings(
            retrieve_ms=(t1 - t0) * 1000.0,
            route_ms=(t2 - t1) * 1000.0,
            score_ms=(t3 - t2) * 1000.0,
            queue_ms=result.queue_s * 1000.0,
            total_ms=(time.perf_counter() - t0) * 1000.0,
        )
        return Recommendation(
            request_id=query.request_id,
            item_ids=candidates.item_ids[top],
            scores=result.value[top],
            expected_values=keys[top],
            path=decision.path,
            model_version=self.model_version,
            decision=decision,
            segment=features.segment,
            num_candidates=len(candidates.item_ids),
            timings=timings,
        )

    # -- Score --------------------------------------------------------------------------------

    async def score(self, query: Query, path: Path_ = "full") -> ScoreResult:
        t0 = time.perf_counter()
        features = self.resolver.resolve(query)
        ids = self.resolver.item_ids(query)
        if path not in self._batchers:
            raise InvalidArgument("path", f"path {path!r} is not served here")
        self._check_deadline(query)
        # The caller's items were not retrieved: their two-tower inner products, as retrieval
        # would have returned them (the cheap path scores from these).
        inner = self.resolver.catalog.item_vectors[ids] @ features.user_vector
        candidates = Candidates(ids, inner.astype(np.float32))
        result = await self._batchers[path].submit((features, candidates), weight=len(ids))
        total = (time.perf_counter() - t0) * 1000.0
        return ScoreResult(
            query.request_id,
            result.value,
            path,
            self.model_version,
            Timings(score_ms=total, queue_ms=result.queue_s * 1000.0, total_ms=total),
        )

    # -- Outcomes and stats -------------------------------------------------------------------

    async def report_outcomes(self, outcomes: list[Outcome]) -> OutcomeReport:
        # The tracker makes outcomes durable (file fsync or Redis) before it returns: off-loop.
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._outcome_pool, self.tracker.record_outcomes, outcomes)
        # Only after they are durable: the router learns each (request, item, event) once.
        self.feedback.outcomes(outcomes)
        if self.decision_log is not None:
            for outcome in outcomes:
                self.decision_log.write(outcome)
        return report

    def routing_stats(self) -> dict[str, Any]:
        stats = {"router": self.router.stats(), "segments": self.tracker.snapshot()}
        store = self.scorers["full"].store_stats() if "full" in self.scorers else None
        if store is not None:
            stats["embedding_store"] = store
        return stats

    def _check_deadline(self, query: Query) -> None:
        if query.deadline is not None and self.clock.now() >= query.deadline:
            raise DeadlineExceeded(f"deadline passed before scoring request {query.request_id}")


def _batch_fn(scorer: Scorer) -> Any:
    def run(jobs: list[ScoreJob]) -> list[np.ndarray]:
        return scorer.score_batch([j[0] for j in jobs], [j[1] for j in jobs])

    return run
