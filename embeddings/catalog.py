"""The serving catalog: what a replica needs besides the DLRM weights and the Faiss index.

Items: their item-side sparse ids (schema order) and retrieval vectors. Users: their user-side
sparse ids and dense values (a feature-store snapshot) and retrieval vectors. Saved as one
``catalog.npz`` plus ``catalog.json`` (names), written by ``valuerank index``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlrm.schema import FeatureSchema
from dlrm.world import World

CATALOG_FORMAT = 2
"""Bumped when the catalog's contents change, so older index folders are rebuilt."""


@dataclass
class Catalog:
    item_sparse: np.ndarray
    """int64 ``I X F_i``: item-side sparse ids per item id, in schema order."""
    item_vectors: np.ndarray
    """float32 ``I X d``: retrieval vectors (row = item id)."""
    user_sparse: np.ndarray
    """int64 ``U X F_u``: user-side sparse ids per user id, in schema order."""
    user_dense: np.ndarray
    """float32 ``U X len(user_dense_names)``."""
    user_vectors: np.ndarray
    """float32 ``U X d``: retrieval vectors (row = user id)."""
    user_dense_names: list[str]
    """Names of the ``user_dense`` columns."""
    surfaces: list[str]
    """Known surfaces; the id of a surface is its position."""
    tier_feature: str = "user_tier"
    """The user-side sparse feature whose value is the user's value tier (router segment)."""
    item_price: np.ndarray | None = None
    """float32 ``I``: list price per item id (value-aware routing values slates with it), if known."""

    @property
    def n_items(self) -> int:
        return int(self.item_sparse.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_sparse.shape[0])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "item_sparse": self.item_sparse,
            "item_vectors": self.item_vectors,
            "user_sparse": self.user_sparse,
            "user_dense": self.user_dense,
            "user_vectors": self.user_vectors,
        }
        if self.item_price is not None:
            arrays["item_price"] = self.item_price
        np.savez(folder / "catalog.npz", **arrays)  # type: ignore[arg-type]
        meta = {
            "user_dense_names": self.user_dense_names,
            "surfaces": self.surfaces,
            "tier_feature": self.tier_feature,
        }
        (folder / "catalog.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Catalog:
        meta = json.loads((folder / "catalog.json").read_text())
        with np.load(folder / "catalog.npz") as z:
            arrays = {k: z[k] for k in z.files}
        return cls(**arrays, **meta)


def world_catalog(world: World, item_vectors: np.ndarray, user_vectors: np.ndarray) -> Catalog:
    """The catalog of a synthetic world, with vectors from a retrieval model."""
    schema: FeatureSchema = world.schema
    items = np.arange(world.n_items)
    item_cols = world.item_sparse(items)
    item_names = [schema.sparse[i].name for i in schema.side_indices("item")]
    users = np.arange(world.n_users)
    user_cols = {
        "user_id": users,
        "user_segment": world.user_segment,
        "user_tier": world.user_tier,
    }
    user_names = [schema.sparse[i].name for i in schema.side_indices("user")]
    user_dense_names = [f.name for f in schema.dense if f.side == "user"]
    user_dense_cols = {"user_log_activity": world.user_log_activity}
    return Catalog(
        item_sparse=np.stack([item_cols[n] for n in item_names], axis=1).astype(np.int64),
        item_vectors=np.ascontiguousarray(item_vectors, dtype=np.float32),
        user_sparse=np.stack([user_cols[n] for n in user_names], axis=1).astype(np.int64),
        user_dense=np.stack([user_dense_cols[n] for n in user_dense_names], axis=1).astype(np.float32),
        user_vectors=np.ascontiguousarray(user_vectors, dtype=np.float32),
        user_dense_names=user_dense_names,
        surfaces=list(world.surface_names),
        item_price=world.item_price.astype(np.float32),
    )
