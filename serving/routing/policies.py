"""Routing policies beyond a fixed path: a static per-surface table, and the factory of all of
them. ``make_router(config, clock)`` builds the policy a ``serving.routing.config.RouterConfig``
names; value-aware routing over cascade depths is ``serving.routing.depth``, the binary one
(full or cheap) ``serving.routing.value_aware``."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlrm.schema import FeatureSchema
from embeddings.clock import Clock
from serving.domain import Decision
from serving.routing.config import RouterConfig, StaticTiersConfig
from serving.routing.depth import DepthRouter
from serving.routing.router import FixedRouter, RouteContext, Router
from serving.routing.value_aware import ValueAwareRouter


def make_router(
    config: RouterConfig,
    clock: Clock | None = None,
    *,
    schema: FeatureSchema | None = None,
    item_values: np.ndarray | None = None,
) -> Router:
    """Build ``config.policy``; ``value_aware`` needs the feature ``schema`` (and item values, e.g.
    prices; without them every item is worth 1 and the value model ranks by clicks)."""
    if config.policy == "always_full":
        return FixedRouter("full")
    if config.policy == "always_cheap":
        return FixedRouter("cheap")
    if config.policy == "static_tiers":
        return StaticTiersRouter(config.static_tiers)
    if schema is None:
        raise ValueError(f"{config.policy} routing needs the feature schema")
    if config.policy == "value_aware_binary":
        return ValueAwareRouter(config.value_aware, schema, item_values, clock, config.seed)
    return DepthRouter(config.depth, schema, item_values, clock, config.seed)


class StaticTiersRouter(Router):
    """A fixed per-surface table: the surfaces listed get the full path."""

    name = "static_tiers"

    def __init__(self, config: StaticTiersConfig) -> None:
        self.config = config
        self._full = frozenset(config.full_surfaces)

    def decide(self, ctx: RouteContext) -> Decision:
        left = ctx.deadline_left_s
        if left is not None and left * 1000.0 < self.config.min_full_deadline_ms:
            return Decision("cheap", self.name, "deadline nearly spent")
        if ctx.surface in self._full:
            return Decision("full", self.name, f"surface {ctx.surface} is in the full tier")
        return Decision("cheap", self.name, f"surface {ctx.surface} is in the cheap tier")

    def stats(self) -> dict[str, Any]:
        return {"policy": self.name, "full_surfaces": sorted(self._full)}
