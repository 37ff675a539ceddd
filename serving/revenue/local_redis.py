"""``redis-server`` child processes on free local ports.

``serve --workers N`` runs one for the revenue tracker its workers share when no Redis is
configured; benchmarks and integration tests run them too (``loadtest.redis_local`` adds a
Redis Cluster). Bound to 127.0.0.1, killed by their owner; readiness is polled (PING) under a
bounded timeout.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
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
            poll_ready(lambda: client.ping(), f"redis-server on port {self.port}", timeout_s, self.proc)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, socket_timeout=5.0)


def poll_ready(check: object, what: str, timeout_s: float, proc: subprocess.Popen[bytes] | None) -> None:
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
