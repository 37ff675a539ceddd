"""Turns a well-formed Query into the model's request-side inputs, after the checks that need the
feature schema or the catalog (known surface and features, id ranges, known item ids); the wire
shape (ranges, sizes, finite numbers) was checked once, at the edge (``serving.edge.convert``).

Request-side sparse features come, in order of precedence, from the caller's context, from
the user feature snapshot in the catalog (user-side features of known users), or from the
request itself (``user_id``, ``surface``); anything else is 0, the schema's default id.
"""

from __future__ import annotations

import numpy as np

from dlrm.schema import FeatureSchema
from embeddings.catalog import Catalog
from serving.domain import Query, RequestFeatures
from serving.errors import InvalidArgument


class FeatureResolver:
    def __init__(self, schema: FeatureSchema, catalog: Catalog) -> None:
        self.schema = schema
        self.catalog = catalog
        self.request_idx = schema.side_indices("user", "context")
        self.request_features = [schema.sparse[i] for i in self.request_idx]
        self.user_names = [schema.sparse[i].name for i in schema.side_indices("user")]
        self.surface_ids = {name: i for i, name in enumerate(catalog.surfaces)}
        self._cold_vector = catalog.user_vectors.mean(axis=0).astype(np.float32)
        self._tier_col = (
            self.user_names.index(catalog.tier_feature) if catalog.tier_feature in self.user_names else None
        )
        self._known_sparse = {f.name for f in self.request_features}
        self._known_dense = set(schema.dense_names)

    def validate(self, query: Query) -> None:
        """Raise InvalidArgument naming the first bad field."""
        if query.surface not in self.surface_ids:
            raise InvalidArgument(
                "surface", f"unknown surface {query.surface!r}; known: {sorted(self.surface_ids)}"
            )
        for name, value in query.sparse.items():
            if name not in self._known_sparse:
                raise InvalidArgument(
                    f"context.sparse[{name}]",
                    f"not a request-side sparse feature of schema {self.schema.name}",
                )
            card = self.schema.feature(name).cardinality
            if not 0 <= value < card:
                raise InvalidArgument(f"context.sparse[{name}]", f"id {value} outside [0, {card})")
        for name in query.dense:
            if name not in self._known_dense:
                raise InvalidArgument(
                    f"context.dense[{name}]", f"not a dense feature of schema {self.schema.name}"
                )

    def item_ids(self, query: Query) -> np.ndarray:
        """The caller's items (Score) as catalog ids; InvalidArgument names an unknown one."""
        ids = np.asarray(query.item_ids, dtype=np.int64)
        n_items = self.catalog.n_items
        bad = ids[(ids < 0) | (ids >= n_items)]
        if len(bad):
            raise InvalidArgument("item_ids", f"unknown item id {int(bad[0])} (catalog has 0..{n_items - 1})")
        return ids

    def resolve(self, query: Query) -> RequestFeatures:
        self.validate(query)
        known_user = query.user_id < self.catalog.n_users
        user_row = self.catalog.user_sparse[query.user_id] if known_user else None
        sparse = np.zeros(len(self.request_features), dtype=np.int64)
        for j, feat in enumerate(self.request_features):
            if feat.name in query.sparse:
                sparse[j] = query.sparse[feat.name]
            elif feat.name == "user_id":
                sparse[j] = query.user_id % feat.cardinality
            elif feat.name == "surface":
                sparse[j] = self.surface_ids[query.surface]
            elif user_row is not None and feat.name in self.user_names:
                sparse[j] = user_row[self.user_names.index(feat.name)]
        dense = np.zeros(len(self.schema.dense), dtype=np.float32)
        for j, name in enumerate(self.schema.dense_names):
            if name in query.dense:
                dense[j] = query.dense[name]
            elif known_user and name in self.catalog.user_dense_names:
                dense[j] = self.catalog.user_dense[query.user_id, self.catalog.user_dense_names.index(name)]
        vector = self.catalog.user_vectors[query.user_id] if known_user else self._cold_vector
        tier = "new"
        if self._tier_col is not None:
            tier_name = self.catalog.tier_feature
            tier_value = query.sparse.get(
                tier_name, user_row[self._tier_col] if user_row is not None else None
            )
            tier = "new" if tier_value is None else str(int(tier_value))
        return RequestFeatures(
            sparse=sparse,
            dense=dense,
            user_vector=vector,
            segment=f"{query.surface}/{tier}",
            deadline=query.deadline,
        )
