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
    """Searches a Faiss index whose row ``i`` is item id ``i``."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def retrieve(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(user_vectors, dtype=np.float32)
        k = min(k, self.size)
        scores, ids = self.index.search(queries, k)
        # IVF/HNSW can return fewer than k hits (-1 ids, always at the end of a row): cut every
        # row to the shortest row's real hits so the result stays rectangular.
        valid = int((ids >= 0).sum(axis=1).min()) if ids.size else 0
        return ids[:, :valid].astype(np.int64), scores[:, :valid]
