"""`valuerank bench serving`: Recommend latency with item embeddings from the Redis tier, as JSON.

The same Recommend request stream runs, interleaved request by request in one process,
through pipelines that differ only in where the item-side embedding rows live:

* ``in_process``: FBGEMM fp32 tables (``serving.assembly.build_pipeline``);
* ``redis``: a local ``redis-server`` behind the hot-row cache, fp32 rows pushed by
  ``embeddings.push`` (what ``valuerank serve --item-store-config`` serves): each request's
  rows are prefetched when it queues for the micro-batcher (``serving.item_rows``);
* ``redis_cluster`` (``--cluster``): a local 3-master Redis Cluster, same cache;
* ``redis_late_lookup`` (``--late-lookup-arm``): the single node without the prefetch that
  overlaps each request's round trip with the micro-batch window (an A/B of it).

Request-side tables stay in process (FBGEMM fp32) in every pipeline.

World: the world's schema and model config with ``item_id`` scaled to ``--items`` rows (bench
redis's schema), random weights (latency does not depend on training), a catalog of those
items and ``--users`` users. Traffic: each request's ``--candidates`` candidates are iid draws
from Zipf(``--zipf``) item popularity (bench redis's ``Traffic``), so every item lookup is a
Zipf draw; a real retriever's candidates are distinct, which saturates the head of a Zipf
(at K = 500 the top ~hundreds of items are in every request) and is not Zipf traffic any more.
The candidates are replayed by a retriever stub, so Faiss search is not in the figures; it
would add the same time to both arms, so the p99 ratio printed is an upper bound.

Reported: ``recommend_ms`` (p50/p90/p99 of ``Pipeline.recommend`` wall time) per arm, stage
medians, ``ratio_p99`` per Redis arm, the hot-row cache's hit rate after warm-up (overall and
per table, and the best static cache of that size: ``oracle_hit_rate``), degraded lookups,
and the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from dlrm.artifact import save_model
from dlrm.configs import add_flags, from_flags
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import FeatureSchema
from dlrm.world import WorldConfig
from embeddings.catalog import Catalog
from embeddings.hot_cache import Policy
from embeddings.push import push_tables
from embeddings.store import (
    EmbeddingStore,
    RedisClusterStoreConfig,
    RedisStoreConfig,
    artifact_tables,
    side_tables,
)
from embeddings.store_registry import open_store
from loadtest.bench_redis import RedisBenchConfig, Traffic, bench_schema, delta_stats, percentiles
from loadtest.redis_local import local_cluster, local_redis
from serving.assembly import build_pipeline
from serving.assets import ServingAssets
from serving.config import ScoringConfig, ServeConfig
from serving.domain import Candidates, Query, RequestFeatures
from serving.errors import DeadlineExceeded
from serving.pipeline import Pipeline, PipelineConfig
from serving.retriever import Retriever
from serving.scoring import Scorer

VECTOR_DIM = 16
VERSION = "bench-serving"


@dataclass(frozen=True)
class ServingBenchConfig:
    items: int = 200_000
    """Rows of the item_id table (= catalog items); the other tables keep the world's sizes."""
    dim: int = 16
    """Embedding dim of every table (the world model's is 16)."""
    users: int = 20_000
    """Users in the catalog."""
    candidates: int = 500
    """Candidates scored per Recommend (K)."""
    k: int = 10
    """Items returned per Recommend."""
    zipf: float = 1.05
    """Zipf exponent of item popularity."""
    cache_frac: float = 0.05
    """Hot-row cache size as a fraction of all item-side rows."""
    cache_policy: Policy = "tinylfu"
    """Hot-row cache policy (tinylfu or lru)."""
    warmup: int = 1000
    """Requests per arm that warm caches and code paths before anything is measured."""
    requests: int = 2000
    """Measured requests per arm."""
    concurrency: int = 1
    """Requests in flight per arm (more than 1 exercises the micro-batcher: one store lookup per batch)."""
    buckets: int = 16
    """Hash buckets per table (a cluster gets one MGET per node, table and bucket of the misses)."""
    deadline_ms: float = 100.0
    """Per-request deadline; item rows not fetched by then are default rows (counted)."""
    cluster: bool = False
    """Also measure a local 3-master Redis Cluster."""
    late_lookup_arm: bool = False
    """Also measure the single node without prefetch (each request's store lookup starts when
    its batch is scored, not when it queues): an A/B of the prefetch."""
    threads: int = 1
    """torch intra-op threads of the full model."""
    seed: int = 0
    """Seed of weights, catalog and traffic."""

    def __post_init__(self) -> None:
        if self.items < 100 or self.dim < 1 or self.users < 1:
            raise ValueError(f"{self.items=} must be >= 100, {self.dim=} and {self.users=} >= 1")
        if not 1 <= self.k <= self.candidates:
            raise ValueError(f"{self.k=} must be in 1..{self.candidates=}")
        if self.zipf <= 0 or not 0 < self.cache_frac <= 1:
            raise ValueError(f"{self.zipf=} must be > 0 and {self.cache_frac=} in (0, 1]")
        if self.cache_policy not in ("tinylfu", "lru"):
            raise ValueError(f"{self.cache_policy=} must be tinylfu or lru")
        if self.warmup < 0 or self.requests < 10 or self.concurrency < 1:
            raise ValueError(f"need {self.warmup=} >= 0, {self.requests=} >= 10, {self.concurrency=} >= 1")
        if self.buckets < 1 or self.threads < 1 or self.deadline_ms <= 0:
            raise ValueError(f"need {self.buckets=} >= 1, {self.threads=} >= 1, {self.deadline_ms=} > 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="valuerank bench serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON line instead of indented JSON")
    add_flags(parser, ServingBenchConfig)
    ns = parser.parse_args(argv)
    try:
        config = from_flags(ServingBenchConfig, ns)
    except ValueError as exc:
        print(f"bench serving: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(run(config), indent=None if ns.json else 2))
    return 0


def run(cfg: ServingBenchConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    traffic_cfg = RedisBenchConfig(
        items=cfg.items, dim=cfg.dim, candidates=cfg.candidates, zipf=cfg.zipf, seed=cfg.seed
    )
    schema = bench_schema(traffic_cfg)
    traffic = Traffic(schema, traffic_cfg)
    n_requests = cfg.warmup + cfg.requests
    item_col = [schema.sparse[i].name for i in schema.side_indices("item")].index("item_id")
    stream = [traffic.request()[:, item_col] for _ in range(n_requests)]
    _, item_tables = side_tables(schema, "item")
    with tempfile.TemporaryDirectory(prefix="vr-bench-serving-") as tmp, contextlib.ExitStack() as stack:
        assets = bench_assets(cfg, schema, traffic.features, Path(tmp))
        weights = artifact_tables(assets.model.load_model(), item_tables)
        total_rows = sum(len(w) for w in weights.values())
        cache_rows = max(1, int(cfg.cache_frac * total_rows))
        out: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "tables": {t: len(w) for t, w in weights.items()},
            "cache_rows": cache_rows,
            "oracle_hit_rate": traffic.oracle_hit_rate(cache_rows),
            "push_seconds": {},
        }
        stores: dict[str, EmbeddingStore] = {}
        node = stack.enter_context(local_redis())
        remote: dict[str, RedisStoreConfig | RedisClusterStoreConfig] = {
            "redis": RedisStoreConfig(port=node.port, cache_rows=cache_rows, cache_policy=cfg.cache_policy)
        }
        if cfg.cluster:
            nodes = stack.enter_context(local_cluster(3))
            remote["redis_cluster"] = RedisClusterStoreConfig(
                nodes=",".join(n.address for n in nodes), cache_rows=cache_rows, cache_policy=cfg.cache_policy
            )
        for name, store_cfg in remote.items():
            started = time.perf_counter()
            push_tables(store_cfg, weights, version=VERSION, buckets=cfg.buckets, encoding="fp32")
            out["push_seconds"][name] = time.perf_counter() - started
            stores[name] = stack.enter_context(open_store(store_cfg))
        pipelines = {"in_process": build_pipeline(assets, _serve_config(cfg))}
        for name, store in stores.items():
            pipelines[name] = build_pipeline(assets, _serve_config(cfg), item_store=store)
        if cfg.late_lookup_arm:
            stores["redis_late_lookup"] = stack.enter_context(open_store(remote["redis"]))
            late = build_pipeline(assets, _serve_config(cfg), item_store=stores["redis_late_lookup"])
            late.scorers["full"] = NoPrefetch(late.scorers["full"])
            pipelines["redis_late_lookup"] = late
        for pipeline in pipelines.values():
            pipeline.retriever = ReplayRetriever(stream, assets.catalog.item_vectors)
        out.update(asyncio.run(_measure(cfg, pipelines, stores, len(assets.catalog.surfaces))))
    load = os.getloadavg()
    out["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_1m": load[0],
        "load_average_5m": load[1],
        "note": "shared, noisy machine: arms interleaved request by request in one process; "
        "compare the ratio, not absolute figures",
    }
    return out


def _serve_config(cfg: ServingBenchConfig) -> ServeConfig:
    """fp32 tables and MLP on every arm: the store is what differs, not the precision."""
    return ServeConfig(
        pipeline=PipelineConfig(default_candidates=cfg.candidates),
        scoring=ScoringConfig(precision="fp32", mlp_precision="fp32"),
    )


# -- measuring ------------------------------------------------------------------------------------


async def _measure(
    cfg: ServingBenchConfig,
    pipelines: dict[str, Pipeline],
    stores: dict[str, EmbeddingStore],
    n_surfaces: int,
) -> dict[str, Any]:
    """Warm up, then the measured waves; every arm sees each wave of requests in turn."""
    rng = np.random.default_rng(cfg.seed + 1)
    users = rng.integers(0, cfg.users, cfg.warmup + cfg.requests)
    surfaces = rng.integers(0, n_surfaces, cfg.warmup + cfg.requests)
    names = list(pipelines)
    samples: dict[str, list[float]] = {n: [] for n in names}
    stages: dict[str, dict[str, list[float]]] = {n: {"retrieve": [], "score": [], "queue": []} for n in names}
    errors = dict.fromkeys(names, 0)
    before: dict[str, dict[str, Any]] = {}
    try:
        for wave, start in enumerate(range(0, cfg.warmup + cfg.requests, cfg.concurrency)):
            if start >= cfg.warmup and not before:
                before = {n: s.stats() for n, s in stores.items()}
            idx = range(start, min(start + cfg.concurrency, cfg.warmup + cfg.requests))
            for j in range(len(names)):  # the order of the arms rotates every wave
                name = names[(wave + j) % len(names)]
                pipe = pipelines[name]
                surface = pipe.resolver.catalog.surfaces
                queries = [
                    Query(
                        request_id=f"{name}-{i}",
                        user_id=int(users[i]),
                        surface=surface[int(surfaces[i])],
                        sparse={},
                        dense={},
                        k=cfg.k,
                        deadline=pipe.clock.now() + cfg.deadline_ms / 1000.0,
                    )
                    for i in idx
                ]
                results = await asyncio.gather(*(_timed(pipe, q) for q in queries))
                if start < cfg.warmup:
                    continue
                for ms, rec in results:
                    samples[name].append(ms)  # a failed request's wait counts too
                    if rec is None:
                        errors[name] += 1
                        continue
                    stages[name]["retrieve"].append(rec.timings.retrieve_ms)
                    stages[name]["score"].append(rec.timings.score_ms)
                    stages[name]["queue"].append(rec.timings.queue_ms)
        after = {n: s.stats() for n, s in stores.items()}
    finally:
        for pipeline in pipelines.values():
            await pipeline.close()
    arms: dict[str, dict[str, Any]] = {
        n: {
            "recommend_ms": percentiles(samples[n]),
            "stage_ms_p50": {s: float(np.median(v)) for s, v in stages[n].items()},
            "errors": errors[n],
        }
        for n in names
    }
    base = arms["in_process"]["recommend_ms"]
    out: dict[str, Any] = dict(arms)
    out["ratio_p99"] = {n: arms[n]["recommend_ms"]["p99"] / base["p99"] for n in stores}
    out["ratio_p50"] = {n: arms[n]["recommend_ms"]["p50"] / base["p50"] for n in stores}
    out["stores"] = {n: delta_stats(before[n], after[n]) for n in stores}
    redis = out["stores"]["redis"]
    out["hit_rate"] = {
        "overall": redis["hit_rate"],
        "item_id": redis["tables"].get("t_item_id", {}).get("hit_rate", 0.0),
    }
    out["degraded_lookups"] = {n: out["stores"][n]["degraded_lookups"] for n in stores}
    out["degraded_rows"] = {n: out["stores"][n]["degraded_rows"] for n in stores}
    return out


async def _timed(pipeline: Pipeline, query: Query) -> tuple[float, Any]:
    started = time.perf_counter()
    try:
        rec = await pipeline.recommend(query)
    except DeadlineExceeded:
        return (time.perf_counter() - started) * 1000.0, None
    return (time.perf_counter() - started) * 1000.0, rec


# -- the bench world ------------------------------------------------------------------------------


class NoPrefetch(Scorer):
    """A scorer as it is, but without ``prefetch`` (the pipeline's batcher calls ``inner``)."""

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.path = inner.path

    def score_batch(self, requests: list[RequestFeatures], candidates: list[Candidates]) -> list[np.ndarray]:
        return self.inner.score_batch(requests, candidates)

    def store_stats(self) -> dict[str, Any] | None:
        return self.inner.store_stats()

    def close(self) -> None:
        self.inner.close()


class ReplayRetriever(Retriever):
    """Returns the next pre-drawn candidate list (every pipeline gets the same stream)."""

    def __init__(self, stream: list[np.ndarray], item_vectors: np.ndarray) -> None:
        self.stream = stream
        self.item_vectors = item_vectors
        self._next = iter(_cycle(stream))
        self._lock = threading.Lock()  # retrieval runs on a pool of two threads

    @property
    def size(self) -> int:
        return len(self.item_vectors)

    def retrieve(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            ids = np.stack([next(self._next)[:k] for _ in range(len(user_vectors))])
        scores = np.einsum("bkd,bd->bk", self.item_vectors[ids], user_vectors).astype(np.float32)
        return ids.astype(np.int64), scores


def _cycle(stream: list[np.ndarray]) -> Iterator[np.ndarray]:
    while True:
        yield from stream


def bench_assets(
    cfg: ServingBenchConfig, schema: FeatureSchema, item_sparse: np.ndarray, root: Path
) -> ServingAssets:
    """A random-weight model artifact of ``schema`` in ``root`` and a random catalog around it."""
    model_config = ModelConfig(bottom_mlp=(64, cfg.dim))
    model = build_dlrm(schema, model_config, seed=cfg.seed)
    manifest = {
        "version": VERSION,
        "schema": schema.to_dict(),
        "model_config": {"bottom_mlp": list(model_config.bottom_mlp), "top_mlp": list(model_config.top_mlp)},
    }
    artifact = save_model(root / "model", model, manifest)
    rng = np.random.default_rng(cfg.seed)
    cards = {f.name: f.cardinality for f in schema.sparse}
    user_names = [schema.sparse[i].name for i in schema.side_indices("user")]
    user_sparse = np.stack(
        [
            np.arange(cfg.users) % cards[n] if n == "user_id" else rng.integers(0, cards[n], cfg.users)
            for n in user_names
        ],
        axis=1,
    )
    user_dense_names = [f.name for f in schema.dense if f.side == "user"]
    item_vectors = rng.normal(size=(len(item_sparse), VECTOR_DIM)).astype(np.float32)
    catalog = Catalog(
        item_sparse=np.ascontiguousarray(item_sparse, dtype=np.int64),
        item_vectors=item_vectors,
        user_sparse=user_sparse.astype(np.int64),
        user_dense=rng.normal(size=(cfg.users, len(user_dense_names))).astype(np.float32),
        user_vectors=rng.normal(size=(cfg.users, VECTOR_DIM)).astype(np.float32),
        user_dense_names=user_dense_names,
        surfaces=[s.name for s in WorldConfig.load().surfaces],
    )
    index = faiss.IndexFlatIP(VECTOR_DIM)  # unused by the replayed stream; ServingAssets needs one
    index.add(item_vectors)
    return ServingAssets(artifact, catalog, index, {"kind": "Flat", "source": "bench_serving"})


if __name__ == "__main__":
    sys.exit(main())
