"""Server lifecycle: bind, report NOT_SERVING while loading, SERVING once loaded, drain on stop.

The port opens before the model and index are loaded, so orchestrators see a live process
whose health says NOT_SERVING (and whose Recommender answers UNAVAILABLE) until loading ends;
then both the overall health ``""`` and ``valuerank.v1.Recommender`` turn SERVING. A server that
shares its port (``reuse_port``: a worker of ``serve --workers``) binds only once loaded, so
that no connection lands on it before it can serve. Stopping
turns health NOT_SERVING first, lets in-flight calls finish within ``grace_s``, then closes
the pipeline.

The port speaks TLS (mutual TLS with ``tls_client_ca``) when the config names a certificate.
Beside the Recommender it serves the Admin service (``serving.edge.admin``): ``ReloadModel``
and the watched model folder both go through ``RunningServer.reload_model`` (``serving.reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from dlrm.artifact import MANIFEST, is_complete
from serving.assembly import build_pipeline
from serving.assets import ServingAssets
from serving.config import ServeConfig
from serving.edge.admin import ADMIN_SERVICE_NAME, AdminServicer, add_admin_to_server
from serving.edge.servicer import SERVICE_NAME, RecommenderServicer, add_to_server
from serving.errors import NotReady
from serving.pipeline import Pipeline
from serving.reload import ModelReloader, Prepared

log = logging.getLogger(__name__)

SERVICE_NAMES = (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)

Source = ServingAssets | Callable[[], ServingAssets | Pipeline]
"""What to serve: loaded assets, or a loader run on a worker thread (it may train for minutes)."""


async def start_server(source: Source, config: ServeConfig) -> RunningServer:
    """Bind and start serving health and reflection now; load ``source`` in the background."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(config.reuse_port))])
    servicer = RecommenderServicer(max_outcomes=config.max_outcomes)
    admin = AdminServicer(config.admin_token)
    health_servicer = health.aio.HealthServicer()
    add_to_server(servicer, server)
    add_admin_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    running = RunningServer(server, servicer, health_servicer, config)
    admin.reload = running.reload_model
    if config.reuse_port:
        # One of several processes on the port: the kernel would hand a loading one its share of
        # new connections, to be answered UNAVAILABLE; it binds once it can serve them.
        running.start_loading(source)
        await running.wait_ready()
    address = f"{config.host}:{config.port}"
    credentials = _tls(config)
    port = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    running.port = port
    await server.start()
    if not config.reuse_port:
        running.start_loading(source)
    return running


def _tls(config: ServeConfig) -> grpc.ServerCredentials | None:
    """The port's TLS credentials from the config's PEM files (None: plaintext)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    key, chain = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = None if config.tls_client_ca is None else Path(config.tls_client_ca).read_bytes()
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


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
        self._reloader: ModelReloader | None = None
        self._watcher: asyncio.Task[None] | None = None

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
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
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
                self._reloader = ModelReloader(assets, self.config, loaded.resolver)
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
        if self.config.model_watch_dir is not None and self._reloader is not None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_models(Path(self.config.model_watch_dir))
            )

    async def reload_model(self, model_dir: Path | None) -> tuple[Prepared, str]:
        """Load ``model_dir`` beside the serving model (a worker thread), then swap it in on the
        loop; what was swapped in and the version it replaced. Raises (the old model serving on)
        when the folder is refused."""
        pipeline = self.servicer.pipeline
        if pipeline is None or self._reloader is None:
            raise NotReady("reloading needs a server that loaded its own assets")
        prepared = await asyncio.get_running_loop().run_in_executor(None, self._reloader.prepare, model_dir)
        previous = pipeline.swap_full_model(prepared.scorer, prepared.version)
        log.info(
            "model %s -> %s from %s in %.1f s (resident %.0f MiB, peak %.0f MiB while loading)",
            previous,
            prepared.version,
            prepared.model_dir,
            prepared.load_s,
            prepared.steady_rss_bytes / 2**20,
            prepared.peak_rss_bytes / 2**20,
        )
        return prepared, previous

    async def _watch_models(self, folder: Path) -> None:
        """Every ``model_watch_s``: swap in the newest complete artifact under ``folder`` when it
        is not the one serving (a refused one is retried only once its manifest changes)."""
        refused: set[tuple[Path, float]] = set()
        while True:
            await asyncio.sleep(self.config.model_watch_s)
            newest = _newest_artifact(folder)
            if (
                newest is None
                or self._reloader is None
                or newest[0] == self._reloader.assets.model.path.resolve()
            ):
                continue
            if newest in refused:
                continue
            try:
                await self.reload_model(newest[0])
            except Exception as exc:
                refused.add(newest)
                log.error("watched model %s refused, still serving the old one: %s", newest[0], exc)

    def _build(self, assets: ServingAssets) -> Pipeline:
        return build_pipeline(assets, self.config)


def _newest_artifact(folder: Path) -> tuple[Path, float] | None:
    """The complete artifact folder under ``folder`` whose manifest was written last, and when."""
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        if child.is_dir() and is_complete(child):
            found.append((child.resolve(), (child / MANIFEST).stat().st_mtime))
    return max(found, key=lambda item: item[1], default=None)


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
