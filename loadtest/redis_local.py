"""Local ``redis-server`` processes on free ports: one node, or a 3-master Redis Cluster.

For benchmarks and integration tests: real servers, no persistence, bound to 127.0.0.1,
started as child processes and killed on exit. Readiness is polled (PING, then
``cluster_state:ok``) under a bounded timeout. One node's process is
``serving.revenue.local_redis.RedisProcess``.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from serving.revenue.local_redis import (
    READY_TIMEOUT_S,
    RedisProcess,
    free_port,
    poll_ready,
    require_binaries,
)

__all__ = ["RedisProcess", "free_port", "local_cluster", "local_redis", "require_binaries"]


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
                    poll_ready(
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
