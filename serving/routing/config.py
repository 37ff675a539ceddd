"""The router's configuration: which policy, its seed, and each policy's settings (the value-aware
router's budget, exploration, latency target and cheap-share cap among them). ``ServeConfig``
nests it, and offline replay builds its routers from the same type."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from serving.routing.controller import ControllerConfig
from serving.routing.uplift import FeaturizerConfig

POLICY_NAMES = ("always_full", "always_cheap", "static_tiers", "value_aware", "value_aware_binary")
DEFAULT_DEPTHS = (0, 10, 20, 30, 50, 100, 200, 500)


@dataclass(frozen=True)
class StaticTiersConfig:
    full_surfaces: tuple[str, ...] = ("ecommerce_recommendation", "local_services_dispatch", "video_effects")
    """Surfaces whose requests get the full path; all others get the cheap one."""
    min_full_deadline_ms: float = 5.0
    """A request with less time than this left goes cheap."""

    def __post_init__(self) -> None:
        if self.min_full_deadline_ms < 0:
            raise ValueError(f"{self.min_full_deadline_ms=} must be >= 0")
        if len(set(self.full_surfaces)) != len(self.full_surfaces):
            raise ValueError(f"{self.full_surfaces=} has duplicates")


@dataclass(frozen=True)
class ValueAwareConfig:
    epsilon: float = 0.05
    """Exploration share: requests whose path a fair coin picks (propensities are logged)."""
    max_cheap_share: float = 0.9
    """Guardrail: most of a segment's recent requests that may take the cheap path."""
    guardrail_half_life: float = 200.0
    """Decisions of a segment over which its cheap share is measured (half-life)."""
    min_full_deadline_ms: float = 5.0
    """A request with less time than this left goes cheap (raised to the full path's recent p90)."""
    pressure_ms: float = 10.0
    """Load pressure: lambda is multiplied by ``1 + wait / pressure_ms`` for the full path's
    predicted wait, so as a queue builds the lowest-uplift requests move to cheap first."""
    l2: float = 30.0
    """Ridge penalty of the value model (in weighted labels: a cell needs ~l2 labels to count)."""
    label_half_life: float = 20_000.0
    """Labels over which the value model forgets (half-life)."""
    refit_every: int = 200
    """Labels between refits of the value model (fewer while it is young)."""
    cold_start_labels: int = 100
    """Until the value model has this many labels, a coin weighted by the budget's full share
    picks the path (propensities logged)."""
    scale_prior: float = 20.0
    """Pseudo-requests that pull a surface's dollars per model unit toward the global figure."""
    cost_half_life: float = 500.0
    """Requests over which each path's measured cost is averaged (half-life)."""
    stats_half_life_s: float = 3600.0
    """Clock seconds over which per-segment revenue statistics decay (half-life)."""
    feed_forward: bool = True
    """Give the controller the full share that spends the budget share at the measured costs
    (else it starts from everyone-full and finds the share by feedback alone)."""
    value_window: int = 1000
    """Recent value estimates whose quantile turns the controller's share into lambda."""
    importance_weighting: bool = True
    """Weight value-model labels by 1 / P(full path), so the model fits all traffic, not only
    the requests the router already sent to the full path."""
    outcome_memory: int = 100_000
    """Recent requests (and outcome keys) remembered to attribute reported outcomes."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """The lambda controller's budget, latency target and gains."""
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    """Which routing-time features the value model reads."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"{self.epsilon=} must be in [0, 1]")
        if not 0.0 < self.max_cheap_share <= 1.0:
            raise ValueError(f"{self.max_cheap_share=} must be in (0, 1]")
        for name in (
            "guardrail_half_life",
            "label_half_life",
            "cost_half_life",
            "stats_half_life_s",
            "l2",
            "pressure_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.min_full_deadline_ms < 0:
            raise ValueError(f"{self.min_full_deadline_ms=} must be >= 0")
        if self.refit_every < 1:
            raise ValueError(f"{self.refit_every=} must be >= 1")
        if self.cold_start_labels < 0:
            raise ValueError(f"{self.cold_start_labels=} must be >= 0")
        if self.scale_prior < 0:
            raise ValueError(f"{self.scale_prior=} must be >= 0")
        if self.outcome_memory < 1:
            raise ValueError(f"{self.outcome_memory=} must be >= 1")
        if self.value_window < 10:
            raise ValueError(f"{self.value_window=} must be >= 10")


@dataclass(frozen=True)
class DepthConfig:
    """The value-aware router over cascade depths (``serving.routing.depth``)."""

    depths: tuple[int, ...] = DEFAULT_DEPTHS
    """The depths M it chooses from (0 = cheap path; each clipped to the request's K, so the
    largest is the full path); ascending, starting at 0."""
    epsilon: float = 0.02
    """Exploration share: requests whose depth is drawn uniformly from the grid (propensities
    logged); every request at depth M also labels all shallower depths, so few are needed."""
    min_full_deadline_ms: float = 5.0
    """A request with less time than this left goes cheap."""
    pressure_ms: float = 10.0
    """Load pressure: lambda x ``1 + wait / pressure_ms`` for the full path's predicted wait."""
    l2: float = 30.0
    """Ridge penalty of each depth's gain model."""
    label_half_life: float = 20_000.0
    """Labels over which the gain models forget (half-life)."""
    refit_every: int = 200
    """Labels between refits of the gain models (fewer while they are young)."""
    cold_start_labels: int = 100
    """Until the models have this many full-depth labels, a coin weighted by the budget picks
    full depth or cheap (propensities logged)."""
    scale_prior: float = 20.0
    """Pseudo-requests that pull a surface's dollars per model unit toward the global figure."""
    cost_half_life: float = 500.0
    """Requests over which each depth's measured cost is averaged (half-life)."""
    stats_half_life_s: float = 3600.0
    """Clock seconds over which per-segment statistics (depth mix, revenue) decay (half-life)."""
    value_window: int = 1000
    """Recent requests' predicted gain curves over which lambda is priced."""
    outcome_memory: int = 100_000
    """Recent requests (and outcome keys) remembered to attribute reported outcomes."""
    share_learning: bool = True
    """With a Redis tracker, the gain models learn from every replica: each exchanges its
    statistics through that Redis every few seconds (``serving.routing.shared``)."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """The controller's budget (compute share of always-full), latency target and gains."""
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    """Which routing-time features the gain models read."""

    def __post_init__(self) -> None:
        d = self.depths
        if len(d) < 2 or d[0] != 0 or any(b <= a for a, b in itertools.pairwise(d)):
            raise ValueError(f"{self.depths=} must be ascending, start at 0 and have >= 2 entries")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"{self.epsilon=} must be in [0, 1]")
        for name in ("label_half_life", "cost_half_life", "stats_half_life_s", "l2", "pressure_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.min_full_deadline_ms < 0:
            raise ValueError(f"{self.min_full_deadline_ms=} must be >= 0")
        if self.refit_every < 1 or self.cold_start_labels < 0 or self.outcome_memory < 1:
            raise ValueError(
                f"{self.refit_every=} >= 1, {self.cold_start_labels=} >= 0, {self.outcome_memory=} >= 1"
            )
        if self.scale_prior < 0:
            raise ValueError(f"{self.scale_prior=} must be >= 0")
        if self.value_window < 10:
            raise ValueError(f"{self.value_window=} must be >= 10")


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "always_full"
    """Routing policy: always_full, always_cheap, static_tiers, value_aware (over cascade depths)
    or value_aware_binary (full or cheap per request)."""
    seed: int = 0
    """Seed of the router's exploration draws."""
    depth: DepthConfig = field(default_factory=DepthConfig)
    """The value-aware router's settings (budget and latency target in its controller)."""
    value_aware: ValueAwareConfig = field(default_factory=ValueAwareConfig)
    """The binary value-aware router's settings (value_aware_binary)."""
    static_tiers: StaticTiersConfig = field(default_factory=StaticTiersConfig)
    """The static per-surface table."""

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"{self.policy=} must be one of {POLICY_NAMES}")
