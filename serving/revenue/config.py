"""Revenue tracker configs: one typed config per backend (Feast's pattern); the registry that
builds a backend from one is ``serving.revenue.backends``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    pass


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


def _check_common(half_life_s: float, request_ttl_s: float, dedupe_ttl_s: float) -> None:
    if not half_life_s > 0:
        raise ValueError(f"{half_life_s=} must be > 0")
    if not request_ttl_s > 0:
        raise ValueError(f"{request_ttl_s=} must be > 0")
    if dedupe_ttl_s < request_ttl_s:
        raise ValueError(f"{dedupe_ttl_s=} must be >= {request_ttl_s=}")
