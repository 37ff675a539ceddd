"""Integration tests of the Redis tier against real redis-server processes on 127.0.0.1.

Rows are pushed from a real model artifact by ``valuerank embeddings push`` (in-process
``main``) and read back through RedisStore / RedisClusterStore: exact in fp32, counted by the
hot-row cache, and degraded (never raised) when a deadline passes or a node dies.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from redis.crc import key_slot

from dlrm.artifact import load_artifact, save_model
from dlrm.data import single_hot_kjt
from dlrm.factored import FactoredDLRM, split_tables
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import DenseFeature, FeatureSchema, SparseFeature
from embeddings import push
from embeddings.clock import ManualClock
from embeddings.redis_store import bucket_of, hash_tag
from embeddings.store import (
    EmbeddingStore,
    RedisClusterStoreConfig,
    RedisStoreConfig,
    StoreBackedTables,
    artifact_tables,
)
from embeddings.store_registry import open_store
from loadtest import bench_redis
from loadtest.redis_local import RedisProcess

pytestmark = pytest.mark.integration

ITEM_TABLES = ["t_item_id", "t_item_category"]
ROWS = 400


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained DLRM artifact (the rows only have to be exact, not good)."""
    schema = FeatureSchema(
        name="redis-test",
        sparse=(
            SparseFeature("user_id", 50, 8, "user"),
            SparseFeature("item_id", ROWS, 8, "item"),
            SparseFeature("item_category", 9, 8, "item"),
        ),
        dense=(DenseFeature("x"),),
    )
    config = ModelConfig(bottom_mlp=(16, 8), top_mlp=(16, 1))
    model = build_dlrm(schema, config, seed=3)
    path = tmp_path_factory.mktemp("redis-artifact") / "model"
    manifest = {
        "version": "redis-test-1",
        "schema": schema.to_dict(),
        "model_config": {"bottom_mlp": list(config.bottom_mlp), "top_mlp": list(config.top_mlp)},
    }
    save_model(path, model, manifest)
    return path


@pytest.fixture(scope="module")
def source(artifact: Path) -> dict[str, np.ndarray]:
    return artifact_tables(load_artifact(artifact).load_model(), ITEM_TABLES)


Opener = Callable[..., EmbeddingStore]


@pytest.fixture
def opened() -> Iterator[Opener]:
    """``open_store`` whose stores are closed at teardown."""
    stores: list[EmbeddingStore] = []

    def make(config: object, clock: object = None) -> EmbeddingStore:
        stores.append(open_store(config, clock=clock))  # type: ignore[arg-type]
        return stores[-1]

    yield make
    for store in stores:
        store.close()


def push_cli(artifact: Path, *target: str, prefix: str, encoding: str = "fp32") -> dict:
    args = [
        "--model",
        str(artifact),
        "--key-prefix",
        prefix,
        "--encoding",
        encoding,
        "--json",
        *target,
    ]
    assert push.main(args) == 0
    return {}


def single(node: RedisProcess, prefix: str, **kw: object) -> RedisStoreConfig:
    return RedisStoreConfig(port=node.port, key_prefix=prefix, **kw)  # type: ignore[arg-type]


def cluster(nodes: list[RedisProcess], prefix: str, **kw: object) -> RedisClusterStoreConfig:
    addrs = ",".join(n.address for n in nodes)
    return RedisClusterStoreConfig(nodes=addrs, key_prefix=prefix, **kw)  # type: ignore[arg-type]


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([rng.integers(0, ROWS, n), rng.integers(0, 9, n)], axis=1)


def assert_exact(rows: np.ndarray, ids: np.ndarray, source: dict[str, np.ndarray]) -> None:
    for f, name in enumerate(ITEM_TABLES):
        np.testing.assert_array_equal(rows[:, f], source[name][ids[:, f]])


# -- exact rows, single node and cluster --------------------------------------------------------


def test_push_then_lookups_equal_source_rows_single_node(
    opened: Opener,
    artifact: Path,
    source: dict[str, np.ndarray],
    redis_node: RedisProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    push_cli(artifact, "--store", "redis", "--port", str(redis_node.port), prefix="exact1")
    report = json.loads(capsys.readouterr().out)
    assert report["tables"]["t_item_id"]["rows"] == ROWS and report["model_version"] == "redis-test-1"
    store = opened(single(redis_node, "exact1", cache_rows=50))
    store.open(ITEM_TABLES)
    rng = np.random.default_rng(0)
    for _ in range(5):  # later passes hit the cache: still exact
        ids = random_ids(rng, 120)
        rows, stats = store.lookup_features(ITEM_TABLES, ids)
        assert_exact(rows, ids, source)
        assert stats.round_trips == 1 and not stats.degraded
    s = store.stats()
    assert s["hits"] + s["misses"] == s["lookups"] == 5 * 240
    assert s["hits"] > 0 and s["evictions"] > 0 and s["cache"]["size"] == 50
    assert s["tables"]["t_item_category"]["hit_rate"] > s["tables"]["t_item_id"]["hit_rate"]


def test_push_then_lookups_equal_source_rows_cluster(
    opened: Opener, artifact: Path, source: dict[str, np.ndarray], redis_cluster: list[RedisProcess]
) -> None:
    nodes = ",".join(n.address for n in redis_cluster)
    push_cli(artifact, "--store", "redis-cluster", "--nodes", nodes, "--buckets", "32", prefix="exact2")
    for node in redis_cluster:  # the table is spread over every master
        assert node.client().dbsize() > 10
    store = opened(cluster(redis_cluster, "exact2"))
    store.open(ITEM_TABLES)
    ids = random_ids(np.random.default_rng(1), 300)
    rows, stats = store.lookup_features(ITEM_TABLES, ids)
    assert_exact(rows, ids, source)
    assert stats.round_trips == 3 and stats.misses == 600 and not stats.degraded


def test_fp16_rows_round_trip_at_half_precision(
    opened: Opener, artifact: Path, source: dict[str, np.ndarray], redis_node: RedisProcess
) -> None:
    push_cli(artifact, "--port", str(redis_node.port), prefix="half", encoding="fp16")
    store = opened(single(redis_node, "half"))
    store.open(ITEM_TABLES)
    rows, _ = store.lookup("t_item_id", np.arange(ROWS))
    np.testing.assert_array_equal(rows, source["t_item_id"].astype(np.float16).astype(np.float32))


def test_scores_through_the_redis_tier_equal_in_process(
    opened: Opener, artifact: Path, redis_node: RedisProcess
) -> None:
    push_cli(artifact, "--port", str(redis_node.port), prefix="score")
    art = load_artifact(artifact)
    schema, model = art.schema, art.load_model()
    request_tables, item_tables = split_tables(model, schema)
    store = opened(single(redis_node, "score", cache_rows=100))
    exact = FactoredDLRM(model, schema, request_tables, item_tables)
    tiered = FactoredDLRM(model, schema, request_tables, StoreBackedTables.for_schema(store, schema, "item"))
    rng = np.random.default_rng(2)
    dense = torch.randn(2, 1)
    req = single_hot_kjt(exact.request_keys, torch.tensor([[4], [17]]))
    for _ in range(3):
        items = single_hot_kjt(exact.item_keys, torch.from_numpy(random_ids(rng, 60)))
        assert torch.equal(tiered(dense, req, items, [25, 35]), exact(dense, req, items, [25, 35]))


# -- deadlines and failures ---------------------------------------------------------------------


def test_a_passed_deadline_serves_cached_rows_and_defaults(
    opened: Opener, artifact: Path, source: dict[str, np.ndarray], redis_node: RedisProcess
) -> None:
    push_cli(artifact, "--port", str(redis_node.port), prefix="late")
    clock = ManualClock(10.0)
    store = opened(single(redis_node, "late", cache_rows=1000), clock=clock)
    store.open(ITEM_TABLES)
    warm = np.array([[1, 1], [2, 2]])
    store.lookup_features(ITEM_TABLES, warm, deadline=11.0)
    ids = np.array([[1, 1], [3, 5]])  # (1, 1) cached, (3, 5) not
    rows, stats = store.lookup_features(ITEM_TABLES, ids, deadline=10.0)
    assert_exact(rows[:1], ids[:1], source)
    for f, name in enumerate(ITEM_TABLES):
        np.testing.assert_allclose(rows[1, f], source[name].mean(axis=0), rtol=1e-6)
    assert (stats.hits, stats.degraded_rows, stats.round_trips) == (2, 2, 0)
    assert store.stats()["degraded_lookups"] == 1


def test_a_hung_node_degrades_within_the_deadline_then_recovers(
    opened: Opener, artifact: Path, source: dict[str, np.ndarray], own_redis_node: RedisProcess
) -> None:
    push_cli(artifact, "--port", str(own_redis_node.port), prefix="hung")
    clock = ManualClock(0.0)
    store = opened(single(own_redis_node, "hung", retry_interval_ms=1000, default_row="zeros"), clock=clock)
    store.open(ITEM_TABLES)
    ids = random_ids(np.random.default_rng(4), 50)
    assert own_redis_node.proc is not None
    os.kill(own_redis_node.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        rows, stats = store.lookup_features(ITEM_TABLES, ids, deadline=clock.now() + 0.05)
        took = time.monotonic() - started
        assert not rows.any() and stats.degraded_rows == 100 and stats.errors == 1
        assert took < 1.0  # bounded by the 50 ms budget (generous slack for a busy machine)
        rows, stats = store.lookup_features(ITEM_TABLES, ids, deadline=clock.now() + 0.05)
        assert stats.round_trips == 0 and stats.degraded_rows == 100  # resting: not even tried
    finally:
        os.kill(own_redis_node.proc.pid, signal.SIGCONT)
    clock.advance(1.0)
    rows, stats = store.lookup_features(ITEM_TABLES, ids, deadline=clock.now() + 5.0)
    assert_exact(rows, ids, source)
    assert not stats.degraded and store.stats()["degraded_lookups"] == 2


def test_a_dead_node_degrades_and_reconnects_when_it_returns(
    opened: Opener, artifact: Path, source: dict[str, np.ndarray], own_redis_node: RedisProcess
) -> None:
    target = ("--port", str(own_redis_node.port))
    push_cli(artifact, *target, prefix="dead")
    clock = ManualClock(0.0)
    store = opened(single(own_redis_node, "dead", retry_interval_ms=500), clock=clock)
    store.open(ITEM_TABLES)
    ids = random_ids(np.random.default_rng(5), 30)
    assert_exact(store.lookup_features(ITEM_TABLES, ids)[0], ids, source)
    own_redis_node.kill()
    for _ in range(3):
        rows, stats = store.lookup_features(ITEM_TABLES, ids, deadline=clock.now() + 0.5)
        assert stats.degraded_rows == 60
        np.testing.assert_allclose(rows[0, 0], source["t_item_id"].mean(axis=0), rtol=1e-6)
        clock.advance(0.2)
    own_redis_node.start()  # same port, empty: push again, as an operator would
    push_cli(artifact, *target, prefix="dead")
    clock.advance(0.5)
    rows, stats = store.lookup_features(ITEM_TABLES, ids, deadline=clock.now() + 5.0)
    assert_exact(rows, ids, source)
    s = store.stats()
    assert (
        not stats.degraded and s["degraded_lookups"] == 3 and s["node_failures"] >= 1 and s["connects"] == 2
    )


def test_killing_a_cluster_node_under_traffic_degrades_only_its_rows(
    opened: Opener, artifact: Path, source: dict[str, np.ndarray], own_redis_cluster: list[RedisProcess]
) -> None:
    nodes = own_redis_cluster
    push_cli(
        artifact, "--store", "redis-cluster", "--nodes", ",".join(n.address for n in nodes), prefix="kill"
    )
    store = opened(cluster(nodes, "kill", retry_interval_ms=200, timeout_ms=200))
    store.open(ITEM_TABLES)
    victim = nodes[1]
    # Which keys live on the victim, from Redis's own slot map (not the store's).
    owner = {}
    for start, end, master in nodes[0].client().execute_command("CLUSTER SLOTS"):
        for slot in range(int(start), int(end) + 1):
            owner[slot] = int(master[1])

    def on_victim(name: str, ids: np.ndarray) -> np.ndarray:
        tags = [hash_tag("kill", name, int(b)).encode() for b in bucket_of(ids, push.DEFAULT_BUCKETS)]
        return np.array([owner[key_slot(t)] == victim.port for t in tags])

    rng = np.random.default_rng(6)
    degraded_calls = 0
    for i in range(60):
        if i == 20:
            victim.kill()
        ids = random_ids(rng, 40)
        rows, stats = store.lookup_features(ITEM_TABLES, ids, deadline=time.monotonic() + 0.5)
        assert rows.shape == (40, 2, 8)
        for f, name in enumerate(ITEM_TABLES):
            dead = on_victim(name, ids[:, f]) if i >= 20 else np.zeros(len(ids), dtype=bool)
            np.testing.assert_array_equal(rows[~dead, f], source[name][ids[~dead, f]])
            np.testing.assert_allclose(
                rows[dead, f], np.broadcast_to(source[name].mean(0), rows[dead, f].shape), rtol=1e-6
            )
        degraded_calls += int(stats.degraded)
    s = store.stats()
    assert degraded_calls == s["degraded_lookups"] == 40
    assert s["errors"] >= 1 and s["node_failures"] >= 1


def test_bench_redis_runs_and_reports_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--items", "3000", "--dim", "8", "--candidates", "40", "--warmup", "30"]
    assert bench_redis.main([*args, "--requests", "20", "--no-cluster", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["lookup_ms"]) == set(out["scoring_ms"]) == {"in_process", "redis"}
    assert 0.0 < out["hit_rate"] <= out["oracle_hit_rate"]["all_item_tables"] + 0.05
    assert out["stores"]["redis"]["lookups"] == 20 * 40 * 3
    assert out["stores"]["redis"]["round_trips_per_request"] <= 1.0
    assert out["degraded_lookups"]["redis"] == 0
