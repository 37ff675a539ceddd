"""Unit tests of the embedding store layer: hot-row cache, memory store, configs, EBC stand-in.

No network here; the Redis tier's integration tests are in test_redis_tier.py.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data import single_hot_kjt
from dlrm.factored import FactoredDLRM, split_tables
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import DenseFeature, FeatureSchema, SparseFeature
from embeddings.hot_cache import HotCacheConfig, HotRowCache
from embeddings.redis_store import bucket_of, row_key
from embeddings.store import (
    MemoryStore,
    MemoryStoreConfig,
    RedisClusterStoreConfig,
    RedisStoreConfig,
    StoreBackedTables,
    artifact_tables,
    parse_nodes,
    side_tables,
)
from embeddings.store_registry import STORES, store_class

DIM = 4


def key_row(keys: np.ndarray) -> np.ndarray:
    """A row that encodes its key, so any mix-up of rows shows."""
    return np.repeat(keys.astype(np.float32)[:, None], DIM, axis=1) + np.arange(DIM, dtype=np.float32)


# -- hot-row cache ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(0, 12),
    policy=st.sampled_from(["tinylfu", "lru"]),
    batches=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=15), min_size=1, max_size=25),
)
def test_cache_invariants(capacity: int, policy: str, batches: list[list[int]]) -> None:
    cache = HotRowCache(capacity, DIM, policy, sample=3, seed=1)  # type: ignore[arg-type]
    lookups = offered = 0
    for batch in batches:
        keys, counts = np.unique(np.array(batch, dtype=np.int64), return_counts=True)
        hit, rows = cache.get(keys, counts)
        lookups += int(counts.sum())
        np.testing.assert_array_equal(rows, key_row(keys[hit]))  # hits return their own row
        cache.put(keys[~hit], key_row(keys[~hit]))
        offered += int((~hit).sum())
        c = cache.counters
        assert len(cache) <= capacity
        assert c.hits + c.misses == lookups
        assert c.insertions - c.evictions == len(cache)
        assert c.insertions + c.rejections == offered  # every offered row is cached or declined
        contents = cache.contents()
        assert len(contents) == len(cache)
        for k, row in contents.items():
            np.testing.assert_array_equal(row, key_row(np.array([k]))[0])


def test_lru_counts_and_evicts_the_least_recent() -> None:
    cache = HotRowCache(2, DIM, "lru", sample=64, seed=0)
    k = np.array
    assert cache.get(k([1, 2]))[0].tolist() == [False, False]
    cache.put(k([1, 2]), key_row(k([1, 2])))
    assert cache.get(k([1]))[0].tolist() == [True]  # 1 is now more recent than 2
    assert cache.get(k([3]))[0].tolist() == [False]
    cache.put(k([3]), key_row(k([3])))
    assert sorted(cache.contents()) == [1, 3]
    c = cache.counters
    assert (c.hits, c.misses, c.insertions, c.evictions, c.rejections) == (1, 3, 3, 1, 0)


def test_tinylfu_keeps_frequent_rows_against_a_scan() -> None:
    cache = HotRowCache(4, DIM, "tinylfu", sample=8, seed=0)
    hot = np.arange(4)
    for _ in range(5):
        hit, _ = cache.get(hot)
        cache.put(hot[~hit], key_row(hot[~hit]))
    scan = np.arange(100, 200)  # each seen once: must not push out the hot rows
    hit, _ = cache.get(scan)
    cache.put(scan[~hit], key_row(scan[~hit]))
    assert sorted(cache.contents()) == hot.tolist()
    assert cache.counters.rejections == 100


def zipf_stream(n: int, requests: int, per_request: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    p = 1.0 / np.arange(1, n + 1) ** 1.05
    p /= p.sum()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    cdf = np.cumsum(p)
    reqs = [perm[np.minimum(np.searchsorted(cdf, rng.random(per_request)), n - 1)] for _ in range(requests)]
    return reqs, p


def hit_rate(cache: HotRowCache, reqs: list[np.ndarray], warm: int) -> float:
    for i, ids in enumerate(reqs):
        if i == warm:
            cache.counters.hits = cache.counters.misses = 0
        keys, counts = np.unique(ids, return_counts=True)
        hit, _ = cache.get(keys, counts)
        cache.put(keys[~hit], key_row(keys[~hit]))
    return cache.counters.hits / (cache.counters.hits + cache.counters.misses)


def test_tinylfu_beats_lru_on_zipf_and_nears_the_best_static_cache() -> None:
    n, capacity = 20000, 1000
    reqs, p = zipf_stream(n, 400, 200, seed=3)
    oracle = float(p[:capacity].sum())  # the best any cache of this size can do on average
    tinylfu = hit_rate(HotRowCache(capacity, DIM, "tinylfu"), reqs, warm=200)
    lru = hit_rate(HotRowCache(capacity, DIM, "lru"), reqs, warm=200)
    assert tinylfu > lru + 0.02
    assert tinylfu > oracle - 0.06, (tinylfu, oracle)


def test_cache_config_capacity_and_validation() -> None:
    assert HotCacheConfig(rows=10).capacity(64) == 10
    assert HotCacheConfig(mb=1.0).capacity(64) == 2**20 // 256
    assert HotCacheConfig().capacity(64) == 0
    with pytest.raises(ValueError, match="policy"):
        HotCacheConfig(policy="fifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows"):
        HotCacheConfig(rows=-1)


# -- configs, registry, key layout ------------------------------------------------------------


def test_registry_imports_lazily_and_rejects_unknown() -> None:
    assert store_class("memory") is MemoryStore
    assert store_class("redis").__name__ == "RedisStore"
    assert store_class("redis-cluster").__name__ == "RedisClusterStore"
    assert set(STORES.targets) == {"memory", "redis", "redis-cluster"}
    with pytest.raises(ValueError, match="unknown store type"):
        store_class("dynamo")


def test_config_validation() -> None:
    assert RedisStoreConfig().type == "redis"
    assert RedisClusterStoreConfig().type == "redis-cluster"
    assert MemoryStoreConfig().type == "memory"
    with pytest.raises(ValueError, match="port"):
        RedisStoreConfig(port=0)
    with pytest.raises(ValueError, match="timeout_ms"):
        RedisStoreConfig(timeout_ms=0)
    with pytest.raises(ValueError, match="key_prefix"):
        RedisStoreConfig(key_prefix="a{b}")
    with pytest.raises(ValueError, match="host:port"):
        RedisClusterStoreConfig(nodes="127.0.0.1")
    with pytest.raises(ValueError, match="default_row"):
        RedisStoreConfig(default_row="random")  # type: ignore[arg-type]


hosts = st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True)


@given(st.lists(st.tuples(hosts, st.integers(1, 65535)), min_size=1, max_size=5))
def test_parse_nodes_round_trips(nodes: list[tuple[str, int]]) -> None:
    assert parse_nodes(",".join(f"{h}:{p}" for h, p in nodes)) == nodes


@given(st.text(max_size=30))
def test_parse_nodes_raises_only_value_error(text: str) -> None:
    try:
        parsed = parse_nodes(text)
    except ValueError:
        return
    assert all(0 < p < 65536 and h for h, p in parsed)


def test_buckets_spread_runs_of_ids_evenly() -> None:
    b = bucket_of(np.arange(128_000), 128)
    counts = np.bincount(b, minlength=128)
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000
    np.testing.assert_array_equal(b, bucket_of(np.arange(128_000), 128))  # deterministic
    assert row_key("vr", "t_item_id", 7, 42) == "vr:{t_item_id:7}:42"


# -- memory store and the EBC stand-in --------------------------------------------------------


def tiny_schema() -> FeatureSchema:
    return FeatureSchema(
        name="tiny",
        sparse=(
            SparseFeature("user_id", 50, 8, "user"),
            SparseFeature("surface", 4, 8, "context"),
            SparseFeature("item_id", 300, 8, "item"),
            SparseFeature("item_category", 7, 8, "item", pooling="mean"),
        ),
        dense=(DenseFeature("x"), DenseFeature("y")),
    )


def tiny_model() -> tuple[FeatureSchema, torch.nn.Module]:
    schema = tiny_schema()
    return schema, build_dlrm(schema, ModelConfig(bottom_mlp=(16, 8), top_mlp=(16, 1)), seed=1).eval()


def test_memory_store_lookups_equal_rows() -> None:
    schema, model = tiny_model()
    tables = artifact_tables(model)
    store = MemoryStore(tables)
    _, names = side_tables(schema, "item")
    assert names == ["t_item_id", "t_item_category"]
    ids = np.array([[5, 1], [299, 6], [5, 0]])
    rows, stats = store.lookup_features(names, ids)
    assert rows.shape == (3, 2, 8) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[:, 0], tables["t_item_id"][ids[:, 0]])
    np.testing.assert_array_equal(rows[:, 1], tables["t_item_category"][ids[:, 1]])
    assert (stats.lookups, stats.hits, stats.degraded_rows) == (6, 6, 0)
    one, _ = store.lookup("t_item_id", np.array([7, 8]))
    np.testing.assert_array_equal(one, tables["t_item_id"][[7, 8]])
    assert store.stats()["lookups"] == 8
    with pytest.raises(ValueError, match="one column per table"):
        store.lookup_features(names, np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(KeyError):
        store.open(["t_nope"])


def test_store_backed_tables_match_the_ebc_in_factored_dlrm() -> None:
    schema, model = tiny_model()
    request_tables, item_tables = split_tables(model, schema)
    store = MemoryStore(artifact_tables(model))
    backed = StoreBackedTables.for_schema(store, schema, "item")
    exact = FactoredDLRM(model, schema, request_tables, item_tables)
    via_store = FactoredDLRM(model, schema, request_tables, backed)
    rng = np.random.default_rng(0)
    counts = [5, 3]
    dense = torch.from_numpy(rng.normal(size=(2, 2)).astype(np.float32))
    req = single_hot_kjt(exact.request_keys, torch.tensor([[3, 1], [49, 2]]))
    items = torch.from_numpy(np.stack([rng.integers(0, 300, 8), rng.integers(0, 7, 8)], axis=1))
    item_kjt = single_hot_kjt(exact.item_keys, items)
    assert torch.equal(via_store(dense, req, item_kjt, counts), exact(dense, req, item_kjt, counts))
    assert backed.last_stats.lookups == 16


def test_store_backed_tables_pool_multi_hot_bags_like_the_ebc() -> None:
    schema, model = tiny_model()
    _, item_tables = split_tables(model, schema)
    backed = StoreBackedTables.for_schema(MemoryStore(artifact_tables(model)), schema, "item")
    # 3 bags per feature: item_id bags of 2, 0, 3 ids; item_category (mean-pooled) of 1, 4, 2.
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "item_category"],
        values=torch.tensor([1, 2, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([2, 0, 3, 1, 4, 2], dtype=torch.int32),
    )
    expected = item_tables(kjt).values()
    got = backed(kjt).values()
    assert got.shape == expected.shape == (3, 16)
    torch.testing.assert_close(got, expected)


def test_store_backed_tables_pass_the_deadline() -> None:
    class Recording(MemoryStore):
        seen: ClassVar[list[float | None]] = []

        def lookup_flat(self, tables, which, ids, deadline=None):  # type: ignore[no-untyped-def]
            self.seen.append(deadline)
            return super().lookup_flat(tables, which, ids, deadline)

    class Clock:
        def now(self) -> float:
            return 100.0

    schema, model = tiny_model()
    store = Recording(artifact_tables(model))
    backed = StoreBackedTables.for_schema(store, schema, "item", budget_s=0.25, clock=Clock())
    kjt = single_hot_kjt(backed.keys, torch.tensor([[1, 2]]))
    backed(kjt)
    with backed.deadline(42.0):
        backed(kjt)
    backed(kjt)
    assert store.seen == [100.25, 42.0, 100.25]
