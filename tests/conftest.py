"""Shared fixtures: a tiny but real serving folder, and a real gRPC server on a free port."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dlrm.train import train_world
from dlrm.train_config import TrainConfig
from dlrm.world import World, WorldConfig
from embeddings.catalog import world_catalog
from serving.assets import INDEX_FILE, INDEX_MANIFEST, ServingAssets
from serving.config import ServeConfig
from serving.edge.server import RunningServer, Source, start_server
from serving.pipeline import PipelineConfig

# Real redis-server / Redis Cluster fixtures (tests/redis_fixtures.py).
pytest_plugins = ["redis_fixtures"]

READY_TIMEOUT_S = 60.0
VECTOR_DIM = 16


# -- serving assets -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServingFolder:
    """A trained tiny DLRM and a random-vector Flat index over the tiny world's catalog."""

    world_config: WorldConfig
    model_dir: Path
    index_dir: Path

    def load(self) -> ServingAssets:
        return ServingAssets.load(self.model_dir, self.index_dir)


@pytest.fixture(scope="session")
def serving_assets(tmp_path_factory: pytest.TempPathFactory) -> ServingFolder:
    root = tmp_path_factory.mktemp("serving")
    cfg = WorldConfig.load().replace(train_rows=20000, test_rows=5000, replay_requests=200)
    with warnings.catch_warnings():
        # dlrm.train logs float(loss) of a tensor that requires grad; harmless, torch warns.
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True", UserWarning)
        model = train_world(cfg, root, train_config=TrainConfig(epochs=1), progress=False)
    world = World(cfg)
    rng = np.random.default_rng(0)
    item_vectors = rng.normal(size=(world.n_items, VECTOR_DIM)).astype(np.float32)
    user_vectors = rng.normal(size=(world.n_users, VECTOR_DIM)).astype(np.float32)
    index_dir = root / "index"
    world_catalog(world, item_vectors, user_vectors).save(index_dir)
    index = faiss.IndexFlatIP(VECTOR_DIM)
    index.add(item_vectors)
    faiss.write_index(index, str(index_dir / INDEX_FILE))
    manifest = {"kind": "Flat", "dim": VECTOR_DIM, "items": world.n_items, "source": "tests/conftest.py"}
    (index_dir / INDEX_MANIFEST).write_text(json.dumps(manifest) + "\n")
    return ServingFolder(cfg, model.path, index_dir)


# -- real servers in background threads --------------------------------------------------


class ServerThread:
    """Runs ``start_server`` on its own event loop in a thread (the test thread stays sync)."""

    def __init__(self, source: Source, config: ServeConfig | None = None) -> None:
        self.source = source
        self.config = config or ServeConfig(port=0, grace_s=1.0)
        self.server: RunningServer | None = None
        self.target = ""
        self._started: queue.Queue[int | Exception] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="test-grpc")

    def start(self) -> ServerThread:
        """Bind and start; health may still be NOT_SERVING (see ``wait_serving``)."""
        self._thread.start()
        started = self._started.get(timeout=READY_TIMEOUT_S)
        if isinstance(started, Exception):
            raise started
        self.target = f"{self.config.host}:{started}"
        return self

    def wait_serving(self, service: str = "") -> ServerThread:
        wait_serving(self.target, service)
        return self

    def call(self, coro: Any, timeout: float = READY_TIMEOUT_S) -> Any:
        """Run a coroutine on the server's loop (e.g. ``server.stop()``) and return its result."""
        return self.submit(coro).result(timeout)

    def submit(self, coro: Any) -> Future[Any]:
        if self._loop is None:
            raise RuntimeError("not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(READY_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError("server thread did not stop")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = await start_server(self.source, self.config)
        except Exception as exc:  # handed to start(), which raises it in the test thread
            self._started.put(exc)
            return
        self._started.put(self.server.port)
        await self._stop.wait()
        await self.server.stop()


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = READY_TIMEOUT_S) -> Any:
    """Poll ``check`` until it returns something truthy (returned), or fail naming ``what``: for
    state another process changes (a worker restarted, a model swapped), with no event to wait on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)  # spaces out the polls; the loop ends on the condition, not the pause
    raise AssertionError(f"{what} not seen within {timeout_s:.0f} s")


def wait_serving(target: str, service: str = "", timeout: float = READY_TIMEOUT_S) -> None:
    """Block until ``service``'s health is SERVING: a Watch stream, so no polling loop, no sleep."""
    with grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
        for response in watch:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise RuntimeError(f"health of {service!r} at {target} never became SERVING")


@pytest.fixture
def start_grpc_server() -> Iterator[Callable[..., ServerThread]]:
    """``start(source, config=None) -> ServerThread`` (started, not yet SERVING); stopped at teardown."""
    threads: list[ServerThread] = []

    def start(source: Source, config: ServeConfig | None = None) -> ServerThread:
        threads.append(ServerThread(source, config))
        return threads[-1].start()

    yield start
    for thread in threads:
        thread.stop()


@pytest.fixture(scope="session")
def grpc_server(serving_assets: ServingFolder) -> Iterator[str]:
    """Target ``127.0.0.1:PORT`` of a SERVING server (policy always_full, 200 candidates)."""
    thread = ServerThread(
        serving_assets.load(),
        ServeConfig(port=0, grace_s=1.0, pipeline=PipelineConfig(default_candidates=200)),
    )
    try:
        yield thread.start().wait_serving().target
    finally:
        thread.stop()
