"""Server lifecycle: bind, report NOT_SERVING while loading, SERVING once loaded, drain on stop.

The port opens before the model and index are loaded, so orchestrators see a live process
whose health says NOT_SERVING (and whose Recommender answers UNAVAILABLE) until loading ends;
then both the overall health ``""`` and ``valuerank.v1.Recommender`` turn SERVING. A server that
shares its port (``reuse_port``: a worker of ``serve --workers``) binds only once loaded, so
that no connection lands on it before it can serve. Stopping
turns health NOT_SERVING first, lets in-flight calls finish within ``grace_s``, then closes
the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from serving.assembly import build_pipeline
from serving.assets import ServingAssets
from serving.config import ServeConfig
from serving.edge.servicer import SERVICE_NAME, RecommenderServicer, add_to_server
from serving.pipeline import Pipeline

log = logging.getLogger(__name__)

SERVICE_NAMES = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)

Source = ServingAssets | Callable[[], ServingAssets | Pipeline]
"""What to serve: loaded assets, or a loader run on a worker thread (it may train for minutes)."""


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
    running = RunningServer(server, servicer, health_servicer, config)
    if config.reuse_port:
        # One of several processes on the port: the kernel would hand a loading one its share of
        # new connections, to be answered UNAVAILABLE; it binds once it can serve them.
        running.start_loading(source)
        await running.wait_ready()
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    running.port = port
    await server.start()
    if not config.reuse_port:
        running.start_loading(source)
    return running


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: RecommenderServicer,
        health_servicer: health.aio.HealthServicer,
        config: ServeConfig,
    ) -> None:
        self.server = server
        self.servicer = servicer
        self.health = health_servicer
        self.config = config
        self.port = 0
        """The bound port (set once bound)."""
        self._loading: asyncio.Task[None] | None = None
        self._stopped = False
        self._metrics_http: Any = None
        self.metrics_port: int | None = None
        """The Prometheus port once serving (``config.metrics_port``; None: no metrics)."""

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
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._loading is not None:
            self._loading.cancel()  # a loader thread still running runs on; nobody uses its result
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.servicer.pipeline is not None:
            await self.servicer.pipeline.close()

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
        # The model, index and catalog are hundreds of thousands of long-lived objects; a full
        # collection walking them stalls the event loop for tens of milliseconds. Frozen, the
        # collector only ever walks what requests allocate.
        gc.collect()
        gc.freeze()
        self.servicer.set_pipeline(loaded)
        if self.config.metrics_port is not None:
            # A thread of its own serves /metrics; a scrape reads the pipeline's counters there.
            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, self.config.metrics_host, registry=loaded.metrics.registry
            )
            self.metrics_port = int(self._metrics_http.server_port)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s on %s (model %s)", SERVICE_NAME, self.address, loaded.model_version)

    def _build(self, assets: ServingAssets) -> Pipeline:
        return build_pipeline(assets, self.config)


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
