"""Revenue tracker backends: one typed config per backend and a lazy registry (Feast's pattern).

``make_tracker(config)`` imports only the backend it builds, so a server on the in-process
tracker never imports redis. A config file selects the backend by ``type``::

    {"type": "redis", "url": "redis://cache:6379/0", "half_life_s": 600}
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from embeddings.clock import Clock, WallClock

if TYPE_CHECKING:
    from serving.revenue.tracker import RevenueTracker


@dataclass(frozen=True)
class MemoryTrackerConfig:
    """The in-process tracker; durable through an append-only outcome log when one is given."""

    type: Literal["memory"] = "memory"
    """Backend name."""
    outcome_log: str | None = None
    """Append-only log (JSON lines) of inferences and outcomes, fsynced before an outcome is
    acknowledged and replayed on start. None keeps state in memory only: outcomes are then not
    durable (tests, offline replay)."""
    half_life_s: float = 900.0
    """Half-life of the decaying window counters, in seconds of the tracker's clock."""
    request_ttl_s: float = 3600.0
    """How long a request id is remembered for attributing its outcomes."""
    dedupe_ttl_s: float = 7200.0
    """How long an outcome key is remembered for dedupe; >= request_ttl_s, so that an outcome
    can never be applied twice while its request can still be attributed."""
    max_requests: int = 2_000_000
    """Cap on remembered requests (oldest forgotten first: their outcomes become unknown)."""
    max_outcome_keys: int = 5_000_000
    """Cap on remembered outcome keys; forgetting one early also forgets its request."""
    compact_bytes: int = 64 << 20
    """Rewrite the log as a snapshot when it grows past this many bytes."""
    write_every: int = 512
    """Buffered inference records written to the log (without fsync) once this many wait."""

    def __post_init__(self) -> None:
        _check_common(self.half_life_s, self.request_ttl_s, self.dedupe_ttl_s)
        if self.outcome_log is not None and not self.outcome_log.strip():
            raise ValueError(f"{self.outcome_log=} must be a path or None")
        if self.max_requests < 1:
            raise ValueError(f"{self.max_requests=} must be >= 1")
        if self.max_outcome_keys < 1:
            raise ValueError(f"{self.max_outcome_keys=} must be >= 1")
        if self.compact_bytes < 4096:
            raise ValueError(f"{self.compact_bytes=} must be >= 4096")
        if self.write_every < 1:
            raise ValueError(f"{self.write_every=} must be >= 1")


@dataclass(frozen=True)
class RedisTrackerConfig:
    """The tracker shared by all replicas through one Redis (run it with ``appendonly yes`` and
    ``appendfsync always``: that is what makes an acknowledged outcome durable, and with
    ``maxmemory-policy noeviction``: an evicted dedupe key could count an outcome twice)."""

    type: Literal["redis"] = "redis"
    """Backend name."""
    url: str = "redis://localhost:6379/0"
    """Redis URL."""
    key_prefix: str = "valuerank:revenue:"
    """Prefix of every key; on Redis Cluster put a hash tag in it (``{vr}:revenue:``) so that the
    scripts' keys share a slot."""
    half_life_s: float = 900.0
    """Half-life of the decaying window counters, in seconds of the tracker's clock."""
    request_ttl_s: float = 3600.0
    """How long a request id is remembered for attributing its outcomes."""
    dedupe_ttl_s: float = 7200.0
    """How long an outcome key is remembered for dedupe; >= request_ttl_s."""
    flush_interval_s: float = 0.02
    """Inferences are buffered locally and sent in batches this often by a background thread;
    0 disables the thread (buffer sent by ``flush()`` and before every outcome batch)."""
    max_batch: int = 500
    """Most inferences sent in one script call."""
    max_buffered: int = 100_000
    """Inferences kept locally while Redis is unreachable; beyond this they are dropped and
    counted (``inferences_dropped``)."""
    socket_timeout_s: float = 1.0
    """Timeout of one Redis command."""
    connect_timeout_s: float = 0.5
    """Timeout of connecting to Redis."""

    def __post_init__(self) -> None:
        _check_common(self.half_life_s, self.request_ttl_s, self.dedupe_ttl_s)
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{self.url=} must start with redis://, rediss:// or unix://")
        if not self.key_prefix:
            raise ValueError(f"{self.key_prefix=} must not be empty")
        if self.flush_interval_s < 0:
            raise ValueError(f"{self.flush_interval_s=} must be >= 0")
        if self.max_batch < 1:
            raise ValueError(f"{self.max_batch=} must be >= 1")
        if self.max_buffered < self.max_batch:
            raise ValueError(f"{self.max_buffered=} must be >= max_batch={self.max_batch}")
        if self.socket_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError(f"{self.socket_timeout_s=} and {self.connect_timeout_s=} must be > 0")


TrackerConfig = MemoryTrackerConfig | RedisTrackerConfig

CONFIGS: dict[str, type[MemoryTrackerConfig] | type[RedisTrackerConfig]] = {
    "memory": MemoryTrackerConfig,
    "redis": RedisTrackerConfig,
}
"""Backend name -> its config class."""

BACKENDS: dict[str, str] = {
    "memory": "serving.revenue.tracker:InMemoryTracker",
    "redis": "serving.revenue.redis:RedisTracker",
}
"""Backend name -> ``module:class``, imported only when that backend is built."""


def tracker_config_from_dict(values: Mapping[str, Any]) -> TrackerConfig:
    """The config a mapping (a parsed config file) describes; ``type`` picks the backend."""
    kind = values.get("type", "memory")
    if kind not in CONFIGS:
        raise ValueError(f"tracker type {kind!r} must be one of {sorted(CONFIGS)}")
    cls = CONFIGS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {kind} tracker settings {unknown}; known: {sorted(known)}")
    return cls(**values)


def make_tracker(config: TrackerConfig, clock: Clock | None = None) -> RevenueTracker:
    """Build the tracker ``config`` describes. The default clock is the wall clock: tracker state
    outlives the process (log, Redis) and is shared by replicas, so it needs a common time base."""
    module_name, _, class_name = BACKENDS[config.type].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    tracker: RevenueTracker = cls(config, clock or WallClock())
    return tracker


def _check_common(half_life_s: float, request_ttl_s: float, dedupe_ttl_s: float) -> None:
    if not half_life_s > 0:
        raise ValueError(f"{half_life_s=} must be > 0")
    if not request_ttl_s > 0:
        raise ValueError(f"{request_ttl_s=} must be > 0")
    if dedupe_ttl_s < request_ttl_s:
        raise ValueError(f"{dedupe_ttl_s=} must be >= {request_ttl_s=}")
