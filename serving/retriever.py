"""Candidate retrieval behind a small ABC; the default is a Faiss inner-product index."""

from __future__ import annotations

from abc import ABC, abstractmethod

import faiss
import numpy as np


class Retriever(ABC):
    @abstractmethod
    def retrieve(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items for each of ``B`` user vectors: (``B X k`` int64 ids, float32 scores)."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Items in the index."""


class FaissRetriever(Retriever):
    """Searches a Faiss index whose row ``i`` is item id ``i``.

    ``item_log_values``: for an index over ``[item vector, log price]`` rows
    (``embeddings.index.value_vectors``), each item's last coordinate. Queries then get
    ``value_weight`` appended (1: retrieve by expected value; 0: by click), and the returned
    scores have the value term taken off again: they are the two-tower inner products either
    way, which the cheap path and the router read as click logits.
    """

    def __init__(
        self, index: faiss.Index, item_log_values: np.ndarray | None = None, value_weight: float = 0.0
    ) -> None:
        if item_log_values is None and value_weight != 0.0:
            raise ValueError("value_weight needs an index with a log-price coordinate")
        if item_log_values is not None and len(item_log_values) != index.ntotal:
            raise ValueError(f"{len(item_log_values)} log values for {index.ntotal} indexed items")
        self.index = index
        self.item_log_values = None if item_log_values is None else item_log_values.astype(np.float32)
        self.value_weight = value_weight

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def retrieve(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(user_vectors, dtype=np.float32)
        if self.item_log_values is not None:
            queries = np.hstack([queries, np.full((len(queries), 1), self.value_weight, dtype=np.float32)])
        k = min(k, self.size)
        scores, ids = self.index.search(queries, k)
        # IVF/HNSW can return fewer than k hits (-1 ids, always at the end of a row): cut every
        # row to the shortest row's real hits so the result stays rectangular.
        valid = int((ids >= 0).sum(axis=1).min()) if ids.size else 0
        ids, scores = ids[:, :valid].astype(np.int64), scores[:, :valid]
        if self.item_log_values is not None and self.value_weight != 0.0:
            scores = scores - self.value_weight * self.item_log_values[ids]
        return ids, scores
