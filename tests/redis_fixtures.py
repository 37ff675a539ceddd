"""Fixtures: a real ``redis-server`` and a real 3-master Redis Cluster on free local ports.

Registered for every test by ``pytest_plugins = ["redis_fixtures"]`` in tests/conftest.py; the
processes come from ``loadtest.redis_local`` (PING / ``cluster_state:ok`` polled under a
bounded timeout, killed at teardown). Missing binaries fail the test: they are required.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from loadtest.redis_local import RedisProcess, local_cluster, local_redis


def _need_binaries() -> None:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.fail("redis-server and redis-cli must be on PATH (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_node() -> Iterator[RedisProcess]:
    """One shared node; tests keep apart by key prefix."""
    _need_binaries()
    with local_redis() as node:
        yield node


@pytest.fixture
def own_redis_node() -> Iterator[RedisProcess]:
    """A node of the test's own, free to kill and restart."""
    _need_binaries()
    with local_redis() as node:
        yield node


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[list[RedisProcess]]:
    """A shared 3-master cluster (no replicas); tests keep apart by key prefix."""
    _need_binaries()
    with local_cluster(3) as nodes:
        yield nodes


@pytest.fixture
def own_redis_cluster() -> Iterator[list[RedisProcess]]:
    """A 3-master cluster of the test's own, free to kill nodes of."""
    _need_binaries()
    with local_cluster(3) as nodes:
        yield nodes
