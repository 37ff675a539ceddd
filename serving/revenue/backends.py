"""Which revenue tracker a config names, and building it: the lazy registry of tracker backends.

``make_tracker(config)`` imports only the backend it builds, so a server on the in-process
tracker never imports redis. A config file selects the backend by ``type``::

    {"type": "redis", "url": "redis://cache:6379/0", "half_life_s": 600}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from dlrm.configs import Registry
from embeddings.clock import Clock, WallClock
from serving.revenue.config import MemoryTrackerConfig, RedisTrackerConfig, TrackerConfig
from serving.revenue.tracker import RevenueTracker

TRACKERS = Registry(
    "tracker",
    {
        "memory": (MemoryTrackerConfig, "serving.revenue.memory:InMemoryTracker"),
        "redis": (RedisTrackerConfig, "serving.revenue.redis:RedisTracker"),
    },
    default="memory",
)


def tracker_config_from_dict(values: Mapping[str, Any]) -> TrackerConfig:
    """The config a mapping (a parsed config file) describes; ``type`` picks the backend."""
    return cast(TrackerConfig, TRACKERS.config_from_dict(values))


def load_tracker_config(path: Path) -> TrackerConfig:
    """The tracker config in JSON file ``path``."""
    return tracker_config_from_dict(json.loads(path.read_text()))


def make_tracker(config: TrackerConfig, clock: Clock | None = None) -> RevenueTracker:
    """Build the tracker ``config`` describes. The default clock is the wall clock: tracker state
    outlives the process (log, Redis) and is shared by replicas, so it needs a common time base."""
    tracker: RevenueTracker = TRACKERS.backend_class(config.type)(config, clock or WallClock())
    return tracker
