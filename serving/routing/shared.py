"""What one replica's router learnt, shared with the others through the tracker's backend.

Each replica publishes its own learnt statistics under its own key and reads every other
replica's: a replica's model is fitted on its own statistics plus the sum of the others'. A
replica only ever writes its own key, and a read replaces the peers' part whole, so nothing is
counted twice however often replicas exchange; a key expires ``ttl_s`` after its replica stopped
publishing (a dead replica's knowledge fades with it). An unreachable backend leaves each replica
learning alone from what it had (the exchange answers None), never failing a request.
"""

from __future__ import annotations

import io
import logging
import os
import socket
from abc import ABC, abstractmethod

import numpy as np

log = logging.getLogger(__name__)


class SharedLearning(ABC):
    """Where replicas exchange what their routers learnt."""

    replica: str

    @abstractmethod
    def exchange(self, own: bytes) -> list[bytes] | None:
        """Publish this replica's state; the other replicas' latest states, or None when the
        backend is unreachable (keep what you had)."""

    def close(self) -> None:  # noqa: B027
        """Release the connection (default: nothing to release)."""


class MemoryLearning(SharedLearning):
    """Replicas in one process sharing one dict (tests; the embedded default has one replica)."""

    def __init__(self, board: dict[str, bytes], replica: str) -> None:
        self.board = board
        self.replica = replica

    def exchange(self, own: bytes) -> list[bytes] | None:
        self.board[self.replica] = own
        return [state for name, state in sorted(self.board.items()) if name != self.replica]


class RedisLearning(SharedLearning):
    """One key per replica, ``<key_prefix><replica>``, set with a TTL at every exchange."""

    def __init__(
        self,
        url: str,
        key_prefix: str,
        replica: str | None = None,
        ttl_s: float = 300.0,
        socket_timeout_s: float = 1.0,
    ) -> None:
        import redis

        if ttl_s <= 0:
            raise ValueError(f"{ttl_s=} must be > 0")
        self.key_prefix = key_prefix
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.ttl_ms = int(ttl_s * 1000)
        self.failures = 0
        self._errors = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )

    def exchange(self, own: bytes) -> list[bytes] | None:
        own_key = self.key_prefix + self.replica
        try:
            self._redis.set(own_key, own, px=self.ttl_ms)
            found = self._redis.scan_iter(match=self.key_prefix + "*", count=1000)
            keys = [k for k in found if k != own_key.encode()]
            states = self._redis.mget(sorted(keys)) if keys else []
        except self._errors as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                log.warning(
                    "router state exchange failed (%d so far); learning alone: %s", self.failures, exc
                )
            return None
        return [s for s in states if isinstance(s, bytes)]

    def close(self) -> None:
        self._redis.close()


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays to bytes (numpy's own format: no pickle)."""
    out = io.BytesIO()
    np.savez(out, allow_pickle=False, **arrays)
    return out.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
