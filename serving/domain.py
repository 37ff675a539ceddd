"""Domain types of the serving pipeline. No protobuf here: ``serving.edge.convert`` maps to and from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Path_ = Literal["full", "cheap", "fallback"]
"""How a request was answered: the full DLRM, the cheap two-tower path, or the fallback tier
(no retrieval, no model: the segment's top items, ``serving.fallback``)."""
PATHS: tuple[Path_, ...] = ("full", "cheap", "fallback")
SCORING_PATHS: tuple[Path_, ...] = ("full", "cheap")
"""The paths that score candidates: what a router chooses and a caller may force."""
EVENTS = ("impression", "click", "conversion")
MAX_K = 1000
MAX_CANDIDATES = 10_000


@dataclass(frozen=True)
class Query:
    """One Recommend (or Score) call after validation."""

    request_id: str
    user_id: int
    surface: str
    sparse: dict[str, int]
    """Request-side sparse ids the caller sent, by feature name (others are looked up)."""
    dense: dict[str, float]
    """Dense values the caller sent, by feature name (others default to 0)."""
    k: int = 10
    num_candidates: int = 0
    """Candidates to retrieve; 0 = server default."""
    force_path: Path_ | None = None
    deadline: float | None = None
    """Absolute deadline on the pipeline's clock, or None."""
    request_start: float | None = None
    """Unix time the caller (or its proxy on the same host) sent the call, from the
    ``x-request-start`` header: admission counts the time since as queueing the server could
    not see (kernel and gRPC queues before the handler). None: not sent."""
    item_ids: tuple[int, ...] = ()
    """Score only: the caller's candidates."""


@dataclass(frozen=True)
class RequestFeatures:
    """Resolved request-side inputs, in schema order."""

    sparse: np.ndarray
    """int64 ``F_r``: ids of the request-side sparse features (user, context) in schema order."""
    dense: np.ndarray
    """float32 ``n_dense``."""
    user_vector: np.ndarray
    """float32 ``d``: the retrieval tower's user vector."""
    segment: str
    """Router segment, ``surface/tier``."""
    deadline: float | None = None
    """The request's absolute deadline on the pipeline's clock (``Query.deadline``): the item-side
    embedding store bounds its round trips by it."""


@dataclass(frozen=True)
class Candidates:
    item_ids: np.ndarray
    """int64 ``K``."""
    retrieval_scores: np.ndarray
    """float32 ``K``: user-vector x item-vector inner products."""

    def take(self, indices: np.ndarray) -> Candidates:
        """The candidates at ``indices``, in that order (a cascade's head: the cheap order's top M)."""
        return Candidates(self.item_ids[indices], self.retrieval_scores[indices])


@dataclass(frozen=True)
class Decision:
    """The router's choice for one request, and why."""

    path: Path_
    policy: str
    reason: str
    lam: float = 0.0
    estimated_uplift: float = 0.0
    propensity: float = 1.0
    depth: int | None = None
    """Candidates the full model re-ranks (the cheap order's top ``depth``; 0: the cheap path);
    None: the path's default (all candidates on the full path)."""


@dataclass
class Timings:
    retrieve_ms: float = 0.0
    route_ms: float = 0.0
    score_ms: float = 0.0
    queue_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Recommendation:
    request_id: str
    item_ids: np.ndarray
    scores: np.ndarray
    """The scoring path's click probability per returned item."""
    expected_values: np.ndarray
    """The ranking key per item, best first: ``scores x item value`` (``serving.ranking``)."""
    path: Path_
    model_version: str
    decision: Decision
    segment: str
    num_candidates: int
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class SlateReply:
    """What a load generator reads of a Recommend answer (decoded without a full Recommendation)."""

    request_id: str
    path: Path_
    item_ids: np.ndarray
    """int64 item ids, best first."""
    reason: str
    """Why this path (the routing decision's reason)."""


@dataclass(frozen=True)
class ScoreResult:
    request_id: str
    scores: np.ndarray
    path: Path_
    model_version: str
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class Outcome:
    request_id: str
    item_id: int
    event: str
    """One of ``EVENTS``."""
    revenue: float = 0.0

    @property
    def key(self) -> tuple[str, int, str]:
        """Identity for idempotence: the same outcome reported twice counts once."""
        return (self.request_id, self.item_id, self.event)


@dataclass(frozen=True)
class OutcomeReport:
    accepted: int
    duplicates: int
    unknown_requests: int = 0
