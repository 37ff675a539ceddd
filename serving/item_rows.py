"""Item-side embedding rows from an ``EmbeddingStore`` (the Redis tier) for the full scorer.

A request's ``K X F_i`` rows are read when the pipeline hands it to the micro-batcher
(``prefetch``), on a thread of their own, so the store's round trip overlaps the batching
window and any queueing instead of adding to them. Requests that queue up while that thread
is busy are read together in its next lookup: one pipelined round trip per node for all
their cache misses, bounded by the earliest of their deadlines. Rows not fetched in time are
the store's default rows, counted, never an error. A request that was not prefetched (a Score
call) is read when its batch is scored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.catalog import Catalog
from embeddings.store import StoreBackedTables
from serving.domain import Candidates, RequestFeatures

MAX_PENDING = 4096
"""Prefetches kept for requests not scored yet; a request cancelled in the queue leaves one
behind, and the oldest are dropped beyond this many."""


@dataclass
class _Want:
    """The rows one request needs, and where they go."""

    candidates: Candidates
    ids: np.ndarray
    """``K X F_i`` item-side ids."""
    deadline: float | None
    rows: Future[np.ndarray] = field(default_factory=Future)


class StoreItemRows:
    """Store lookups for the item side of ``FactoredDLRM``.

    ``module`` replaces the model's item tables: it returns the rows that ``rows`` collected
    for the batch being scored (the KJT only gives the batch size).
    """

    def __init__(self, tables: StoreBackedTables, catalog: Catalog) -> None:
        self.tables = tables
        self.store = tables.store
        self.catalog = catalog
        self.module = GivenRows(tables.keys, tables.dim)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vr-store")
        self._lock = threading.Lock()
        self._queued: list[_Want] = []
        self._pending: OrderedDict[int, _Want] = OrderedDict()
        # Refreshed by the thread of each lookup as it ends, so that a stats call on the event
        # loop (or the model thread) never waits for the store's lock, which a lookup holds
        # across its round trip.
        self._stats = self.store.stats()

    def prefetch(self, request: RequestFeatures, candidates: Candidates) -> None:
        """Queue the lookup of ``candidates``' rows now (``rows`` collects it)."""
        want = self._want(request, candidates)
        with self._lock:
            self._queued.append(want)
            self._pending[id(candidates)] = want  # the want holds ``candidates``: the id stays unique
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        self._pool.submit(self._drain)

    def rows(self, requests: Sequence[RequestFeatures], candidates: Sequence[Candidates]) -> torch.Tensor:
        """``N X F_i X D`` rows of all candidates of a batch, in order; sets them on ``module``."""
        with self._lock:
            found = [self._pending.pop(id(c), None) for c in candidates]
        wants: list[_Want] = []
        unread: list[_Want] = []
        for request, cand, want in zip(requests, candidates, found, strict=True):
            if want is None:
                want = self._want(request, cand)
                unread.append(want)
            wants.append(want)
        if unread:
            self._fetch(unread)  # not prefetched: read now, together
        self.module.rows = torch.from_numpy(np.concatenate([w.rows.result() for w in wants]))
        return self.module.rows

    def stats(self) -> dict[str, Any]:
        return self._stats

    def close(self) -> None:
        """Stop the lookup thread (the store belongs to whoever opened it)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            stranded, self._queued = self._queued, []
        for want in stranded:
            want.rows.set_exception(RuntimeError("item rows: scorer closed"))

    def _want(self, request: RequestFeatures, candidates: Candidates) -> _Want:
        return _Want(candidates, self.catalog.item_sparse[candidates.item_ids], request.deadline)

    def _drain(self) -> None:
        with self._lock:
            group, self._queued = self._queued, []
        if group:
            self._fetch(group)

    def _fetch(self, group: list[_Want]) -> None:
        """One store lookup for every want of ``group``, bounded by their earliest deadline."""
        deadlines = [w.deadline for w in group if w.deadline is not None]
        ids = np.concatenate([w.ids for w in group])
        try:
            rows, _ = self.store.lookup_features(self.tables.tables, ids, min(deadlines, default=None))
        except Exception as exc:  # handed to every request of the group, raised where it is scored
            for want in group:
                want.rows.set_exception(exc)
            return
        finally:
            self._stats = self.store.stats()
        cuts = np.cumsum([len(w.ids) for w in group])[:-1]
        for want, part in zip(group, np.split(rows, cuts), strict=True):
            want.rows.set_result(part)


class GivenRows(nn.Module):
    """KJT -> KeyedTensor of rows looked up beforehand (``rows``, ``B X F X D``)."""

    def __init__(self, keys: Sequence[str], dim: int) -> None:
        super().__init__()
        self.keys = list(keys)
        self.dim = dim
        self.rows: torch.Tensor | None = None

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        rows = self.rows
        if rows is None or rows.shape[0] != kjt.stride():
            raise RuntimeError("the item rows of this batch were not looked up")
        return KeyedTensor(
            keys=self.keys, length_per_key=[self.dim] * len(self.keys), values=rows.reshape(rows.shape[0], -1)
        )
