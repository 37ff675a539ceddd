"""The Redis tier: embedding rows in one Redis node or across a Redis Cluster.

Key layout (written by ``valuerank embeddings push``, read here)::

    <prefix>:{<table>:<bucket>}:<id>   one row: raw little-endian float32 (or fp16) bytes
    <prefix>:{<table>}:meta            hash: dim, rows, encoding, buckets, version, mean row

``bucket = hash(id) % buckets``. The braces are a Redis Cluster hash tag: all rows of one
bucket share a hash slot, so a node serves a request's rows of one bucket with one MGET
(cluster MGET keys must share a slot), and the table still spreads over every node, slot by
slot. Per request each node gets one pipelined write of its MGETs, written to all nodes
before any reply is read: one round trip per node, in parallel.

Failure is never an error to the caller. A reply that does not arrive by the deadline, a
refused connection, a timeout or an error reply (MOVED, CLUSTERDOWN) gives those ids the
table's default row (its mean row, or zeros) and is counted. A failed node is skipped for
``retry_interval_ms`` (its ids degrade at once instead of each request waiting on it), then
reconnected; after a node error or MOVED the cluster's slot map is reloaded (rate-limited).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from redis.crc import key_slot

from embeddings._resp import RespConnection, RespError, pack_command
from embeddings.hot_cache import HotCacheConfig, HotRowCache
from embeddings.store import (
    Clock,
    EmbeddingStore,
    LookupStats,
    MonotonicClock,
    RedisClusterStoreConfig,
    RedisStoreConfig,
    RemoteOptions,
    StoreCounters,
    check_lookup,
    counters_dict,
    parse_nodes,
)

log = logging.getLogger(__name__)

ENCODINGS: dict[str, np.dtype[Any]] = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}
SLOTS = 16384
_ID_BITS = 56  # cache key = (table number << 56) | id
_ID_MASK = (1 << _ID_BITS) - 1
_BUCKET_MULT = np.uint64(0x9E3779B97F4A7C15)
_NODE_ERRORS = (OSError,)  # refused, reset, timed out, closed, unparseable (ProtocolError)


def bucket_of(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each id: Fibonacci hashing, so that runs of ids spread over the buckets."""
    mixed = (np.asarray(ids, dtype=np.int64).astype(np.uint64) * _BUCKET_MULT) >> np.uint64(32)
    return (mixed % np.uint64(buckets)).astype(np.int64)


def hash_tag(prefix: str, table: str, bucket: int) -> str:
    return f"{prefix}:{{{table}:{bucket}}}"


def row_key(prefix: str, table: str, bucket: int, row_id: int) -> str:
    return f"{hash_tag(prefix, table, bucket)}:{row_id}"


def meta_key(prefix: str, table: str) -> str:
    return f"{prefix}:{{{table}}}:meta"


@dataclass(frozen=True)
class TableMeta:
    """What ``push`` records about a table (its ``meta`` hash)."""

    name: str
    dim: int
    rows: int
    encoding: str
    buckets: int
    version: str
    mean: np.ndarray

    def to_mapping(self) -> dict[str, bytes | str | int]:
        return {
            "dim": self.dim,
            "rows": self.rows,
            "encoding": self.encoding,
            "buckets": self.buckets,
            "version": self.version,
            "mean": self.mean.astype("<f4").tobytes(),
        }

    @classmethod
    def from_mapping(cls, name: str, raw: dict[bytes, bytes]) -> TableMeta:
        try:
            meta = cls(
                name=name,
                dim=int(raw[b"dim"]),
                rows=int(raw[b"rows"]),
                encoding=raw[b"encoding"].decode(),
                buckets=int(raw[b"buckets"]),
                version=raw[b"version"].decode(),
                mean=np.frombuffer(raw[b"mean"], dtype="<f4").astype(np.float32),
            )
        except KeyError as exc:
            raise ValueError(f"metadata of table {name} lacks {exc}") from exc
        if meta.encoding not in ENCODINGS or meta.mean.shape != (meta.dim,) or meta.buckets < 1:
            raise ValueError(f"bad metadata for table {name}: {meta}")
        return meta


def encode_rows(rows: np.ndarray, encoding: str) -> list[bytes]:
    data = np.ascontiguousarray(rows, dtype=ENCODINGS[encoding])
    return [r.tobytes() for r in data]


def cluster_slots(client: redis.Redis) -> dict[tuple[int, int], tuple[str, int]]:
    """``CLUSTER SLOTS`` as (first, last) slot -> master (host, port)."""
    out = {}
    for entry in client.execute_command("CLUSTER SLOTS") or []:
        start, end, master = entry[0], entry[1], entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        out[(int(start), int(end))] = (host, int(master[1]))
    return out


# -- one node's connection ----------------------------------------------------------------------


class _Node:
    """One connection to one node; after a failure the node rests until ``down_until``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn = RespConnection(host, port)
        self.down_until = float("-inf")
        self.failures = 0
        self.connects = 0

    def send(self, data: bytes, timeout_s: float) -> None:
        if not self.conn.connected:
            self.conn.connect(timeout_s)
            self.connects += 1
        self.conn.send(data, timeout_s)

    def fail(self, now: float, rest_s: float, exc: BaseException) -> None:
        if now >= self.down_until:
            log.warning("redis node %s:%s failed (%s); degrading its rows", self.host, self.port, exc)
        self.conn.close()
        self.failures += 1
        self.down_until = now + rest_s

    def close(self) -> None:
        self.conn.close()


# -- the store ----------------------------------------------------------------------------------


class _RemoteStore(EmbeddingStore):
    """Cache, default rows, deadlines and counting; subclasses say which node has which key."""

    def __init__(self, options: RemoteOptions, clock: Clock | None = None) -> None:
        self.options = options
        self.clock = clock or MonotonicClock()
        self.timeout_s = options.timeout_ms / 1000.0
        self.rest_s = options.retry_interval_ms / 1000.0
        self.meta: list[TableMeta] = []
        self._number: dict[str, int] = {}
        self._default_rows = np.zeros((0, 1), dtype=np.float32)
        self._tags: list[list[bytes]] = []
        self._cache: HotRowCache | None = None
        self._counters = StoreCounters()
        self._lock = threading.Lock()
        self.nodes: list[_Node] = []

    # Subclass hooks.
    def _read_meta(self, table: str) -> dict[bytes, bytes]:
        raise NotImplementedError

    def _node_of(self, table_no: int, buckets: np.ndarray) -> np.ndarray:
        """Index into ``self.nodes`` of each bucket of table ``table_no``."""
        raise NotImplementedError

    def _before_fetch(self, now: float) -> None:
        """Chance to reload the topology before a fetch."""

    def _topology_suspect(self) -> None:
        """A node failed or answered MOVED: the slot map may be stale."""

    # -- EmbeddingStore -----------------------------------------------------------------------

    def open(self, tables: Sequence[str]) -> None:
        with self._lock:
            for name in tables:
                if name in self._number:
                    continue
                raw = self._read_meta(name)
                if not raw:
                    raise KeyError(f"table {name} is not in Redis under prefix {self.options.key_prefix!r}")
                meta = TableMeta.from_mapping(name, raw)
                if self.meta and meta.dim != self.meta[0].dim:
                    raise ValueError(f"table {name} has dim {meta.dim}, others {self.meta[0].dim}")
                if len(self.meta) >= 255:
                    raise ValueError("at most 255 tables per store")
                self._number[name] = len(self.meta)
                self.meta.append(meta)
                zeros = self.options.default_row == "zeros"
                default = np.zeros(meta.dim, np.float32) if zeros else meta.mean
                self._default_rows = np.vstack([self._default_rows.reshape(-1, meta.dim), default])
                prefix = self.options.key_prefix
                self._tags.append([f"{hash_tag(prefix, name, b)}:".encode() for b in range(meta.buckets)])
                if self._cache is None:
                    opts = self.options
                    cfg = HotCacheConfig(rows=opts.cache_rows, mb=opts.cache_mb, policy=opts.cache_policy)
                    self._cache = HotRowCache.from_config(cfg, meta.dim)

    def dim(self, table: str) -> int:
        return self.meta[self._number[table]].dim

    def lookup_flat(
        self, tables: Sequence[str], which: np.ndarray, ids: np.ndarray, deadline: float | None = None
    ) -> tuple[np.ndarray, LookupStats]:
        started = time.perf_counter()
        which = np.asarray(which, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        dim = check_lookup(tables, which, ids, self.dim)
        numbers = np.array([self._number[t] for t in tables], dtype=np.int64)
        limits = np.array([self.meta[n].rows for n in numbers], dtype=np.int64)
        if len(ids) and ((ids < 0).any() or (ids >= limits[which]).any()):
            bad = ids[(ids < 0) | (ids >= limits[which])][0]
            raise ValueError(f"row id {bad} out of range for its table")
        keys = (numbers[which] << _ID_BITS) | ids
        with self._lock:
            cache = self._cache
            if cache is None:
                raise KeyError("no table opened: call open(tables) first")
            uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            hit, hit_rows = cache.get(uniq, counts)
            rows = np.empty((len(uniq), dim), dtype=np.float32)
            rows[hit] = hit_rows
            stats = LookupStats(lookups=len(ids), hits=int(counts[hit].sum()))
            stats.misses = stats.lookups - stats.hits
            missed = uniq[~hit]
            if len(missed):
                fetched, ok = self._fetch(missed, deadline, stats)
                rows[~hit] = fetched
                cache.put(missed[ok], fetched[ok])
                stats.fetched = int(ok.sum())
                stats.degraded_rows = int(counts[~hit][~ok].sum())
            stats.seconds = time.perf_counter() - started
            self._counters.add(stats, tables, which, hit[inverse])
        return rows[inverse], stats

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._cache
            cache = (
                {**vars(c.counters), "size": len(c), "capacity": c.capacity, "policy": c.policy}
                if c is not None
                else {}
            )
            return counters_dict(
                self._counters,
                evictions=cache.get("evictions", 0),
                cache=cache,
                node_failures=sum(n.failures for n in self.nodes),
                connects=sum(n.connects for n in self.nodes),
            )

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    # -- the round trips ----------------------------------------------------------------------

    def _fetch(
        self, keys: np.ndarray, deadline: float | None, stats: LookupStats
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the missed ``keys`` (defaults where not ``ok``) and the ``ok`` mask."""
        tno = keys >> _ID_BITS
        ids = keys & _ID_MASK
        rows = self._default_rows[tno]
        ok = np.zeros(len(keys), dtype=bool)
        now = self.clock.now()
        if deadline is not None and now >= deadline:
            return rows, ok
        self._before_fetch(now)
        buckets = np.empty(len(keys), dtype=np.int64)
        nodes = np.empty(len(keys), dtype=np.int64)
        for t in np.unique(tno).tolist():
            sel = tno == t
            buckets[sel] = bucket_of(ids[sel], self.meta[t].buckets)
            nodes[sel] = self._node_of(t, buckets[sel])
        # One MGET per (node, table, bucket) on a cluster; per (node, table) on one node.
        group = tno * SLOTS + (buckets if self._per_bucket() else 0)
        order = np.lexsort((group, nodes))
        plan: dict[int, list[np.ndarray]] = {}
        cuts = np.flatnonzero(np.diff(nodes[order]) | np.diff(group[order])) + 1
        for positions in np.split(order, cuts):
            plan.setdefault(int(nodes[positions[0]]), []).append(positions)

        sent = []
        for n, commands in plan.items():
            node = self.nodes[n]
            if now < node.down_until:
                continue
            wait = self._wait(deadline)
            if wait <= 0:
                break
            data = b"".join(
                pack_command(b"MGET", *self._key_names(tno, ids, buckets, pos)) for pos in commands
            )
            try:
                node.send(data, wait)
                sent.append((node, commands))
            except _NODE_ERRORS as exc:
                stats.errors += 1
                node.fail(self.clock.now(), self.rest_s, exc)
                self._topology_suspect()
        stats.round_trips = len(sent)
        for node, commands in sent:
            self._read_replies(node, commands, tno, deadline, rows, ok, stats)
        return rows, ok

    def _per_bucket(self) -> bool:
        return False

    def _key_names(
        self, tno: np.ndarray, ids: np.ndarray, buckets: np.ndarray, pos: np.ndarray
    ) -> list[bytes]:
        tags = self._tags
        return [
            tags[t][b] + b"%d" % i
            for t, b, i in zip(tno[pos].tolist(), buckets[pos].tolist(), ids[pos].tolist(), strict=True)
        ]

    def _read_replies(
        self,
        node: _Node,
        commands: list[np.ndarray],
        tno: np.ndarray,
        deadline: float | None,
        rows: np.ndarray,
        ok: np.ndarray,
        stats: LookupStats,
    ) -> None:
        for positions in commands:
            wait = self._wait(deadline)
            if wait <= 0:
                node.conn.close()  # replies still pending: the connection is out of step
                return
            try:
                reply = node.conn.read(wait)
            except _NODE_ERRORS as exc:
                stats.errors += 1
                node.fail(self.clock.now(), self.rest_s, exc)
                self._topology_suspect()
                return
            if isinstance(reply, RespError):  # e.g. MOVED; the connection is still in step
                stats.errors += 1
                if reply.kind in ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"):
                    self._topology_suspect()
                continue
            if not isinstance(reply, list) or len(reply) != len(positions):
                stats.errors += 1
                node.fail(self.clock.now(), self.rest_s, ValueError(f"unexpected reply {reply!r:.60}"))
                return
            self._decode(reply, positions, int(tno[positions[0]]), rows, ok)

    def _decode(
        self, values: list[bytes | None], positions: np.ndarray, t: int, rows: np.ndarray, ok: np.ndarray
    ) -> None:
        meta = self.meta[t]
        present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        blob = b"".join(v for v in values if v is not None)
        width = meta.dim * ENCODINGS[meta.encoding].itemsize
        if len(blob) != width * int(present.sum()):
            log.warning("table %s: rows of unexpected size; serving defaults", meta.name)
            return
        got = positions[present]
        rows[got] = np.frombuffer(blob, dtype=ENCODINGS[meta.encoding]).reshape(-1, meta.dim)
        ok[got] = True

    def _wait(self, deadline: float | None) -> float:
        if deadline is None:
            return self.timeout_s
        return min(self.timeout_s, deadline - self.clock.now())


class RedisStore(_RemoteStore):
    """Rows on one Redis node."""

    def __init__(self, config: RedisStoreConfig, clock: Clock | None = None) -> None:
        super().__init__(config, clock)
        self.config = config
        self.nodes = [_Node(config.host, config.port)]

    @classmethod
    def from_config(cls, config: Any, *, clock: Clock | None = None) -> RedisStore:
        if not isinstance(config, RedisStoreConfig):
            raise ValueError(f"RedisStore needs a RedisStoreConfig, got {type(config).__name__}")
        return cls(config, clock)

    def _read_meta(self, table: str) -> dict[bytes, bytes]:
        client = redis.Redis(self.config.host, self.config.port, socket_timeout=self.timeout_s)
        try:
            raw: dict[bytes, bytes] = client.hgetall(meta_key(self.config.key_prefix, table))  # type: ignore[assignment]
            return raw
        finally:
            client.close()

    def _node_of(self, table_no: int, buckets: np.ndarray) -> np.ndarray:
        return np.zeros(len(buckets), dtype=np.int64)


class RedisClusterStore(_RemoteStore):
    """Rows spread over a Redis Cluster's masters by hash slot (see the module docstring)."""

    def __init__(self, config: RedisClusterStoreConfig, clock: Clock | None = None) -> None:
        super().__init__(config, clock)
        self.config = config
        self.startup = parse_nodes(config.nodes)
        self._slot_node = np.full(SLOTS, -1, dtype=np.int64)
        self._bucket_node: list[np.ndarray] = []
        self._stale = False
        self._next_refresh = float("-inf")
        self._refresh()

    @classmethod
    def from_config(cls, config: Any, *, clock: Clock | None = None) -> RedisClusterStore:
        if not isinstance(config, RedisClusterStoreConfig):
            raise ValueError(
                f"RedisClusterStore needs a RedisClusterStoreConfig, got {type(config).__name__}"
            )
        return cls(config, clock)

    def open(self, tables: Sequence[str]) -> None:
        super().open(tables)
        with self._lock:
            self._map_buckets()

    def _read_meta(self, table: str) -> dict[bytes, bytes]:
        key = meta_key(self.config.key_prefix, table)
        node = self.nodes[int(self._slot_node[key_slot(key.encode())])]
        client = redis.Redis(node.host, node.port, socket_timeout=self.timeout_s)
        try:
            raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
            return raw
        finally:
            client.close()

    def _node_of(self, table_no: int, buckets: np.ndarray) -> np.ndarray:
        return self._bucket_node[table_no][buckets]

    def _per_bucket(self) -> bool:
        return True

    def _topology_suspect(self) -> None:
        self._stale = True

    def _before_fetch(self, now: float) -> None:
        if self._stale and now >= self._next_refresh:
            self._next_refresh = now + self.config.refresh_interval_ms / 1000.0
            try:
                self._refresh()
                self._map_buckets()
                self._stale = False
            except (redis.RedisError, OSError, ValueError) as exc:
                log.warning("redis cluster: slot map reload failed (%s); keeping the old one", exc)

    def _refresh(self) -> None:
        """Load the slot map from the first node that answers (known masters, then startup)."""
        now = self.clock.now()
        candidates = [(n.host, n.port) for n in self.nodes if now >= n.down_until] + self.startup
        errors = []
        for host, port in dict.fromkeys(candidates):
            client = redis.Redis(
                host, port, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
            try:
                slots = cluster_slots(client)
            except (redis.RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            finally:
                client.close()
            self._install(slots)
            return
        raise ValueError(f"no cluster node answered CLUSTER SLOTS: {errors}")

    def _install(self, slots: dict[tuple[int, int], tuple[str, int]]) -> None:
        known = {(n.host, n.port): i for i, n in enumerate(self.nodes)}
        slot_node = np.full(SLOTS, -1, dtype=np.int64)
        for (start, end), addr in slots.items():
            if addr not in known:
                known[addr] = len(self.nodes)
                self.nodes.append(_Node(addr[0], addr[1]))
            slot_node[start : end + 1] = known[addr]
        if (slot_node < 0).any():
            raise ValueError(f"{int((slot_node < 0).sum())} hash slots have no master")
        self._slot_node = slot_node

    def _map_buckets(self) -> None:
        self._bucket_node = [
            self._slot_node[np.array([key_slot(tag[:-1]) for tag in tags], dtype=np.int64)]
            for tags in self._tags
        ]
