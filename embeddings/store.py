"""Embedding row stores behind one ABC: in-process memory, a Redis node, a Redis Cluster.

Tier 1 keeps tables in process memory. Tier 2 keeps tables larger than one machine's RAM in
Redis, partitioned by key hash across nodes and read through an in-process hot-row cache
(``embeddings.redis_store``, ``embeddings.hot_cache``). Serving sees only ``EmbeddingStore``:

    store = open_store(RedisClusterStoreConfig(nodes="10.0.0.1:7000,10.0.0.2:7000", cache_mb=512))
    store.open(["t_item_id", "t_item_category"])            # at startup: reads table metadata
    rows, stats = store.lookup_features(tables, ids, deadline)   # ``N X F X D`` float32

A lookup never raises for a slow or dead backend: rows it cannot fetch before ``deadline``
(or at all) are the table's default row, and ``stats`` / ``store.stats()`` count them.

As in Feast's online stores, each backend has its own typed config (``type`` names it), and
``embeddings.store_registry`` maps names to classes that are imported only when used
(``open_store``). ``StoreBackedTables`` lets
a store stand in for an ``EmbeddingBagCollection`` (e.g. ``FactoredDLRM(item_tables=...)``).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.schema import FeatureSchema, Side
from embeddings.clock import Clock, MonotonicClock
from embeddings.hot_cache import POLICIES, Policy

DefaultRow = Literal["mean", "zeros"]


# -- configs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryStoreConfig:
    type: Literal["memory"] = "memory"
    """Backend name."""
    artifact: str = ""
    """Model artifact folder whose tables are served from process memory."""


@dataclass(frozen=True)
class RemoteOptions:
    """Options shared by the Redis backends."""

    key_prefix: str = "vr"
    """Prefix of every key (``<prefix>:{<table>:<bucket>}:<id>``); a new one per model version
    lets a push run while the old version serves."""
    timeout_ms: float = 100.0
    """Connect and read timeout when a lookup has no deadline of its own."""
    retry_interval_ms: float = 500.0
    """After a node fails, its rows are served as defaults for this long, then it is retried."""
    cache_rows: int = 0
    """Hot-row cache capacity in rows (0 = use cache_mb)."""
    cache_mb: float = 0.0
    """Hot-row cache capacity in MiB of rows (both 0 = no cache)."""
    cache_policy: Policy = "tinylfu"
    """Hot-row cache policy: tinylfu (frequency-aware, best for Zipf traffic) or lru."""
    default_row: DefaultRow = "mean"
    """Row served when a lookup cannot be fetched in time: the table's mean row or zeros."""

    def __post_init__(self) -> None:
        if self.timeout_ms <= 0 or self.retry_interval_ms < 0:
            raise ValueError(f"{self.timeout_ms=} must be > 0 and {self.retry_interval_ms=} >= 0")
        if self.cache_rows < 0 or self.cache_mb < 0:
            raise ValueError(f"{self.cache_rows=} and {self.cache_mb=} must be >= 0")
        if self.cache_policy not in POLICIES:
            raise ValueError(f"{self.cache_policy=} must be one of {POLICIES}")
        if self.default_row not in ("mean", "zeros"):
            raise ValueError(f"{self.default_row=} must be 'mean' or 'zeros'")
        if not self.key_prefix or any(c in self.key_prefix for c in "{} "):
            raise ValueError(f"{self.key_prefix=} must be non-empty, without braces or spaces")


@dataclass(frozen=True)
class RedisStoreConfig(RemoteOptions):
    type: Literal["redis"] = "redis"
    """Backend name: one Redis node."""
    host: str = "127.0.0.1"
    """Redis host."""
    port: int = 6379
    """Redis port."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ValueError(f"{self.port=} must be in 1..65535")


@dataclass(frozen=True)
class RedisClusterStoreConfig(RemoteOptions):
    type: Literal["redis-cluster"] = "redis-cluster"
    """Backend name: a Redis Cluster (rows spread over its masters by hash slot)."""
    nodes: str = "127.0.0.1:7000"
    """Startup nodes, comma-separated host:port; the rest of the cluster is discovered."""
    refresh_interval_ms: float = 1000.0
    """Least time between two reloads of the slot map after a node error or MOVED reply."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_nodes(self.nodes)
        if self.refresh_interval_ms < 0:
            raise ValueError(f"{self.refresh_interval_ms=} must be >= 0")


StoreConfig = MemoryStoreConfig | RedisStoreConfig | RedisClusterStoreConfig


def parse_nodes(text: str) -> list[tuple[str, int]]:
    """``"h1:p1,h2:p2"`` -> ``[(h1, p1), (h2, p2)]``; ValueError on anything else."""
    nodes = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad node {part!r} in {text!r}: expected host:port")
        nodes.append((host, int(port)))
    return nodes


# -- the interface ------------------------------------------------------------------------------


@dataclass
class LookupStats:
    """What one lookup did; ``lookups = hits + misses`` (positions, not distinct ids)."""

    lookups: int = 0
    """Ids asked for."""
    hits: int = 0
    """Ids served from the hot-row cache (or from memory)."""
    misses: int = 0
    """Ids not in the cache."""
    fetched: int = 0
    """Distinct rows read from the backend."""
    degraded_rows: int = 0
    """Ids served a default row (deadline, node error or missing key)."""
    round_trips: int = 0
    """Node round trips (at most one per node)."""
    errors: int = 0
    """Backend errors met (connection refused, timeout, error reply)."""
    seconds: float = 0.0
    """Wall time of the lookup."""

    @property
    def degraded(self) -> bool:
        return self.degraded_rows > 0


@dataclass
class StoreCounters:
    """Totals since the store was opened."""

    lookup_calls: int = 0
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    fetched: int = 0
    degraded_lookups: int = 0
    """Lookup calls that served at least one default row."""
    degraded_rows: int = 0
    errors: int = 0
    round_trips: int = 0
    per_table: dict[str, list[int]] = field(default_factory=dict)
    """Table -> [hits, misses]."""

    def add(self, stats: LookupStats, tables: Sequence[str], which: np.ndarray, hit: np.ndarray) -> None:
        """Count one lookup; ``which`` / ``hit`` give each id's table and whether it hit."""
        self.lookup_calls += 1
        self.lookups += stats.lookups
        self.hits += stats.hits
        self.misses += stats.misses
        self.fetched += stats.fetched
        self.degraded_rows += stats.degraded_rows
        self.degraded_lookups += int(stats.degraded)
        self.errors += stats.errors
        self.round_trips += stats.round_trips
        n = len(tables)
        hits = np.bincount(which[hit], minlength=n).tolist()
        misses = np.bincount(which[~hit], minlength=n).tolist()
        for name, h, m in zip(tables, hits, misses, strict=True):
            entry = self.per_table.setdefault(name, [0, 0])
            entry[0] += h
            entry[1] += m


class EmbeddingStore(ABC):
    """Rows of named embedding tables (TorchRec table names, e.g. ``t_item_id``)."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any, *, clock: Clock | None = None) -> EmbeddingStore: ...

    @abstractmethod
    def open(self, tables: Sequence[str]) -> None:
        """Make ``tables`` ready for lookups (reads their metadata); raises if one is missing."""

    @abstractmethod
    def dim(self, table: str) -> int: ...

    @abstractmethod
    def lookup_flat(
        self, tables: Sequence[str], which: np.ndarray, ids: np.ndarray, deadline: float | None = None
    ) -> tuple[np.ndarray, LookupStats]:
        """Rows of ``ids[i]`` from table ``tables[which[i]]``: ``L X D`` float32.

        One round trip per backend node at most; ids it cannot fetch by ``deadline`` (on the
        store's clock) get the table's default row and are counted, never raised.
        """

    def lookup_features(
        self, tables: Sequence[str], ids: np.ndarray, deadline: float | None = None
    ) -> tuple[np.ndarray, LookupStats]:
        """Rows for an ``N X F`` id matrix (column f from ``tables[f]``): ``N X F X D`` float32.

        For a request's K candidates this is the item-side embeddings ``K X F_i X D``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] != len(tables):
            raise ValueError(f"ids of shape {ids.shape} must be N x {len(tables)} (one column per table)")
        which = np.tile(np.arange(len(tables), dtype=np.int64), ids.shape[0])
        rows, stats = self.lookup_flat(tables, which, ids.reshape(-1), deadline)
        return rows.reshape(ids.shape[0], len(tables), -1), stats

    def lookup(
        self, table: str, ids: np.ndarray, deadline: float | None = None
    ) -> tuple[np.ndarray, LookupStats]:
        """Rows of one table: ``N X D`` float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self.lookup_flat([table], np.zeros(len(ids), dtype=np.int64), ids, deadline)

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Cumulative counters (hits, misses, evictions, degraded_lookups, ...) as plain JSON."""

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing
        """Release connections."""

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- tier 1: process memory ---------------------------------------------------------------------


class MemoryStore(EmbeddingStore):
    """Tables held in process memory (numpy rows); every lookup is a hit."""

    def __init__(self, tables: Mapping[str, np.ndarray], clock: Clock | None = None) -> None:
        self._tables = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tables.items()}
        self._counters = StoreCounters()
        self.clock = clock or MonotonicClock()

    @classmethod
    def from_config(cls, config: Any, *, clock: Clock | None = None) -> MemoryStore:
        from dlrm.artifact import load_artifact

        if not isinstance(config, MemoryStoreConfig) or not config.artifact:
            raise ValueError("a memory store needs MemoryStoreConfig(artifact=<model folder>)")
        return cls(artifact_tables(load_artifact(Path(config.artifact)).load_model()), clock)

    def open(self, tables: Sequence[str]) -> None:
        missing = [t for t in tables if t not in self._tables]
        if missing:
            raise KeyError(f"tables not in memory store: {missing}")

    def dim(self, table: str) -> int:
        return int(self._tables[table].shape[1])

    def lookup_flat(
        self, tables: Sequence[str], which: np.ndarray, ids: np.ndarray, deadline: float | None = None
    ) -> tuple[np.ndarray, LookupStats]:
        started = time.perf_counter()
        dim = check_lookup(tables, which, ids, self.dim)
        out = np.empty((len(ids), dim), dtype=np.float32)
        for t, name in enumerate(tables):
            sel = which == t
            out[sel] = self._tables[name][ids[sel]]
        stats = LookupStats(lookups=len(ids), hits=len(ids), seconds=time.perf_counter() - started)
        self._counters.add(stats, tables, which, np.ones(len(ids), dtype=bool))
        return out, stats

    def stats(self) -> dict[str, Any]:
        return counters_dict(self._counters)


def check_lookup(tables: Sequence[str], which: np.ndarray, ids: np.ndarray, dim_of: Any) -> int:
    """Validate a flat lookup; returns the common dim of ``tables``."""
    if which.shape != ids.shape or ids.ndim != 1:
        raise ValueError(f"which {which.shape} and ids {ids.shape} must be equal-length vectors")
    dims = {dim_of(t) for t in tables}
    if len(dims) != 1:
        raise ValueError(f"tables {list(tables)} must share one dim, got {sorted(dims)}")
    if len(ids) and (which.min() < 0 or which.max() >= len(tables)):
        raise ValueError(f"which must index into the {len(tables)} tables")
    return int(dims.pop())


def counters_dict(c: StoreCounters, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in vars(c).items() if k != "per_table"}
    out["hit_rate"] = c.hits / c.lookups if c.lookups else 0.0
    out["tables"] = {
        name: {"hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else 0.0}
        for name, (h, m) in c.per_table.items()
    }
    out.update(extra)
    return out


def artifact_tables(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Table name -> float32 rows of a TorchRec DLRM (all tables, or ``names``)."""
    sparse_arch: Any = model.sparse_arch
    bags: Any = sparse_arch.embedding_bag_collection.embedding_bags
    chosen = list(bags.keys()) if names is None else list(names)
    unknown = [n for n in chosen if n not in bags]
    if unknown:
        raise ValueError(f"unknown tables {unknown}; the model has {sorted(bags.keys())}")
    return {n: bags[n].weight.detach().cpu().numpy().astype(np.float32, copy=False) for n in chosen}


# -- a store in place of an EmbeddingBagCollection ----------------------------------------------


def side_tables(schema: FeatureSchema, *sides: Side) -> tuple[list[str], list[str]]:
    """(feature keys, table names) of the sparse features on ``sides``, in schema order."""
    idx = schema.side_indices(*sides)
    return [schema.sparse[i].name for i in idx], [schema.sparse[i].table_name for i in idx]


class StoreBackedTables(nn.Module):
    """KJT -> KeyedTensor through an ``EmbeddingStore``: stands in for an EBC.

    ``FactoredDLRM(model, schema, request_tables, StoreBackedTables(store, keys, tables))``
    reads its item-side rows from the store. Output values are ``B X (F * D)`` in ``keys``
    order (viewable as ``B X F X D``), like ``EmbeddingBagCollection``. Bags are pooled by
    ``pooling`` (sum, or mean for the features listed in ``mean_keys``); single-hot bags take
    the fast path. The deadline of a forward is the one set by ``with tables.deadline(t):``,
    else ``clock.now() + budget_s`` (``budget_s=None``: no deadline beyond the store timeout).
    """

    def __init__(
        self,
        store: EmbeddingStore,
        keys: Sequence[str],
        tables: Sequence[str],
        *,
        mean_keys: Sequence[str] = (),
        budget_s: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        if len(keys) != len(tables) or not keys:
            raise ValueError(f"need one table per key, got {len(keys)} keys and {len(tables)} tables")
        self.store = store
        self.keys = list(keys)
        self.tables = list(tables)
        self.mean = torch.tensor([k in set(mean_keys) for k in keys])
        self.budget_s = budget_s
        self.clock = clock or MonotonicClock()
        self.last_stats = LookupStats()
        self._deadline: float | None = None
        store.open(self.tables)
        dims = {store.dim(t) for t in self.tables}
        if len(dims) != 1:
            raise ValueError(f"tables {self.tables} have different dims {sorted(dims)}")
        self.dim = dims.pop()

    @classmethod
    def for_schema(
        cls, store: EmbeddingStore, schema: FeatureSchema, *sides: Side, **kw: Any
    ) -> StoreBackedTables:
        keys, tables = side_tables(schema, *(sides or ("item",)))
        mean = [k for k in keys if schema.feature(k).pooling == "mean"]
        return cls(store, keys, tables, mean_keys=mean, **kw)

    @contextlib.contextmanager
    def deadline(self, deadline: float | None) -> Iterator[None]:
        """Use ``deadline`` (store clock) for the forwards inside the block."""
        previous, self._deadline = self._deadline, deadline
        try:
            yield
        finally:
            self._deadline = previous

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        if kjt.keys() != self.keys:
            raise ValueError(f"KJT keys {kjt.keys()} != store-backed keys {self.keys}")
        deadline = self._deadline
        if deadline is None and self.budget_s is not None:
            deadline = self.clock.now() + self.budget_s
        F, D = len(self.keys), self.dim
        B = kjt.stride()
        lengths = kjt.lengths()
        values = kjt.values().numpy()
        if bool((lengths == 1).all()):
            rows, self.last_stats = self.store.lookup_features(self.tables, values.reshape(F, B).T, deadline)
            pooled = torch.from_numpy(rows)
        else:
            pooled = self._pooled(values, lengths, B, deadline)
        return KeyedTensor(keys=self.keys, length_per_key=[D] * F, values=pooled.reshape(B, F * D))

    def _pooled(
        self, values: np.ndarray, lengths: torch.Tensor, B: int, deadline: float | None
    ) -> torch.Tensor:
        """Multi-hot bags: one store call over all ids, then sum (or mean) per bag."""
        F, D = len(self.keys), self.dim
        per_feature = lengths.view(F, B).sum(dim=1).numpy()
        which = np.repeat(np.arange(F, dtype=np.int64), per_feature)
        rows, self.last_stats = self.store.lookup_flat(self.tables, which, values.astype(np.int64), deadline)
        bag = torch.repeat_interleave(torch.arange(F * B), lengths.long())
        pooled = torch.zeros(F * B, D).index_add_(0, bag, torch.from_numpy(rows)).view(F, B, D)
        lens = lengths.clamp(min=1).to(torch.float32).view(F, B, 1)
        pooled = torch.where(self.mean.view(F, 1, 1), pooled / lens, pooled)
        return pooled.transpose(0, 1).contiguous()
