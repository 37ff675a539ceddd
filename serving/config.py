"""One configuration tree for a replica: ``ServeConfig`` nests the pipeline's, the scoring paths',
the router's, the revenue tracker's and the item store's configs. ``valuerank serve``'s flags
come from it (``dlrm.configs.add_flags``; the tracker and the item store from their config
files), and ``serving.assembly.build_pipeline`` builds a pipeline from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embeddings.precision import MLP_DTYPES
from embeddings.quant import PRECISIONS
from embeddings.store import StoreConfig
from serving.edge.convert import MAX_OUTCOMES
from serving.pipeline import PipelineConfig
from serving.ranking import RANK_BY, RankBy
from serving.revenue.config import MemoryTrackerConfig, TrackerConfig
from serving.routing.config import RouterConfig


@dataclass(frozen=True)
class ScoringConfig:
    """How the scoring paths run and order slates; offline replay takes the same settings."""

    model_threads: int = 1
    """torch intra-op threads of the full model."""
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    """Embedding tables of the full model: auto = the choice ``valuerank bench precision`` wrote to
    the model folder's precision.json (the cheapest measured to lose < 0.001 AUC); fp32 without it."""
    mlp_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The full model's per-candidate MLP: auto = bf16 where the CPU multiplies bf16 natively
    (AVX-512 BF16, AMX) and ``valuerank bench precision`` measured it within 0.001 AUC, else fp32."""
    rank_by: RankBy = "value"
    """Order of the returned items: value = expected value, P(click) x the item's price (the
    revenue-maximising slate; P(click) alone when the catalog has no prices); click = P(click)."""
    retrieval_value_weight: float = 1.0
    """Candidates are the top by ``<user, item> + w x log price`` (index with a log-price
    coordinate): 1 = by the two-tower's expected value, 0 = by click affinity alone."""

    def __post_init__(self) -> None:
        if self.model_threads < 1:
            raise ValueError(f"{self.model_threads=} must be >= 1")
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"{self.precision=} must be auto or one of {PRECISIONS}")
        if self.mlp_precision not in ("auto", *MLP_DTYPES):
            raise ValueError(f"{self.mlp_precision=} must be auto or one of {tuple(MLP_DTYPES)}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"{self.rank_by=} must be one of {RANK_BY}")
        if not 0.0 <= self.retrieval_value_weight <= 10.0:
            raise ValueError(f"{self.retrieval_value_weight=} must be in [0, 10]")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Interface to listen on (``0.0.0.0`` for all)."""
    port: int = 50051
    """TCP port; 0 picks a free one (``RunningServer.port`` tells which)."""
    grace_s: float = 5.0
    """On stop, how long in-flight calls may take to finish before they are cancelled."""
    reuse_port: bool = False
    """Let several processes share the port (``grpc.so_reuseport``); off, a busy port is an error."""
    workers: int = 1
    """Server processes on the port (``serving.edge.workers``): one uses one core at most; N > 1
    share one revenue tracker (the configured Redis, or a private ``redis-server`` it starts)."""
    max_outcomes: int = MAX_OUTCOMES
    """Most outcomes accepted in one ReportOutcomes call."""
    metrics_port: int | None = None
    """HTTP port of the Prometheus metrics (``/metrics``; 0 picks a free one); None: no metrics port."""
    metrics_host: str = "127.0.0.1"
    """Interface of the metrics port: localhost unless told otherwise."""
    tls_cert: str | None = None
    """PEM certificate chain of the gRPC port; with ``tls_key`` the port speaks TLS only."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: str | None = None
    """PEM CA certificates: clients must present a certificate one of them signed (mutual TLS)."""
    admin_token: str | None = None
    """Bearer token the Admin service (ReloadModel) requires; None: admin calls are refused. Give
    it as ``VALUERANK_ADMIN_TOKEN`` or in the config file (a flag shows in the process list);
    ``--print-config`` masks it."""
    model_watch_dir: str | None = None
    """Folder of model artifact folders: the newest complete one (by its manifest's time) is
    loaded and swapped in when it is not the one serving, checked every ``model_watch_s``; a
    broken one is logged and skipped until it changes. None: no watching."""
    model_watch_s: float = 5.0
    """Seconds between looks at ``model_watch_dir``."""
    decision_log: str | None = None
    """Append every routing decision and outcome to this JSONL file (``serving.decision_log``) for
    off-policy evaluation with ``valuerank replay --log``; None: no log."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Candidates and micro-batching."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """The scoring paths: precision, threads, slate order, retrieval score."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Which policy routes requests, and its settings."""
    tracker: TrackerConfig = field(default_factory=MemoryTrackerConfig)
    """Revenue tracker (``serve --tracker-config FILE``, e.g. ``{"type": "redis", "url": ...}``);
    default: in-process, in memory only."""
    item_store: StoreConfig | None = None
    """Item-side embedding store (``serve --item-store-config FILE``, e.g. ``{"type": "redis",
    "port": 6379, "cache_rows": 50000}``; rows pushed by ``valuerank embeddings push``); None:
    item tables in process. Request-side tables stay in process either way."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{self.port=} must be in 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"{self.metrics_port=} must be in 0..65535")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"{self.workers=} must be in 1..64")
        if self.grace_s < 0:
            raise ValueError(f"{self.grace_s=} must be >= 0")
        if self.max_outcomes < 1:
            raise ValueError(f"{self.max_outcomes=} must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"{self.tls_cert=} and {self.tls_key=} go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(f"{self.tls_client_ca=} needs tls_cert and tls_key (mutual TLS is TLS first)")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters")
        if self.model_watch_s <= 0:
            raise ValueError(f"{self.model_watch_s=} must be > 0")
