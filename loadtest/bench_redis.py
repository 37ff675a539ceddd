"""`valuerank bench redis`: the Redis embedding tier against in-process tables, as JSON.

Item-side tables of the world schema (``item_id`` scaled to ``--items`` rows, all tables of
``--dim``), random weights, served three ways: in process (``MemoryStore``), from one local
Redis node and from a local 3-master Redis Cluster, each Redis store behind a hot-row cache
of ``--cache-frac`` of the item-side rows. Traffic: requests of ``--candidates`` items drawn
from Zipf(``--zipf``) item popularity (the world's item popularity), K x F_i lookups each.

Reported (medians over interleaved runs on this noisy machine; p99 over all requests):

* ``hit_rate``: cache hit rate after ``--warmup`` requests, overall and per table, and
  ``oracle_hit_rate``: the best a static cache of the same size could do (the most probable
  rows), so the policy is judged against what is possible, not only against a target;
* ``lookup_ms``: per-request latency of the K x F_i item rows, in process vs Redis (p50, p99);
* ``scoring_ms``: per-request ``FactoredDLRM`` scoring with the item-side
  ``EmbeddingBagCollection`` vs ``StoreBackedTables`` over Redis, and the p99 ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dlrm.configs import add_flags, from_flags
from dlrm.data import single_hot_kjt
from dlrm.factored import FactoredDLRM, split_tables
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import FeatureSchema, load_schema
from embeddings.hot_cache import Policy
from embeddings.push import push_tables
from embeddings.store import (
    EmbeddingStore,
    MemoryStore,
    RedisClusterStoreConfig,
    RedisStoreConfig,
    StoreBackedTables,
    artifact_tables,
    side_tables,
)
from embeddings.store_registry import open_store
from loadtest.redis_local import local_cluster, local_redis


@dataclass(frozen=True)
class RedisBenchConfig:
    items: int = 200_000
    """Rows of the item_id table (the other item-side tables keep the world's sizes)."""
    dim: int = 64
    """Embedding dim of every table."""
    candidates: int = 500
    """Candidates per request (K)."""
    zipf: float = 1.05
    """Zipf exponent of item popularity."""
    cache_frac: float = 0.05
    """Hot-row cache size as a fraction of all item-side rows."""
    cache_policy: Policy = "tinylfu"
    """Hot-row cache policy (tinylfu or lru)."""
    warmup: int = 1000
    """Requests that warm the caches before anything is measured."""
    requests: int = 500
    """Measured requests."""
    buckets: int = 64
    """Hash buckets per table (cluster: MGETs per node per request grow with it)."""
    deadline_ms: float = 50.0
    """Per-request lookup deadline (rows not fetched by then are degraded)."""
    cluster: bool = True
    """Also measure a 3-master Redis Cluster."""
    threads: int = 1
    """torch intra-op threads for scoring."""
    seed: int = 0
    """Seed of weights and traffic."""

    def __post_init__(self) -> None:
        if self.items < 100 or self.dim < 1 or self.candidates < 1:
            raise ValueError(f"{self.items=} must be >= 100, {self.dim=} and {self.candidates=} >= 1")
        if self.zipf <= 0 or not 0 < self.cache_frac <= 1:
            raise ValueError(f"{self.zipf=} must be > 0 and {self.cache_frac=} in (0, 1]")
        if self.cache_policy not in ("tinylfu", "lru"):
            raise ValueError(f"{self.cache_policy=} must be tinylfu or lru")
        if self.buckets < 1:
            raise ValueError(f"{self.buckets=} must be >= 1")
        if self.warmup < 0 or self.requests < 10 or self.threads < 1 or self.deadline_ms <= 0:
            raise ValueError("need warmup >= 0, requests >= 10, threads >= 1, deadline_ms > 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="valuerank bench redis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON line instead of indented JSON")
    add_flags(parser, RedisBenchConfig)
    ns = parser.parse_args(argv)
    try:
        config = from_flags(RedisBenchConfig, ns)
    except ValueError as exc:
        print(f"bench redis: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(run(config), indent=None if ns.json else 2))
    return 0


def run(cfg: RedisBenchConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    schema = bench_schema(cfg)
    model = build_dlrm(schema, ModelConfig(bottom_mlp=(64, cfg.dim)), seed=cfg.seed).eval()
    keys, tables = side_tables(schema, "item")
    weights = artifact_tables(model, tables)
    total_rows = sum(len(w) for w in weights.values())
    cache_rows = max(1, int(cfg.cache_frac * total_rows))
    traffic = Traffic(schema, cfg)
    reqs = [traffic.request() for _ in range(cfg.warmup + cfg.requests)]
    out: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "tables": {t: len(w) for t, w in weights.items()},
        "cache_rows": cache_rows,
        "oracle_hit_rate": traffic.oracle_hit_rate(cache_rows),
    }
    with contextlib.ExitStack() as stack:
        stores: dict[str, EmbeddingStore] = {"in_process": MemoryStore(weights)}
        node = stack.enter_context(local_redis())
        single = RedisStoreConfig(port=node.port, cache_rows=cache_rows, cache_policy=cfg.cache_policy)
        started = time.perf_counter()
        push_tables(single, weights, buckets=cfg.buckets)
        out["push_seconds"] = {"redis": time.perf_counter() - started}
        stores["redis"] = stack.enter_context(open_store(single))
        if cfg.cluster:
            nodes = stack.enter_context(local_cluster(3))
            clustered = RedisClusterStoreConfig(
                nodes=",".join(n.address for n in nodes),
                cache_rows=cache_rows,
                cache_policy=cfg.cache_policy,
            )
            started = time.perf_counter()
            push_tables(clustered, weights, buckets=cfg.buckets)
            out["push_seconds"]["redis_cluster"] = time.perf_counter() - started
            stores["redis_cluster"] = stack.enter_context(open_store(clustered))
        out.update(measure(cfg, model, schema, keys, tables, stores, reqs))
    out["load_average"] = os.getloadavg()[0]
    return out


def measure(
    cfg: RedisBenchConfig,
    model: torch.nn.Module,
    schema: FeatureSchema,
    keys: list[str],
    tables: list[str],
    stores: dict[str, EmbeddingStore],
    reqs: list[np.ndarray],
) -> dict[str, Any]:
    for store in stores.values():
        store.open(tables)
    budget = cfg.deadline_ms / 1000.0

    def lookup(store: EmbeddingStore) -> Callable[[np.ndarray], Any]:
        return lambda ids: store.lookup_features(tables, ids, deadline=time.monotonic() + budget)

    # 1. Lookups: warm every cache, reset the counters, then interleave the stores per request.
    for ids in reqs[: cfg.warmup]:
        for store in stores.values():
            lookup(store)(ids)
    before = {name: store.stats() for name, store in stores.items()}
    lookup_ms = interleaved({n: lookup(s) for n, s in stores.items()}, reqs[cfg.warmup :])
    after = {name: store.stats() for name, store in stores.items()}
    result: dict[str, Any] = {"lookup_ms": lookup_ms, "stores": {}}
    for name in stores:
        if name == "in_process":
            continue
        result["stores"][name] = delta_stats(before[name], after[name])
    result["hit_rate"] = result["stores"]["redis"]["hit_rate"]
    result["lookup_p99_ratio"] = {
        n: lookup_ms[n]["p99"] / lookup_ms["in_process"]["p99"] for n in stores if n != "in_process"
    }

    # 2. Scoring one request (1 user x K candidates) with item rows from the EBC or from Redis.
    request_tables, item_tables = split_tables(model, schema)
    scorers: dict[str, FactoredDLRM] = {
        "in_process": FactoredDLRM(model, schema, request_tables, item_tables)
    }
    for name, store in stores.items():
        if name != "in_process":
            backed = StoreBackedTables(store, keys, tables, budget_s=budget)
            scorers[name] = FactoredDLRM(model, schema, request_tables, backed)
    user = FeatureInputs(schema)
    calls = {
        name: (
            lambda ids, m=m: m(user.dense, user.kjt, single_hot_kjt(keys, torch.from_numpy(ids)), [len(ids)])
        )
        for name, m in scorers.items()
    }
    scoring_ms = interleaved(calls, reqs[cfg.warmup :])
    result["scoring_ms"] = scoring_ms
    result["scoring_p99_ratio"] = {
        n: scoring_ms[n]["p99"] / scoring_ms["in_process"]["p99"] for n in scorers if n != "in_process"
    }
    result["degraded_lookups"] = {n: s.stats()["degraded_lookups"] for n, s in stores.items()}
    return result


def interleaved(calls: Mapping[str, Callable[..., Any]], reqs: list[np.ndarray]) -> dict[str, Any]:
    """Per-request ms of each call on the same requests; the order rotates every request."""
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i, ids in enumerate(reqs):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            started = time.perf_counter()
            calls[name](ids)
            samples[name].append((time.perf_counter() - started) * 1000.0)
    return {n: percentiles(s) for n, s in samples.items()}


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def delta_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Counters of the measured window only (after warm-up)."""
    fields = (
        "lookups",
        "hits",
        "misses",
        "fetched",
        "degraded_rows",
        "degraded_lookups",
        "round_trips",
        "errors",
    )
    d: dict[str, Any] = {k: after[k] - before[k] for k in fields}
    d["hit_rate"] = d["hits"] / d["lookups"] if d["lookups"] else 0.0
    d["evictions"] = after["evictions"] - before["evictions"]
    d["tables"] = {}
    for name, t in after["tables"].items():
        b = before["tables"].get(name, {"hits": 0, "misses": 0})
        h, m = t["hits"] - b["hits"], t["misses"] - b["misses"]
        d["tables"][name] = {"hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else 0.0}
    d["round_trips_per_request"] = d["round_trips"] / max(1, after["lookup_calls"] - before["lookup_calls"])
    return d


# -- schema and traffic -------------------------------------------------------------------------


def bench_schema(cfg: RedisBenchConfig) -> FeatureSchema:
    """The world schema with ``item_id`` of ``cfg.items`` rows and every table of ``cfg.dim``."""
    raw = load_schema("world").to_dict()
    for f in raw["sparse"]:
        f["dim"] = cfg.dim
        if f["name"] == "item_id":
            f["cardinality"] = cfg.items
    return FeatureSchema.from_dict(raw)


class Traffic:
    """Zipf item popularity over a random item order; item features fixed per item."""

    def __init__(self, schema: FeatureSchema, cfg: RedisBenchConfig) -> None:
        self.rng = np.random.default_rng(cfg.seed)
        self.k = cfg.candidates
        n = cfg.items
        p = 1.0 / np.arange(1, n + 1) ** cfg.zipf
        self.p_rank = p / p.sum()
        self.cdf = np.cumsum(self.p_rank)
        self.item_of_rank = self.rng.permutation(n)
        cols = []
        for i in schema.side_indices("item"):
            f = schema.sparse[i]
            cols.append(np.arange(n) if f.name == "item_id" else self.rng.integers(0, f.cardinality, n))
        self.features = np.stack(cols, axis=1).astype(np.int64)  # item -> its item-side ids

    def request(self) -> np.ndarray:
        """``K X F_i`` item-side ids of one request's candidates."""
        ranks = np.minimum(np.searchsorted(self.cdf, self.rng.random(self.k)), len(self.cdf) - 1)
        return self.features[self.item_of_rank[ranks]]

    def oracle_hit_rate(self, cache_rows: int) -> dict[str, float]:
        """Hit rate of the best static cache of ``cache_rows`` rows (the most probable rows)."""
        p_item = np.empty_like(self.p_rank)
        p_item[self.item_of_rank] = self.p_rank
        n_feat = self.features.shape[1]
        probs = [np.bincount(col, weights=p_item) / n_feat for col in self.features.T]
        everything = np.sort(np.concatenate(probs))[::-1]
        item_only = np.sort(p_item)[::-1]
        return {
            "all_item_tables": float(everything[:cache_rows].sum()),
            "item_id_alone_same_rows": float(item_only[:cache_rows].sum()),
        }


class FeatureInputs:
    """One fixed user/context for the scoring requests (the item side is what is measured)."""

    def __init__(self, schema: FeatureSchema) -> None:
        keys, _ = side_tables(schema, "user", "context")
        self.dense = torch.zeros(1, max(1, len(schema.dense)))
        self.kjt = single_hot_kjt(keys, torch.ones(1, len(keys), dtype=torch.int64))


if __name__ == "__main__":
    sys.exit(main())
