"""Server lifecycle: bind, report NOT_SERVING while loading, SERVING once loaded, drain on stop.

The port opens before the model and index are loaded, so orchestrators see a live process
whose health says NOT_SERVING (and whose Recommender answers UNAVAILABLE) until loading ends;
then both the overall health ``""`` and ``valuerank.v1.Recommender`` turn SERVING. Stopping
turns health NOT_SERVING first, lets in-flight calls finish within ``grace_s``, then closes
the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embeddings.store import EmbeddingStore
from embeddings.store_registry import load_store_config, open_store
from serving.assets import ServingAssets, build_pipeline, check_scoring_choices
from serving.decision_log import DecisionLog
from serving.edge.convert import MAX_OUTCOMES
from serving.edge.servicer import SERVICE_NAME, RecommenderServicer, add_to_server
from serving.pipeline import Pipeline, PipelineConfig
from serving.ranking import RankBy, item_values_for
from serving.revenue.backends import load_tracker_config, make_tracker
from serving.routing.policies import POLICY_NAMES, make_router

log = logging.getLogger(__name__)

SERVICE_NAMES = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)

Source = ServingAssets | Callable[[], ServingAssets | Pipeline]
"""What to serve: loaded assets, or a loader run on a worker thread (it may train for minutes)."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Interface to listen on (``0.0.0.0`` for all)."""
    port: int = 50051
    """TCP port; 0 picks a free one (``RunningServer.port`` tells which)."""
    grace_s: float = 5.0
    """On stop, how long in-flight calls may take to finish before they are cancelled."""
    default_candidates: int = 500
    """Candidates retrieved when a request does not say."""
    max_batch_size: int = 16
    """Most concurrent requests the full model scores in one call."""
    batch_timeout_ms: float = 0.5
    """How long the micro-batcher waits for more requests after the first."""
    model_threads: int = 1
    """torch intra-op threads of the full model."""
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    """Embedding tables of the full model: auto = the cheapest measured to lose < 0.001 AUC
    (``valuerank bench precision``; cached in the model folder's precision.json)."""
    mlp_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The full model's per-candidate MLP: auto = bf16 where the CPU multiplies bf16 natively
    (AVX-512 BF16, AMX) and ``valuerank bench precision`` measured it within 0.001 AUC, else fp32."""
    rank_by: RankBy = "value"
    """Order of the returned items: value = expected value, P(click) x the item's price (the
    revenue-maximising slate; P(click) alone when the catalog has no prices); click = P(click)."""
    retrieval_value_weight: float = 1.0
    """Candidates are the top by ``<user, item> + w x log price`` (index with a log-price
    coordinate): 1 = by the two-tower's expected value, 0 = by click affinity alone."""
    policy: str = "always_full"
    """Routing policy: always_full, always_cheap, static_tiers or value_aware
    (``serving.routing.policies``)."""
    seed: int = 0
    """Seed of the router's exploration draws."""
    tracker_config: str | None = None
    """Revenue tracker config file (JSON, e.g. ``{"type": "redis", "url": ...}``); None: in-process,
    in memory only."""
    item_store_config: str | None = None
    """Item-side embedding store config file (JSON, e.g. ``{"type": "redis", "port": 6379,
    "cache_rows": 50000}``; rows pushed by ``valuerank embeddings push``); None: item tables
    in process. Request-side tables stay in process either way."""
    decision_log: str | None = None
    """Append every routing decision and outcome to this JSONL file (``serving.decision_log``) for
    off-policy evaluation with ``valuerank replay --log``; None: no log."""
    max_outcomes: int = MAX_OUTCOMES
    """Most outcomes accepted in one ReportOutcomes call."""
    reuse_port: bool = False
    """Let several processes share the port (``grpc.so_reuseport``); off, a busy port is an error."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{self.port=} must be in 0..65535")
        if self.grace_s < 0:
            raise ValueError(f"{self.grace_s=} must be >= 0")
        if self.model_threads < 1:
            raise ValueError(f"{self.model_threads=} must be >= 1")
        check_scoring_choices(self.precision, self.mlp_precision, self.rank_by, self.retrieval_value_weight)
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"{self.policy=} must be one of {POLICY_NAMES}")
        if self.max_outcomes < 1:
            raise ValueError(f"{self.max_outcomes=} must be >= 1")
        self.pipeline_config()  # validates the batching fields

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            default_candidates=self.default_candidates,
            max_batch_size=self.max_batch_size,
            batch_timeout_ms=self.batch_timeout_ms,
        )


async def start_server(source: Source, config: ServeConfig) -> RunningServer:
    """Bind and start serving health and reflection now; load ``source`` in the background."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(config.reuse_port))])
    servicer = RecommenderServicer(max_outcomes=config.max_outcomes)
    health_servicer = health.aio.HealthServicer()
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    await server.start()
    running = RunningServer(server, servicer, health_servicer, config, port)
    running.start_loading(source)
    return running


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: RecommenderServicer,
        health_servicer: health.aio.HealthServicer,
        config: ServeConfig,
        port: int,
    ) -> None:
        self.server = server
        self.servicer = servicer
        self.health = health_servicer
        self.config = config
        self.port = port
        self._loading: asyncio.Task[None] | None = None
        self._stopped = False
        self._item_store: EmbeddingStore | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def pipeline(self) -> Pipeline | None:
        return self.servicer.pipeline

    def start_loading(self, source: Source) -> None:
        self._loading = asyncio.get_running_loop().create_task(self._load(source))

    async def wait_ready(self) -> None:
        """Return once SERVING; raise what loading raised if it failed."""
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, drain in-flight calls, close the pipeline. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s if grace_s is None else grace_s)
        if self._loading is not None:
            self._loading.cancel()  # a loader thread still running runs on; nobody uses its result
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.servicer.pipeline is not None:
            await self.servicer.pipeline.close()
        if self._item_store is not None:
            self._item_store.close()

    async def _load(self, source: Source) -> None:
        try:
            loaded = source if isinstance(source, ServingAssets) else await _in_daemon_thread(source)
            if isinstance(loaded, ServingAssets):
                assets = loaded
                loaded = await _in_daemon_thread(lambda: self._build(assets))
        except Exception:
            log.exception("loading the model and index failed; health stays NOT_SERVING")
            raise
        if self._stopped:
            await loaded.close()
            return
        self.servicer.set_pipeline(loaded)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s on %s (model %s)", SERVICE_NAME, self.address, loaded.model_version)

    def _build(self, assets: ServingAssets) -> Pipeline:
        cfg = self.config
        tracker = None
        if cfg.tracker_config is not None:
            tracker = make_tracker(load_tracker_config(Path(cfg.tracker_config)))
        if cfg.item_store_config is not None:
            store_config = load_store_config(Path(cfg.item_store_config), model_dir=assets.model.path)
            self._item_store = open_store(store_config)  # monotonic: the pipeline's clock
        return build_pipeline(
            assets,
            router=make_router(
                cfg.policy,
                rng_seed=cfg.seed,
                schema=assets.model.schema,
                item_values=item_values_for(cfg.rank_by, assets.catalog.item_price),
            ),
            decision_log=DecisionLog(Path(cfg.decision_log)) if cfg.decision_log else None,
            tracker=tracker,
            config=self.config.pipeline_config(),
            model_threads=self.config.model_threads,
            precision=self.config.precision,
            mlp_precision=self.config.mlp_precision,
            item_store=self._item_store,
            rank_by=cfg.rank_by,
            retrieval_value_weight=cfg.retrieval_value_weight,
        )


T = TypeVar("T")


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a daemon thread: unlike an executor's, a stop never waits for it to end."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            setter: Callable[[Any], None] = future.set_exception
            value: Any = exc
        else:
            setter, value = future.set_result, result
        with contextlib.suppress(RuntimeError):  # the loop closed while we loaded: nobody waits
            loop.call_soon_threadsafe(settle, setter, value)

    threading.Thread(target=run, name="vr-load", daemon=True).start()
    return await future
