"""Faiss inner-product indexes over item vectors, and their recall against exact search.

Row ``i`` of every index is item id ``i`` (vectors are added in id order, never with ids),
which ``serving.retriever.FaissRetriever`` relies on.

Default: IVF-Flat, ``nlist = 4 sqrt(n)``, ``nprobe = 96``. On the default world (5,000 items,
d = 32, two-tower vectors, 1,000 traffic-weighted user queries, k = 500, one thread) we measured:

=============================  ==========  =========  ===================
index                          recall@500  build      one query (median)
=============================  ==========  =========  ===================
flat (exact)                   1.0         < 0.01 s   139 us
ivf nlist 282, nprobe 64       0.963       0.10 s     105 us
ivf nlist 282, nprobe 96       0.992       0.10 s     115 us
hnsw M 32, efSearch 500        0.943       0.15 s     310 us
hnsw M 32, efSearch 800        0.982       0.15 s     569 us
=============================  ==========  =========  ===================

(Measured on the two-tower vectors alone; with the log-price coordinate of ``value_vectors``
and value queries, ivf nlist 283 nprobe 96 gives recall@500 0.996, ``valuerank index --json``.)

HNSW needs efSearch well above k and is then slower than exact search: with k = 500 of 5,000
items it visits most of the graph, and the bias coordinates of the two-tower vectors (an
inner product, not a metric) hurt its greedy walk. IVF with nprobe 96 keeps recall near 0.99
at a third of the lists. At this catalogue size flat is nearly as fast; IVF is what keeps the
per-query cost sublinear as the catalogue grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[IndexKind, ...] = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexConfig:
    kind: IndexKind = "ivf"
    """``flat`` (exact) | ``ivf`` (IVF-Flat) | ``hnsw`` (HNSW-Flat); all inner product."""
    nlist: int = 0
    """IVF inverted lists; 0 picks ``4 * sqrt(n_items)``."""
    nprobe: int = 96
    """IVF lists scanned per query (capped at ``nlist``)."""
    hnsw_m: int = 32
    """HNSW neighbours per node."""
    ef_construction: int = 40
    """HNSW candidate list size while building."""
    ef_search: int = 800
    """HNSW candidate list size per query; must exceed k for good recall."""
    recall_k: int = 500
    """k at which recall against exact search is measured (the retrieval depth served)."""
    recall_queries: int = 1000
    """User vectors, sampled by traffic, used as queries to measure recall."""
    recall_seed: int = 0
    """Seed of the query sample and of IVF's k-means."""

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"{self.kind=} must be one of {INDEX_KINDS}")
        if self.nlist < 0:
            raise ValueError(f"{self.nlist=} must be >= 0 (0 = auto)")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search", "recall_k", "recall_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def resolved_nlist(self, n_items: int) -> int:
        """The IVF list count used for ``n_items`` vectors."""
        nlist = self.nlist or round(4 * math.sqrt(n_items))
        return max(1, min(nlist, n_items))

    def params(self, n_items: int) -> dict[str, int | str]:
        """The parameters that matter for ``kind`` (recorded in the index manifest)."""
        if self.kind == "ivf":
            nlist = self.resolved_nlist(n_items)
            return {"kind": "ivf", "nlist": nlist, "nprobe": min(self.nprobe, nlist)}
        if self.kind == "hnsw":
            return {
                "kind": "hnsw",
                "hnsw_m": self.hnsw_m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
            }
        return {"kind": "flat"}


def build_index(vectors: np.ndarray, config: IndexConfig = IndexConfig()) -> faiss.Index:
    """An inner-product index over ``N X d`` vectors; row ``i`` is vector ``i``."""
    xb = _as_f32(vectors)
    n, d = xb.shape
    if n == 0:
        raise ValueError("cannot index zero vectors")
    index: faiss.Index
    if config.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif config.kind == "ivf":
        nlist = config.resolved_nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = config.recall_seed
        # Faiss warns below 39 points per centroid; 4 sqrt(n) lists on a few thousand items
        # are below that on purpose (short lists), and k-means converges fine.
        index.cp.min_points_per_centroid = 1
        index.train(xb)
        index.nprobe = min(config.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
    index.add(xb)
    return index


def value_vectors(item_vectors: np.ndarray, item_price: np.ndarray) -> np.ndarray:
    """Index rows ``[v, log price]`` for retrieval by expected value.

    A query ``[u, w]`` scores ``<u, v> + w log price``: the two-tower's click logit plus ``w`` times
    the log price. At ``w = 1`` that is ``log(P(click) x price)`` up to the sigmoid's curvature
    (``log sigmoid(x) ~ x`` for the small click probabilities of a feed), so the index returns the
    candidates a value ranking wants; ``w = 0`` is retrieval by click alone, from the same index.
    """
    if len(item_price) != len(item_vectors):
        raise ValueError(f"{len(item_price)} prices for {len(item_vectors)} item vectors")
    return np.hstack([_as_f32(item_vectors), log_prices(item_price)[:, None].astype(np.float32)])


def log_prices(item_price: np.ndarray) -> np.ndarray:
    """The index's last coordinate per item (a zero price is floored, not -inf)."""
    return np.log(np.maximum(np.asarray(item_price, dtype=np.float64), 1e-12))


def value_queries(user_vectors: np.ndarray, weight: float) -> np.ndarray:
    """Queries ``[u, weight]`` for an index over ``value_vectors``."""
    xq = _as_f32(user_vectors)
    return np.hstack([xq, np.full((len(xq), 1), weight, dtype=np.float32)])


def recall_at_k(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean over queries of |index top-k ∩ exact top-k| / k, exact = IndexFlatIP over ``vectors``."""
    xb, xq = _as_f32(vectors), _as_f32(queries)
    if index.ntotal != len(xb):
        raise ValueError(f"index holds {index.ntotal} vectors but {len(xb)} were given")
    if len(xq) == 0:
        raise ValueError("recall needs at least one query")
    k = min(k, len(xb))
    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    _, truth = exact.search(xq, k)
    _, found = index.search(xq, k)
    hits = [np.intersect1d(f[f >= 0], t).size for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


def _as_f32(x: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {arr.shape}")
    return arr
