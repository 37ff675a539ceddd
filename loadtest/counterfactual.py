"""Score every logged request with both paths and price both slates from the ground truth.

For each request of the world's replay log (time order): resolve its features with the serving
``FeatureResolver``, retrieve ``K`` candidates from the Faiss index, score them with the full
path (``full_scorer``: tables and MLP in the precisions the server would pick; micro-batches
of ``batch`` requests like the pipeline's batcher) and the cheap path (``CheapScorer``, one
request at a time like the pipeline), and take each path's slate as the pipeline does
(``serving.ranking``: top-k by P(click) x price, or by P(click)).
Costs are measured live: ``time.thread_time`` around each scorer call, a request's cost being
its share of its batch (as ``MicroBatcher`` reports ``compute_cpu_s``). Revenue is
counterfactual: ``World.expected_revenue`` of each slate (exact expectation under the
position-bias model), plus one realised draw per slate (``World.sample_outcomes``, seeded) that
online policies learn from, as they would from reported outcomes in production.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from dlrm.schema import FeatureSchema
from dlrm.world import Requests, World
from serving.assembly import full_scorer
from serving.assets import ServingAssets
from serving.domain import Candidates, Path_, Query, RequestFeatures
from serving.features import FeatureResolver
from serving.ranking import RankBy, item_values_for, ranking_keys, top_k
from serving.retriever import FaissRetriever
from serving.scoring import CheapScorer


@dataclass
class ScoredLog:
    """``n`` requests in time order, each scored by both paths."""

    requests: Requests
    surface_names: list[str]
    """Surface name per request."""
    segments: list[str]
    """Router segment (``surface/tier``) per request."""
    features: list[RequestFeatures]
    candidates: list[Candidates]
    full_scores: list[np.ndarray]
    """The full model's click probabilities of each request's candidates."""
    expected_revenue: dict[Path_, np.ndarray]
    """Ground-truth expected dollars of each path's slate, per request."""
    realised_revenue: dict[Path_, np.ndarray]
    """One seeded draw of the dollars each path's slate earned, per request."""
    conversions: dict[Path_, list[list[tuple[int, float]]]]
    """That draw's conversions (item id, dollars) per request: the outcomes a feed would report."""
    cost_ms: dict[Path_, np.ndarray]
    """Measured CPU ms of scoring each request on each path."""
    retrieval_ms: float
    """Median CPU ms of one single-query retrieval (common to both paths)."""
    k: int
    """Slate size."""
    schema: FeatureSchema
    item_values: np.ndarray | None
    """What ranking multiplies P(click) by, per item id: the catalog's prices (a catalog attribute
    any shop knows, which value-aware routing reads too), or None when ranking by click."""
    ranking_revenue: dict[str, dict[Path_, float]] = field(default_factory=dict)
    """Total expected dollars of each path's slates ordered by ``value`` and by ``click``."""

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def uplift(self) -> np.ndarray:
        """True per-request uplift of the full path (what only the oracle may read)."""
        return self.expected_revenue["full"] - self.expected_revenue["cheap"]


def score_log(
    world: World,
    assets: ServingAssets,
    requests: Requests,
    *,
    candidates: int,
    batch: int,
    seed: int,
    rank_by: RankBy = "value",
    retrieval_value_weight: float = 1.0,
    precision: str = "auto",
    mlp_precision: str = "auto",
    progress: bool = False,
) -> ScoredLog:
    schema = assets.model.schema
    catalog = assets.catalog
    resolver = FeatureResolver(schema, catalog)
    n = len(requests)
    names = [world.surface_names[s] for s in requests.surface]
    features = [resolver.resolve(q) for q in _queries(world, schema, requests, names, candidates)]
    segments = [f.segment for f in features]

    retriever = assets.retriever(retrieval_value_weight)
    user_vectors = np.stack([f.user_vector for f in features])
    cands: list[Candidates] = []
    for start in range(0, n, 512):
        ids, scores = retriever.retrieve(user_vectors[start : start + 512], candidates)
        cands.extend(Candidates(i, s) for i, s in zip(ids, scores, strict=True))
    retrieval_ms = _median_single_query_ms(retriever, user_vectors, candidates)

    full = full_scorer(assets, precision=precision, mlp_precision=mlp_precision, threads=1)
    cheap = CheapScorer()
    full_scores: list[np.ndarray] = []
    cost_full = np.zeros(n)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        t0 = time.thread_time()
        full_scores.extend(full.score_batch(features[start:stop], cands[start:stop]))
        spent = (time.thread_time() - t0) * 1000.0
        weights = np.array([len(c.item_ids) for c in cands[start:stop]], dtype=np.float64)
        cost_full[start:stop] = spent * weights / weights.sum()
        if progress and (start // batch) % 200 == 0:
            print(f"replay: scored {stop}/{n} requests with both paths", file=sys.stderr, flush=True)
    cheap_scores: list[np.ndarray] = []
    cost_cheap = np.zeros(n)
    for i in range(n):
        t0 = time.thread_time()
        cheap_scores.extend(cheap.score_batch([features[i]], [cands[i]]))
        cost_cheap[i] = (time.thread_time() - t0) * 1000.0

    k = world.config.slate_size
    values = item_values_for(rank_by, catalog.item_price)
    probs: dict[Path_, list[np.ndarray]] = {"full": full_scores, "cheap": cheap_scores}
    slates = {path: _slates(cands, probs[path], values, k) for path in probs}
    rng = np.random.default_rng(seed)
    expected: dict[Path_, np.ndarray] = {}
    realised: dict[Path_, np.ndarray] = {}
    conversions: dict[Path_, list[list[tuple[int, float]]]] = {}
    for path in ("full", "cheap"):
        expected[path] = world.expected_revenue(requests, slates[path])
        events = world.sample_outcomes(requests, slates[path], rng)
        conversions[path] = [[(e[0], e[2]) for e in evs if e[1] == "conversion"] for evs in events]
        realised[path] = np.array([sum(r for _, r in conv) for conv in conversions[path]])
    # Each path's scores priced in the other order too: what ordering by value rather than by
    # click is worth, measured in this run whichever order is served.
    served, other = ("click", "value") if values is None else ("value", "click")
    other_values = catalog.item_price if other == "value" else None
    ranking_revenue = {
        served: {path: float(expected[path].sum()) for path in probs},
        other: {
            path: float(world.expected_revenue(requests, _slates(cands, probs[path], other_values, k)).sum())
            for path in probs
        },
    }
    return ScoredLog(
        requests=requests,
        surface_names=names,
        segments=segments,
        features=features,
        candidates=cands,
        full_scores=full_scores,
        expected_revenue=expected,
        realised_revenue=realised,
        conversions=conversions,
        cost_ms={"full": cost_full, "cheap": cost_cheap},
        retrieval_ms=retrieval_ms,
        k=k,
        schema=schema,
        item_values=values,
        ranking_revenue=ranking_revenue,
    )


def _slates(
    cands: list[Candidates], probs: list[np.ndarray], values: np.ndarray | None, k: int
) -> np.ndarray:
    """Each request's top-k item ids as the pipeline orders them (``serving.ranking``)."""
    return np.stack(
        [
            c.item_ids[top_k(ranking_keys(p, None if values is None else values[c.item_ids]), k)]
            for c, p in zip(cands, probs, strict=True)
        ]
    )


def _queries(
    world: World, schema: FeatureSchema, requests: Requests, names: list[str], n_cand: int
) -> list[Query]:
    """The Recommend calls a feed service would have made for the logged requests: the context
    (hour, device, session) comes with the call; user features come from the catalog."""
    sparse = world.request_sparse(requests)
    dense = world.dense_features(requests)
    context_sparse = [f.name for f in schema.sparse if f.side == "context" and f.name != "surface"]
    context_dense = [(j, f.name) for j, f in enumerate(schema.dense) if f.side == "context"]
    out = []
    for i in range(len(requests)):
        out.append(
            Query(
                request_id=f"replay-{i}",
                user_id=int(requests.user[i]),
                surface=names[i],
                sparse={name: int(sparse[name][i]) for name in context_sparse},
                dense={name: float(dense[i, j]) for j, name in context_dense},
                k=world.config.slate_size,
                num_candidates=n_cand,
            )
        )
    return out


def _median_single_query_ms(retriever: FaissRetriever, user_vectors: np.ndarray, k: int) -> float:
    # One OpenMP thread, so that the calling thread's CPU time is all the search's CPU time.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for vec in user_vectors[: min(200, len(user_vectors))]:
            t0 = time.thread_time()
            retriever.retrieve(vec[None, :], k)
            times.append((time.thread_time() - t0) * 1000.0)
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(times)) if times else 0.0
