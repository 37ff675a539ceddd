"""The value model behind value-aware routing: what the full path would add to one request.

Two parts, learnt online from what serving sees anyway:

* **Model-based uplift labels.** When the full path scores a request, it scores all K
  candidates, including the cheap path's slate (known for free from the retrieval scores, ordered
  as the pipeline orders it: ``serving.ranking``).
  So for every full-path request the full model values both slates:
  ``V(slate) = sum_p examine(p) * p_full(item_p) * value(item_p)``, and ``V_full - V_cheap`` is a
  per-request uplift label in model units, with no outcome noise (a realised revenue is mostly
  zeros: its coefficient of variation per request is about 2.7 on the default world).
* **A linear model of that label on routing-time features** (``RouteFeaturizer``): one-hots of
  the request's low-cardinality sparse ids (user segment, tier, surface, hour, device, ...),
  their crosses with the surface, the dense features and statistics of the retrieval scores.
  ``OnlineRidge`` keeps decayed sufficient statistics and refits every few hundred labels.

The router converts model units into dollars with a per-surface scale learnt from realised
revenue (``serving.routing.policies``), so the revenue feedback still comes from outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlrm.schema import FeatureSchema
from serving.domain import Candidates, RequestFeatures
from serving.ranking import cheap_slate, ranking_keys, top_k


@dataclass(frozen=True)
class FeaturizerConfig:
    max_cardinality: int = 64
    """Request-side sparse features with at most this many ids are one-hot encoded (so not user ids)."""
    cross_feature: str = "surface"
    """The one-hots are also crossed with this feature (empty string: no crosses)."""
    dense: tuple[str, ...] | None = None
    """Dense features the model reads (None: all of the schema's)."""

    def __post_init__(self) -> None:
        if self.max_cardinality < 1:
            raise ValueError(f"{self.max_cardinality=} must be >= 1")


class RouteFeaturizer:
    """Sparse routing features ``(indices, values)`` of one request, from what routing sees.

    Layout: ``[bias | one-hots | one-hots x cross | continuous | continuous x cross]`` where the
    continuous features are the request's dense features and three retrieval-score statistics.
    Crossing with the surface lets every surface have its own slopes and levels.
    """

    def __init__(
        self,
        schema: FeatureSchema,
        config: FeaturizerConfig = FeaturizerConfig(),
        item_values: np.ndarray | None = None,
    ) -> None:
        self._values = item_values
        request = [schema.sparse[i] for i in schema.side_indices("user", "context")]
        self.columns = np.array(
            [j for j, f in enumerate(request) if f.cardinality <= config.max_cardinality], dtype=np.int64
        )
        self.feature_names = [request[j].name for j in self.columns]
        cards = np.array([request[j].cardinality for j in self.columns], dtype=np.int64)
        self.cards = cards
        self.cross_column = -1
        self.cross_card = 1
        if config.cross_feature in self.feature_names:
            pos = self.feature_names.index(config.cross_feature)
            self.cross_column = int(self.columns[pos])
            self.cross_card = int(cards[pos])
        crossed = self.columns != self.cross_column
        self.offsets = 1 + np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)
        cursor = 1 + int(cards.sum())
        self.crossed = crossed
        self.cross_offsets = np.zeros(len(cards), dtype=np.int64)
        if self.cross_column >= 0:
            for n in np.flatnonzero(crossed):
                self.cross_offsets[n] = cursor
                cursor += int(cards[n]) * self.cross_card
        names = schema.dense_names
        wanted = names if config.dense is None else [n for n in names if n in config.dense]
        self._dense = np.array([names.index(n) for n in wanted], dtype=np.int64)
        self.n_continuous = len(self._dense) + 3 + (2 if self._values is not None else 0)
        self.continuous_offset = cursor
        cursor += self.n_continuous
        self.continuous_cross_offset = cursor
        if self.cross_column >= 0:
            cursor += self.n_continuous * self.cross_card
        self.dim = cursor
        self._continuous = np.arange(self.n_continuous, dtype=np.int64)

    def transform(
        self, request: RequestFeatures, candidates: Candidates | None, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = np.minimum(request.sparse[self.columns], self.cards - 1)
        stats = [request.dense[self._dense].astype(np.float64), _score_stats(candidates, k)]
        if self._values is not None:
            stats.append(_value_stats(candidates, k, self._values))
        continuous = np.concatenate(stats)
        parts = [np.zeros(1, dtype=np.int64), self.offsets + ids]
        values = [np.ones(1 + len(ids))]
        if self.cross_column >= 0:
            c = min(int(request.sparse[self.cross_column]), self.cross_card - 1)
            parts.append(self.cross_offsets[self.crossed] + c * self.cards[self.crossed] + ids[self.crossed])
            values.append(np.ones(int(self.crossed.sum())))
        parts.append(self.continuous_offset + self._continuous)
        values.append(continuous)
        if self.cross_column >= 0:
            parts.append(self.continuous_cross_offset + c * self.n_continuous + self._continuous)
            values.append(continuous)
        return np.concatenate(parts), np.concatenate(values)


def _score_stats(candidates: Candidates | None, k: int) -> np.ndarray:
    """Top retrieval score, mean of the cheap slate's, mean of the next ``4k`` (0 without candidates)."""
    if candidates is None or len(candidates.retrieval_scores) == 0:
        return np.zeros(3)
    s = -np.sort(-candidates.retrieval_scores.astype(np.float64))
    head = s[:k].mean()
    rest = s[k : 5 * k]
    return np.array([s[0], head, rest.mean() if len(rest) else head])


def _value_stats(candidates: Candidates | None, k: int, values: np.ndarray) -> np.ndarray:
    """Mean and spread of the log item values of the cheap path's slate (``serving.ranking``)."""
    if candidates is None or len(candidates.item_ids) == 0:
        return np.zeros(2)
    candidate_values = values[candidates.item_ids]
    top = cheap_slate(candidates.retrieval_scores, candidate_values, k)
    v = np.log(np.maximum(candidate_values[top], 1e-12))
    return np.array([v.mean(), v.std()])


class OnlineRidge:
    """Weighted ridge regression on sparse rows with exponentially forgotten sufficient statistics.

    ``A = sum w_t x_t x_t^T`` and ``b = sum w_t x_t y_t``, the weights ``w_t`` given per label and
    halved every ``half_life`` labels (applied at each refit); the weights solve
    ``(A + l2 I) beta = b`` by Jacobi-preconditioned conjugate gradients warm-started from the
    last solution (a dense solve is slow when BLAS threads fight over a busy machine).
    """

    def __init__(
        self,
        dim: int,
        l2: float = 1.0,
        half_life: float = 20_000.0,
        refit_every: int = 200,
        min_batch: int = 25,
    ) -> None:
        if dim < 1 or l2 <= 0 or half_life <= 0 or refit_every < 1 or min_batch < 1:
            raise ValueError(f"bad ridge settings: {dim=} {l2=} {half_life=} {refit_every=} {min_batch=}")
        self.dim = dim
        self.l2 = l2
        self.refit_every = refit_every
        self.min_batch = min_batch
        self._gamma = 0.5 ** (1.0 / half_life)
        self._A = np.zeros((dim, dim))
        self._b = np.zeros(dim)
        self.weights = np.zeros(dim)
        self.labels = 0
        self.fits = 0
        self._since_fit = 0
        # Other replicas' statistics (``serving.routing.shared``): added to this model's own at
        # every fit, replaced whole at every exchange, so nothing is counted twice.
        self._peer_A: np.ndarray | None = None
        self._peer_b: np.ndarray | None = None
        self.peer_labels = 0

    def add(self, idx: np.ndarray, values: np.ndarray, y: float, weight: float = 1.0) -> None:
        wv = weight * values
        self._A[np.ix_(idx, idx)] += np.outer(wv, values)
        self._b[idx] += wv * y
        self.labels += 1
        self._since_fit += 1
        # A young model refits after every doubling of its labels, then every ``refit_every``.
        if self._since_fit >= min(self.refit_every, max(self.min_batch, self.labels // 2)):
            self.refit()

    def refit(self, max_iter: int = 100, tol: float = 1e-8) -> None:
        if self._since_fit == 0:
            return
        forget = self._gamma**self._since_fit
        self._A *= forget
        self._b *= forget
        self._since_fit = 0
        A, b = self._A, self._b
        if self._peer_A is not None and self._peer_b is not None:
            A, b = A + self._peer_A, b + self._peer_b
        self.weights = _pcg(A, self.l2, b, self.weights, max_iter, tol)
        self.fits += 1

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """This model's own statistics (``A``, ``b``), forgotten up to now: what it shares."""
        forget = self._gamma**self._since_fit
        return self._A * forget, self._b * forget

    def fit_with_peers(
        self, A: np.ndarray, b: np.ndarray, max_iter: int = 100, tol: float = 1e-8
    ) -> np.ndarray:
        """The weights this model would have with the peers' statistics ``A``, ``b`` added to
        its own; pure (the caller solves outside its lock, then ``adopt``s)."""
        own_A, own_b = self.export()
        return _pcg(own_A + A, self.l2, own_b + b, self.weights, max_iter, tol)

    def adopt(self, A: np.ndarray, b: np.ndarray, labels: int, weights: np.ndarray) -> None:
        """Take the peers' statistics (replacing the last ones) and the weights fitted with them."""
        self._peer_A, self._peer_b, self.peer_labels = A, b, labels
        self.weights = weights
        self.fits += 1

    def predict(self, idx: np.ndarray, values: np.ndarray) -> float:
        return float(self.weights[idx] @ values)


def _pcg(A: np.ndarray, l2: float, b: np.ndarray, x0: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """Solve ``(A + l2 I) x = b`` (A symmetric PSD) by preconditioned conjugate gradients."""
    inv_diag = 1.0 / (np.diag(A) + l2)
    x = x0.copy()
    r = b - (A @ x + l2 * x)
    z = inv_diag * r
    p = z.copy()
    rz = float(r @ z)
    stop = tol * max(float(b @ b), 1e-300)
    for _ in range(max_iter):
        if float(r @ r) <= stop:
            break
        Ap = A @ p + l2 * p
        alpha = rz / float(p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        z = inv_diag * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def examination(k: int) -> np.ndarray:
    """P(examine position p): the usual DCG discount ``1 / log2(p + 2)``, the value model's prior."""
    return 1.0 / np.log2(np.arange(k) + 2.0)


def slate_values(
    full_probs: np.ndarray, retrieval_scores: np.ndarray, item_values: np.ndarray | None, k: int
) -> tuple[float, float]:
    """Model value of the full path's and the cheap path's slates, each ranked as the pipeline
    ranks it (``serving.ranking``), both valued by the full model: ``sum_p examine(p) *
    p_full(item_p) * value(item_p)``. ``item_values`` are aligned with the candidates (None:
    rank and value by clicks)."""
    k = min(k, len(full_probs))
    if k == 0:
        return 0.0, 0.0
    gain = ranking_keys(full_probs, item_values)
    disc = examination(k)
    full_top = top_k(gain, k)
    cheap_top = cheap_slate(retrieval_scores, item_values, k)
    return float(disc @ gain[full_top]), float(disc @ gain[cheap_top])
