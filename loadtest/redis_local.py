"""Local ``redis-server`` processes on free ports: one node, or a 3-master Redis Cluster.

For benchmarks and integration tests: real servers, no persistence, bound to 127.0.0.1,
started as child processes and killed on exit. Readiness is polled (PING, then
``cluster_state:ok``) under a bounded timeout.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
_POLL_S = 0.02


def require_binaries() -> None:
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        raise FileNotFoundError(f"{missing} not on PATH (apt-get install redis-server)")


def free_port(*, cluster: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (for a cluster node, its bus port +10000 is free too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if not cluster:
            return port
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


class RedisProcess:
    """One ``redis-server`` child process."""

    def __init__(self, port: int, workdir: Path, *extra: str) -> None:
        self.port = port
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--dir", str(self.workdir), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis(HOST, self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            _poll(lambda: client.ping(), f"redis-server on port {self.port}", timeout_s, self.proc)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, socket_timeout=5.0)


@contextlib.contextmanager
def local_redis() -> Iterator[RedisProcess]:
    require_binaries()
    with tempfile.TemporaryDirectory(prefix="vr-redis-") as tmp:
        node = RedisProcess(free_port(), Path(tmp))
        try:
            node.start()
            yield node
        finally:
            node.kill()


@contextlib.contextmanager
def local_cluster(masters: int = 3, node_timeout_ms: int = 5000) -> Iterator[list[RedisProcess]]:
    """``masters`` cluster nodes, no replicas. Survivors keep serving their own slots when a
    node dies (``cluster-require-full-coverage no``), as a degraded tier should."""
    require_binaries()
    with tempfile.TemporaryDirectory(prefix="vr-cluster-") as tmp:
        nodes = []
        try:
            for i in range(masters):
                workdir = Path(tmp) / f"n{i}"
                workdir.mkdir()
                node = RedisProcess(
                    free_port(cluster=True),
                    workdir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(workdir / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-require-full-coverage",
                    "no",
                )
                nodes.append(node)
                node.start()
            create = ["redis-cli", "--cluster", "create", *[n.address for n in nodes]]
            subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=READY_TIMEOUT_S,
            )
            for node in nodes:
                client = node.client()
                try:
                    _poll(
                        lambda c=client: c.execute_command("CLUSTER INFO").get("cluster_state") == "ok",
                        f"cluster state of {node.address}",
                        READY_TIMEOUT_S,
                        node.proc,
                    )
                finally:
                    client.close()
            yield nodes
        finally:
            for node in nodes:
                node.kill()


def _poll(check: object, what: str, timeout_s: float, proc: subprocess.Popen[bytes] | None) -> None:
    """Call ``check`` until it returns truthy; the short pause only spaces out the polls."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(_POLL_S)
    raise TimeoutError(f"{what} not ready after {timeout_s}s (last error: {last})")
