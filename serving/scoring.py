"""Scoring paths behind one ABC: the full DLRM and the cheap two-tower click probability.

Both score a batch of requests (each with its own candidates) in one call, so the batcher
can hand concurrent requests to the model together. They run on a worker thread, never on
the asyncio event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from dlrm.data import single_hot_kjt
from dlrm.factored import FactoredDLRM
from embeddings.catalog import Catalog
from embeddings.fast_path import FastDLRM
from embeddings.store import StoreBackedTables
from serving.domain import Candidates, Path_, RequestFeatures
from serving.item_rows import StoreItemRows
from serving.ranking import retrieval_probs


class Scorer(ABC):
    path: Path_
    inline: bool = False
    """Cheap enough (a few numpy operations, no torch, no Faiss) to run on the event loop."""

    @abstractmethod
    def score_batch(self, requests: list[RequestFeatures], candidates: list[Candidates]) -> list[np.ndarray]:
        """One float32 score array per request, aligned with its candidates."""

    def prefetch(self, request: RequestFeatures, candidates: Candidates) -> None:  # noqa: B027
        """Start reading what scoring ``candidates`` needs, before the request waits for a batch."""

    def store_stats(self) -> dict[str, Any] | None:
        """Counters of the embedding store this scorer reads rows from (None: no store)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional for scorers that hold nothing
        """Release the scorer's threads."""


class FullScorer(Scorer):
    """The DLRM, request side computed once per request (``FactoredDLRM``), run as a few large
    matrix products per request (``FastDLRM``: same results up to float rounding, 2.4x faster
    than TorchRec's eager DLRM on the reference model, ``valuerank bench scoring``).

    When the model's item-side tables are a ``StoreBackedTables`` (the Redis tier), they are
    replaced by rows the scorer reads itself (``serving.item_rows``): prefetched when the
    request queues, within its deadline, default rows (counted) when late.
    """

    path: Path_ = "full"

    def __init__(
        self, model: FactoredDLRM, catalog: Catalog, threads: int = 1, dtype: torch.dtype = torch.float32
    ) -> None:
        self.catalog = catalog
        self.threads = threads
        tables = model.item_tables
        self.item_rows = StoreItemRows(tables, catalog) if isinstance(tables, StoreBackedTables) else None
        if self.item_rows is not None:
            model.item_tables = self.item_rows.module
        self.model: FastDLRM = FastDLRM(model, dtype=dtype)

    def score_batch(self, requests: list[RequestFeatures], candidates: list[Candidates]) -> list[np.ndarray]:
        if len(requests) != len(candidates):
            raise ValueError(f"{len(requests)} requests but {len(candidates)} candidate lists")
        torch.set_num_threads(self.threads)
        counts = [len(c.item_ids) for c in candidates]
        dense = torch.from_numpy(np.stack([r.dense for r in requests]))
        req_sparse = torch.from_numpy(np.stack([r.sparse for r in requests]))
        item_ids = np.concatenate([c.item_ids for c in candidates])
        item_sparse = torch.from_numpy(self.catalog.item_sparse[item_ids])
        if self.item_rows is not None:
            self.item_rows.rows(requests, candidates)
        logits = self.model(
            dense,
            single_hot_kjt(self.model.request_keys, req_sparse),
            single_hot_kjt(self.model.item_keys, item_sparse),
            counts,
        )
        probs = torch.sigmoid(logits).numpy()
        return list(np.split(probs, np.cumsum(counts)[:-1]))

    def prefetch(self, request: RequestFeatures, candidates: Candidates) -> None:
        if self.item_rows is not None:
            self.item_rows.prefetch(request, candidates)

    def store_stats(self) -> dict[str, Any] | None:
        return None if self.item_rows is None else self.item_rows.stats()

    def close(self) -> None:
        if self.item_rows is not None:
            self.item_rows.close()


class CheapScorer(Scorer):
    """The two-tower's click probability ``sigmoid(<user, item>)`` from the inner products that
    retrieval already computed (``Candidates.retrieval_scores``): no model call, no lookups.
    ``valuerank replay`` measures its cost against the full path's."""

    path: Path_ = "cheap"
    inline = True

    def score_batch(self, requests: list[RequestFeatures], candidates: list[Candidates]) -> list[np.ndarray]:
        if len(requests) != len(candidates):
            raise ValueError(f"{len(requests)} requests but {len(candidates)} candidate lists")
        return [retrieval_probs(cand.retrieval_scores).astype(np.float32) for cand in candidates]
