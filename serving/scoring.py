"""Scoring paths behind one ABC: the full DLRM and the cheap retrieval dot product.

Both score a batch of requests (each with its own candidates) in one call, so the batcher
can hand concurrent requests to the model together. They run on a worker thread, never on
the asyncio event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from dlrm.data import single_hot_kjt
from dlrm.factored import FactoredDLRM
from embeddings.catalog import Catalog
from serving.domain import Candidates, Path_, RequestFeatures


class Scorer(ABC):
    path: Path_

    @abstractmethod
    def score_batch(self, requests: list[RequestFeatures], candidates: list[Candidates]) -> list[np.ndarray]:
        """One float32 score array per request, aligned with its candidates."""


class FullScorer(Scorer):
    """The DLRM, request side computed once per request (``FactoredDLRM``)."""

    path: Path_ = "full"

    def __init__(self, model: FactoredDLRM, catalog: Catalog, threads: int = 1) -> None:
        self.model = model
        self.catalog = catalog
        self.threads = threads

    def score_batch(self, requests: list[RequestFeatures], candidates: list[Candidates]) -> list[np.ndarray]:
        if len(requests) != len(candidates):
            raise ValueError(f"{len(requests)} requests but {len(candidates)} candidate lists")
        torch.set_num_threads(self.threads)
        counts = [len(c.item_ids) for c in candidates]
        dense = torch.from_numpy(np.stack([r.dense for r in requests]))
        req_sparse = torch.from_numpy(np.stack([r.sparse for r in requests]))
        item_ids = np.concatenate([c.item_ids for c in candidates])
        item_sparse = torch.from_numpy(self.catalog.item_sparse[item_ids])
        logits = self.model(
            dense,
            single_hot_kjt(self.model.request_keys, req_sparse),
            single_hot_kjt(self.model.item_keys, item_sparse),
            counts,
        )
        probs = torch.sigmoid(logits).numpy()
        return list(np.split(probs, np.cumsum(counts)[:-1]))


class CheapScorer(Scorer):
    """The retrieval tower's inner product: no model call at all, ~100x cheaper than full."""

    path: Path_ = "cheap"

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def score_batch(self, requests: list[RequestFeatures], candidates: list[Candidates]) -> list[np.ndarray]:
        out = []
        for req, cand in zip(requests, candidates, strict=True):
            vectors = self.catalog.item_vectors[cand.item_ids]
            out.append((vectors @ req.user_vector).astype(np.float32))
        return out
