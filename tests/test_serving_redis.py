"""The Redis embedding tier wired into serving, against real redis-server processes.

Item-side rows are pushed from the tiny trained world model by ``valuerank embeddings push``
(in-process ``main``) and served by a pipeline (or a real gRPC server started with
``item_store_config``) through the hot-row cache; request-side tables stay in process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from embeddings import push
from embeddings.clock import ManualClock
from embeddings.store import MemoryStore, RedisStoreConfig
from embeddings.store_registry import load_store_config, open_store, store_config_from_dict
from loadtest import bench_serving
from loadtest.redis_local import RedisProcess
from serving.assembly import build_pipeline
from serving.assets import ServingAssets
from serving.config import ScoringConfig, ServeConfig
from serving.domain import Candidates, Query, Recommendation
from serving.edge.client import RecommenderClient
from serving.pipeline import Pipeline, PipelineConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread, ServingFolder

    StartServer = Callable[..., ServerThread]

pytestmark = pytest.mark.integration

CANDIDATES = 200
ITEM_FEATURES = 3  # item_id, item_category, item_price_bucket in the world schema


def _fp32(**fields: Any) -> ServeConfig:
    """A config with fp32 tables and MLP, whatever the model folder measured."""
    return ServeConfig(scoring=ScoringConfig(precision="fp32", mlp_precision="fp32"), **fields)


@pytest.fixture(scope="module")
def assets(serving_assets: ServingFolder) -> ServingAssets:
    return serving_assets.load()


def _push(node: RedisProcess, model_dir: Path, prefix: str) -> None:
    argv = ["--model", str(model_dir), "--port", str(node.port), "--key-prefix", prefix, "--json"]
    assert push.main(argv) == 0


def _queries(n: int, surfaces: list[str], deadline: float | None = None) -> list[Query]:
    return [
        Query(
            f"r{i}",
            user_id=i * 7,
            surface=surfaces[i % len(surfaces)],
            sparse={},
            dense={},
            k=20,
            deadline=deadline,
        )
        for i in range(n)
    ]


def _in_process(assets: ServingAssets) -> Pipeline:
    return build_pipeline(assets, _fp32(pipeline=PipelineConfig(default_candidates=CANDIDATES)))


def test_grpc_server_with_redis_tier_ranks_like_in_process_and_reports_store_counters(
    assets: ServingAssets,
    serving_assets: ServingFolder,
    redis_node: RedisProcess,
    start_grpc_server: StartServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _push(redis_node, serving_assets.model_dir, "serve1")
    capsys.readouterr()
    config_file = tmp_path / "store.json"
    config_file.write_text(
        json.dumps({"type": "redis", "port": redis_node.port, "key_prefix": "serve1", "cache_rows": 300})
    )
    serve = _fp32(  # equal to the in-process pipeline's scores, bit for bit
        port=0,
        grace_s=1.0,
        pipeline=PipelineConfig(default_candidates=CANDIDATES),
        item_store=load_store_config(config_file),
    )
    server = start_grpc_server(assets, serve).wait_serving()
    queries = _queries(12, assets.catalog.surfaces)

    async def both() -> tuple[list[Recommendation], list[Recommendation], dict[str, Any]]:
        local = _in_process(assets)
        try:
            expected = [await local.recommend(q) for q in queries]
        finally:
            await local.close()
        async with RecommenderClient(server.target) as client:
            got = [await client.recommend(q, timeout_s=30.0) for q in queries]  # a deadline the store sees
            stats = await client.routing_stats(timeout_s=30.0)
        return expected, got, stats

    expected, got, stats = asyncio.run(both())
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have.item_ids, want.item_ids)
        np.testing.assert_allclose(have.scores, want.scores, rtol=0, atol=1e-6)
    store = stats["embedding_store"]
    assert isinstance(store, dict)
    assert store["lookups"] == len(queries) * CANDIDATES * ITEM_FEATURES
    assert store["hits"] + store["misses"] == store["lookups"] and store["hits"] > 0
    assert store["degraded_lookups"] == 0 and store["errors"] == 0
    assert {"evictions", "hit_rate", "tables"} <= set(store)


def test_request_deadline_reaches_the_store_and_a_late_lookup_serves_default_rows(
    assets: ServingAssets,
    serving_assets: ServingFolder,
    redis_node: RedisProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _push(redis_node, serving_assets.model_dir, "deadline1")
    capsys.readouterr()
    clock = ManualClock(100.0)
    store = open_store(
        RedisStoreConfig(port=redis_node.port, key_prefix="deadline1", cache_rows=300), clock=clock
    )
    remote = build_pipeline(assets, _fp32(), clock=clock, item_store=store)
    local = _in_process(assets)
    try:
        surface = assets.catalog.surfaces[0]
        late = remote.resolver.resolve(Query("late", 3, surface, {}, {}, deadline=99.0))
        on_time = remote.resolver.resolve(Query("ok", 3, surface, {}, {}, deadline=101.0))
        assert late.deadline == 99.0
        cand = Candidates(np.arange(50, dtype=np.int64), np.zeros(50, dtype=np.float32))
        exact = local.scorers["full"].score_batch([on_time], [cand])[0]
        full = remote.scorers["full"]

        # Requests read together share the earliest deadline: a cold cache cannot be filled in time.
        degraded = full.score_batch([late, on_time], [cand, cand])
        stats = full.store_stats()
        assert stats is not None
        assert stats["degraded_lookups"] == 1 and stats["degraded_rows"] == 2 * 50 * ITEM_FEATURES
        assert not np.allclose(degraded[1], exact, atol=1e-6)  # default (mean) rows were used
        np.testing.assert_allclose(full.score_batch([on_time], [cand])[0], exact, rtol=0, atol=1e-6)

        # Now the rows are cached: a late request needs no round trip and is exact.
        np.testing.assert_allclose(full.score_batch([late], [cand])[0], exact, rtol=0, atol=1e-6)
        routing = remote.routing_stats()["embedding_store"]
        assert routing["degraded_lookups"] == 1 and routing["lookup_calls"] == 3
        assert "embedding_store" not in local.routing_stats()
    finally:
        asyncio.run(remote.close())
        asyncio.run(local.close())
        store.close()


def test_killed_redis_under_traffic_keeps_every_recommend_succeeding_degraded_and_counted(
    assets: ServingAssets,
    serving_assets: ServingFolder,
    own_redis_node: RedisProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _push(own_redis_node, serving_assets.model_dir, "kill1")
    capsys.readouterr()
    config = RedisStoreConfig(
        port=own_redis_node.port, key_prefix="kill1", cache_rows=100, timeout_ms=500, retry_interval_ms=20
    )
    store = open_store(config)
    pipeline = build_pipeline(
        assets, _fp32(pipeline=PipelineConfig(default_candidates=CANDIDATES)), item_store=store
    )
    surfaces = assets.catalog.surfaces
    done: list[int] = []
    served_when_killed: list[int] = []

    async def worker(w: int) -> None:
        i = 0
        while len(done) < 60:
            q = Query(
                f"w{w}-{i}",
                (w * 1000 + i) % 5000,
                surfaces[(w + i) % len(surfaces)],
                {},
                {},
                k=20,
                deadline=pipeline.clock.now() + 30.0,
            )
            rec = await pipeline.recommend(q)
            assert len(rec.item_ids) == 20 and np.isfinite(rec.scores).all()
            done.append(1)
            i += 1
            if len(done) == 15 and not served_when_killed:
                served_when_killed.append(len(done))
                own_redis_node.kill()  # mid-stream: other workers' requests are in flight

    async def traffic() -> dict[str, object]:
        try:
            await asyncio.gather(*(worker(w) for w in range(4)))
            return pipeline.routing_stats()
        finally:
            await pipeline.close()

    try:
        stats = asyncio.run(traffic())
    finally:
        store.close()
    assert served_when_killed and len(done) >= 60
    counters = stats["embedding_store"]
    assert isinstance(counters, dict)
    assert counters["degraded_lookups"] > 0 and counters["degraded_rows"] > 0 and counters["errors"] > 0
    assert counters["hits"] > 0  # cached rows still serve while the node is down


def test_store_config_files_are_typed_and_checked(
    assets: ServingAssets, serving_assets: ServingFolder
) -> None:
    memory = store_config_from_dict({"type": "memory"}, model_dir=serving_assets.model_dir)
    assert memory == store_config_from_dict({"type": "memory", "artifact": str(serving_assets.model_dir)})
    redis_cfg = store_config_from_dict({"type": "redis", "port": 7001, "cache_mb": 8})
    assert isinstance(redis_cfg, RedisStoreConfig) and redis_cfg.port == 7001 and redis_cfg.cache_mb == 8
    with pytest.raises(ValueError, match="unknown redis store settings"):
        store_config_from_dict({"type": "redis", "nodes": "h:1"})
    with pytest.raises(ValueError, match="store type"):
        store_config_from_dict({"type": "dynamo"})
    with pytest.raises(ValueError, match="port"):
        store_config_from_dict({"type": "redis", "port": 0})
    # The memory store goes through the same StoreBackedTables path and ranks like FBGEMM fp32.
    store = open_store(memory)
    assert isinstance(store, MemoryStore)
    remote = build_pipeline(assets, _fp32(), item_store=store)
    local = _in_process(assets)
    try:
        features = local.resolver.resolve(Query("m", 1, assets.catalog.surfaces[1], {}, {}))
        cand = Candidates(np.arange(0, 5000, 37, dtype=np.int64), np.zeros(136, dtype=np.float32))
        np.testing.assert_allclose(
            remote.scorers["full"].score_batch([features], [cand])[0],
            local.scorers["full"].score_batch([features], [cand])[0],
            rtol=0,
            atol=1e-6,
        )
    finally:
        asyncio.run(remote.close())
        asyncio.run(local.close())


def test_bench_serving_smoke_prints_both_p99s_ratio_and_hit_rates(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--items", "2000", "--users", "500", "--candidates", "100", "--warmup", "20"]
    argv += ["--requests", "30", "--concurrency", "2", "--cluster", "--late-lookup-arm", "--json"]
    assert bench_serving.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    remote = {"redis", "redis_cluster", "redis_late_lookup"}
    for arm in ("in_process", *remote):
        assert {"p50", "p99"} <= set(out[arm]["recommend_ms"]) and out[arm]["errors"] == 0
    assert set(out["ratio_p99"]) == remote and out["ratio_p99"]["redis"] > 0
    assert 0 < out["hit_rate"]["item_id"] <= out["hit_rate"]["overall"] <= 1
    assert out["degraded_lookups"] == dict.fromkeys(remote, 0)
    assert out["stores"]["redis"]["lookups"] == 30 * 100 * ITEM_FEATURES
    assert out["cache_rows"] == int(0.05 * (2000 + 32 + 16)) and "load_average_1m" in out["machine"]
    assert bench_serving.main(["--cache-frac", "0"]) == 2
