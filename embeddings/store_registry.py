"""Which embedding store a config names, and opening it: the lazy registry of the store backends.

A config file selects the backend by ``type`` (the fields of that backend's config in
``embeddings.store``)::

    {"type": "redis", "port": 6379, "cache_rows": 50000}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from dlrm.configs import Registry
from embeddings.clock import Clock
from embeddings.store import (
    EmbeddingStore,
    MemoryStoreConfig,
    RedisClusterStoreConfig,
    RedisStoreConfig,
    StoreConfig,
)

STORES = Registry(
    "store",
    {
        "memory": (MemoryStoreConfig, "embeddings.store:MemoryStore"),
        "redis": (RedisStoreConfig, "embeddings.redis_store:RedisStore"),
        "redis-cluster": (RedisClusterStoreConfig, "embeddings.redis_store:RedisClusterStore"),
    },
)


def store_class(type_: str) -> type[EmbeddingStore]:
    """The store class registered under ``type_`` (its module is imported now)."""
    return cast(type[EmbeddingStore], STORES.backend_class(type_))


def open_store(config: StoreConfig, *, clock: Clock | None = None) -> EmbeddingStore:
    return store_class(config.type).from_config(config, clock=clock)


def store_config_from_dict(raw: Mapping[str, Any], *, model_dir: Path | None = None) -> StoreConfig:
    """An embedding store config from JSON; a ``memory`` store without an ``artifact`` serves
    ``model_dir``'s tables."""
    values = dict(raw)
    if values.get("type") == "memory" and not values.get("artifact") and model_dir is not None:
        values["artifact"] = str(model_dir)
    return cast(StoreConfig, STORES.config_from_dict(values))


def load_store_config(path: Path, *, model_dir: Path | None = None) -> StoreConfig:
    """The embedding store config in JSON file ``path`` (see ``store_config_from_dict``)."""
    return store_config_from_dict(json.loads(path.read_text()), model_dir=model_dir)
