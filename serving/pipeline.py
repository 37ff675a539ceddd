"""The serving pipeline: admit -> validate -> retrieve -> route -> score -> rank -> record.

It knows nothing of gRPC (the servicer converts at the edge) and sees only the ``Retriever``,
``Scorer``, ``Router`` and ``RevenueTracker`` interfaces. Faiss and torch run on worker
threads, each behind a micro-batcher: retrieval on one thread (concurrent requests share one
Faiss search), the full model on another, so a queue of full-path work never delays a cheap
answer. The cheap path is a few numpy operations on what retrieval returned and runs inline.

``serving.admission`` bounds the work: a request is answered within its budget (deadline and
SLO) by the deepest tier whose predicted wait fits (full, cheap, then the fallback tier of
``serving.fallback``), or refused at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from embeddings.clock import Clock, MonotonicClock
from serving.admission import Admission, AdmissionConfig
from serving.batching import BatchResult, MicroBatcher
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
from serving.errors import DeadlineExceeded, InvalidArgument, Overloaded
from serving.fallback import FallbackSlates
from serving.features import FeatureResolver
from serving.feedback import RoutingFeedback
from serving.metrics import ServingMetrics
from serving.ranking import cheap_order, ranking_keys, top_k
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
    batch_timeout_ms: float = 0.0
    """How long the full path's batcher waits for more requests after the first one. 0: none;
    batches still grow with load, from what queues while the previous batch computes (at 150 req/s
    on the 2-core machine a 0.5 ms wait doubled p99, 30 -> 51-81 ms, and added loop work)."""
    max_retrieval_batch: int = 32
    """Most requests retrieved together in one Faiss search."""
    admission: AdmissionConfig = AdmissionConfig()
    """Budgets, the degradation ladder and refusal on arrival (``serving.admission``)."""

    def __post_init__(self) -> None:
        if not 1 <= self.default_candidates <= MAX_CANDIDATES:
            raise ValueError(f"{self.default_candidates=} must be in 1..{MAX_CANDIDATES}")
        if self.max_batch_size < 1:
            raise ValueError(f"{self.max_batch_size=} must be >= 1")
        if self.batch_timeout_ms < 0:
            raise ValueError(f"{self.batch_timeout_ms=} must be >= 0")
        if self.max_retrieval_batch < 1:
            raise ValueError(f"{self.max_retrieval_batch=} must be >= 1")


ScoreJob = tuple[RequestFeatures, Candidates]
RetrieveJob = tuple[np.ndarray, int]
"""A user vector and how many candidates to retrieve for it."""


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
        fallback: FallbackSlates | None = None,
    ) -> None:
        """``item_values``: what a click on each item id earns, relatively (the catalog's
        prices); the slate is the top k by ``P(click) x value`` (``serving.ranking``), or by
        ``P(click)`` when None. ``on_close``: releases what the pipeline owns besides its parts
        (an item store it was built with), called after the scorers have stopped.
        ``fallback``: the tier answered when nothing else fits the budget (None: the catalog's
        seeded one)."""
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
        self._light_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vr-retrieve")
        self._model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vr-model")
        # Durable outcome writes (fsync, Redis) get their own thread: a slow disk never delays
        # retrieval or the cheap path.
        self._outcome_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vr-outcomes")
        self.decision_log = decision_log
        self._batchers: dict[Path_, MicroBatcher[ScoreJob, np.ndarray]] = {}
        for path, scorer in scorers.items():
            if not scorer.inline:
                self._batchers[path] = MicroBatcher(
                    self._batch_fn(path),
                    self._model_pool,
                    max_batch_size=config.max_batch_size,
                    timeout_s=config.batch_timeout_ms / 1000.0,
                )
        self._retrieval: MicroBatcher[RetrieveJob, tuple[np.ndarray, np.ndarray]] = MicroBatcher(
            self._retrieve_batch, self._light_pool, max_batch_size=config.max_retrieval_batch, timeout_s=0.0
        )
        self.admission = Admission(config.admission)
        if fallback is None:
            catalog = resolver.catalog
            fallback = FallbackSlates.seeded(catalog.user_vectors, catalog.item_vectors, item_values)
        self.fallback = fallback
        self._refresher: asyncio.Task[None] | None = None
        self.metrics = ServingMetrics(self.routing_stats)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.admission.stop()
        await self._retrieval.close()
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
        self.router.close()
        for release in self._on_close:
            release()

    # -- Recommend ----------------------------------------------------------------------------

    async def recommend(self, query: Query) -> Recommendation:
        started = self.clock.now()
        t0 = time.perf_counter()
        self._start_background()
        left = None if query.deadline is None else query.deadline - started
        queued = 0.0 if query.request_start is None else max(time.time() - query.request_start, 0.0)
        budget_end = t0 + self.admission.admit(left, queued)  # or Overloaded, before any work
        self.admission.in_flight += 1
        try:
            recommendation = await self._recommend(query, started, t0, budget_end)
        finally:
            self.admission.in_flight -= 1
        self.admission.counts[f"answered_{recommendation.path}"] += 1
        self.metrics.observe(recommendation, query.surface)
        return recommendation

    async def _recommend(self, query: Query, started: float, t0: float, budget_end: float) -> Recommendation:
        features = self.resolver.resolve(query)
        n_cand = query.num_candidates or self.config.default_candidates
        if query.k > n_cand:
            raise InvalidArgument("k", f"k={query.k} exceeds the {n_cand} candidates to retrieve")
        self._check_deadline(query)
        wait_s = self._retrieval.expected_wait_s(t0)
        if wait_s > budget_end - t0 and query.force_path is None:
            return self._fallback(query, features, started, t0, f"retrieval wait {wait_s * 1000.0:.1f} ms")
        ids, scores = (await self._retrieval.submit((features.user_vector, n_cand))).value
        candidates = Candidates(ids, scores)
        retrieved = len(ids)
        t1 = time.perf_counter()

        left = None if query.deadline is None else query.deadline - self.clock.now()
        full_wait_s = self._batchers["full"].expected_wait_s(t1) if "full" in self._batchers else 0.0
        route = RouteContext(
            query.request_id,
            query.surface,
            features.segment,
            left,
            request=features,
            candidates=candidates,
            k=query.k,
            queue_delay_s=full_wait_s,
        )
        if query.force_path is not None:
            decision = Decision(query.force_path, "forced", "force_path set by caller")
        else:
            decision = self._admit_path(self.router.decide(route), budget_end - t1, full_wait_s)
        if decision.path not in self.scorers:
            raise InvalidArgument("force_path", f"path {decision.path!r} is not served here")
        t2 = time.perf_counter()
        self._check_deadline(query)
        if decision.depth is not None and decision.path == "full":
            # A cascade: the full model re-ranks the cheap order's top ``depth`` (the router
            # learns from them in that order); the slate is the best k of those.
            values = None if self.item_values is None else self.item_values[candidates.item_ids]
            candidates = candidates.take(cheap_order(candidates.retrieval_scores, values)[: decision.depth])
            route = dataclasses.replace(route, candidates=candidates)
        self.scorers[decision.path].prefetch(features, candidates)  # e.g. item rows from Redis
        result = await self._score(decision.path, features, candidates)
        t3 = time.perf_counter()

        values = None if self.item_values is None else self.item_values[candidates.item_ids]
        keys = ranking_keys(result.value, values)
        top = top_k(keys, query.k)
        compute_ms = result.compute_cpu_s * 1000.0
        latency_ms = (self.clock.now() - started) * 1000.0
        self.feedback.served(route, decision, compute_ms, latency_ms, result.value)
        self.fallback.observe(features.segment, candidates.item_ids[top], result.value[top])
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
            num_candidates=retrieved,
            timings=timings,
        )

    def _admit_path(self, decision: Decision, left_s: float, full_wait_s: float) -> Decision:
        """The ladder: the router's choice; a shallower depth when its own would not fit after the
        full path's wait (``Router.fit_budget``); the cheap path when none fits."""
        if decision.path != "full":
            return decision
        fitted = self.router.fit_budget(decision, left_s - full_wait_s)
        if fitted is decision:
            return decision
        if fitted is not None:
            self.admission.counts["shallower"] += 1
            return fitted
        if not self.admission.config.degrade:
            self.admission.counts["refused_full_wait"] += 1
            retry = self.admission.config.retry_after_ms
            raise Overloaded(f"overloaded: full path wait {full_wait_s * 1000.0:.1f} ms", retry)
        self.admission.counts["degraded"] += 1
        reason = (
            f"degraded: full path wait {full_wait_s * 1000.0:.1f} ms > {left_s * 1000.0:.1f} ms of budget"
            f" (router: {decision.reason})"
        )
        return Decision(
            "cheap", decision.policy, reason, decision.lam, decision.estimated_uplift, 1.0, depth=0
        )

    def _fallback(
        self, query: Query, features: RequestFeatures, started: float, t0: float, why: str
    ) -> Recommendation:
        """The segment's top items, no retrieval and no model (``serving.fallback``)."""
        if not self.admission.config.degrade:
            self.admission.counts["refused_retrieval_wait"] += 1
            raise Overloaded(f"overloaded: {why}", self.admission.config.retry_after_ms)
        self.admission.counts["fallback"] += 1
        slate = self.fallback.slate(features.segment, query.k)
        decision = Decision("fallback", "admission", f"fallback: {why} > budget")
        latency_ms = (self.clock.now() - started) * 1000.0
        route = RouteContext(query.request_id, query.surface, features.segment, None, k=query.k)
        self.feedback.served(route, decision, 0.0, latency_ms)
        total_ms = (time.perf_counter() - t0) * 1000.0
        return Recommendation(
            request_id=query.request_id,
            item_ids=slate.item_ids,
            scores=slate.probs.astype(np.float32),
            expected_values=slate.keys,
            path="fallback",
            model_version=self.model_version,
            decision=decision,
            segment=features.segment,
            num_candidates=0,
            timings=Timings(total_ms=total_ms),
        )

    async def _score(
        self, path: Path_, features: RequestFeatures, candidates: Candidates
    ) -> BatchResult[np.ndarray]:
        batcher = self._batchers.get(path)
        if batcher is not None:
            return await batcher.submit((features, candidates), weight=len(candidates.item_ids))
        cpu = time.thread_time()
        value = self.scorers[path].score_batch([features], [candidates])[0]
        return BatchResult(value, 0.0, time.thread_time() - cpu, 1)

    def _retrieve_batch(self, jobs: list[RetrieveJob]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One Faiss search for the batch, at its largest depth; each row cut to its own."""
        vectors = np.stack([vector for vector, _ in jobs])
        ids, scores = self.retriever.retrieve(vectors, max(n for _, n in jobs))
        return [(ids[i, :n], scores[i, :n]) for i, (_, n) in enumerate(jobs)]

    def _start_background(self) -> None:
        if self._refresher is None:
            self.admission.start()
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_fallback())

    async def _refresh_fallback(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.admission.config.fallback_refresh_s)
            # Not on the retrieval thread: a refresh there would hold up the requests behind it.
            await loop.run_in_executor(None, self.fallback.refresh)
            await loop.run_in_executor(None, self.router.share_state)

    def _batch_fn(self, path: Path_) -> Callable[[list[ScoreJob]], list[np.ndarray]]:
        def run(jobs: list[ScoreJob]) -> list[np.ndarray]:
            # The scorer is looked up per batch: a model swap takes effect at the next batch.
            return self.scorers[path].score_batch([j[0] for j in jobs], [j[1] for j in jobs])

        return run

    def swap_full_model(self, scorer: Scorer, model_version: str) -> str:
        """Serve ``scorer`` as the full path from the next batch on (call on the event loop:
        the swap is then atomic for every request); returns the previous version. The old
        scorer is closed on the model thread, after the batch it may be running."""
        old, previous = self.scorers["full"], self.model_version
        self.scorers["full"], self.model_version = scorer, model_version
        self._model_pool.submit(old.close)
        return previous

    # -- Score --------------------------------------------------------------------------------

    async def score(self, query: Query, path: Path_ = "full") -> ScoreResult:
        t0 = time.perf_counter()
        features = self.resolver.resolve(query)
        ids = self.resolver.item_ids(query)
        if path not in self.scorers:
            raise InvalidArgument("path", f"path {path!r} is not served here")
        self._check_deadline(query)
        # The caller's items were not retrieved: their two-tower inner products, as retrieval
        # would have returned them (the cheap path scores from these).
        inner = self.resolver.catalog.item_vectors[ids] @ features.user_vector
        candidates = Candidates(ids, inner.astype(np.float32))
        result = await self._score(path, features, candidates)
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
        # The tracker makes outcomes durable (file fsync or Redis) before it returns, and the
        # router's learning is Python per outcome: both off the loop, on the outcome thread, so a
        # large batch never stalls the requests queued behind it.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._outcome_pool, self._record_outcomes, outcomes)

    def _record_outcomes(self, outcomes: list[Outcome]) -> OutcomeReport:
        report = self.tracker.record_outcomes(outcomes)
        # Only after they are durable: the router learns each (request, item, event) once.
        self.feedback.outcomes(outcomes)
        if self.decision_log is not None:
            for outcome in outcomes:
                self.decision_log.write(outcome)
        return report

    def routing_stats(self) -> dict[str, Any]:
        stats = {
            "router": self.router.stats(),
            "segments": self.tracker.snapshot(),
            "admission": self.admission.stats(),
            "fallback": self.fallback.stats(),
            "batches": {
                name: {"batches": b.batches, "items": b.items, "queued": b.queue_depth}
                for name, b in self._all_batchers()
            },
        }
        store = self.scorers["full"].store_stats() if "full" in self.scorers else None
        if store is not None:
            stats["embedding_store"] = store
        return stats

    def _all_batchers(self) -> list[tuple[str, MicroBatcher[Any, Any]]]:
        return [("retrieval", self._retrieval), *self._batchers.items()]

    def _check_deadline(self, query: Query) -> None:
        if query.deadline is not None and self.clock.now() >= query.deadline:
            raise DeadlineExceeded(f"deadline passed before scoring request {query.request_id}")
