"""The synthetic world: surfaces, users, items and a hidden ground-truth click model.

It reproduces the seed study's mix (ARCHITECTURE.md section 6) so that the trade-off the router
exploits is real: a surface's revenue per inference and how much a contextual DLRM beats a
user-level dot product differ from surface to surface.

Ground truth, for user u (segment g, tier t), context (surface s, hour h, device d), item i
(category c, price bucket b)::

    logit = base + surface_base[s] + pop[i] + price_affinity[t] * log_price[i]
          + beta_s * (UV_WEIGHT * <U_u, V_i> + seg_cat[g, c] + hour_cat[h, c])
          + surface_cat[s, c] + device_price[d, b]

``U_u`` is the segment's centroid plus individual noise, ``V_i`` the category's centroid plus
noise. A user-level retrieval model can learn the user x item terms but not the context x item
ones (surface, hour, device) nor the surface's ``beta_s`` scaling: that is the full model's uplift.
The individual noise is kept small (config ``individual_noise``): a user's or an item's own
deviation is only learnable from its own few rows (Zipf activity), so a large one would measure
the log's size more than the model, and drown the contextual crosses the router trades on.

Revenue: a shown item at position p is clicked with ``bias(p) * P(click)``, a click converts
with the surface's conversion rate, a conversion earns ``price * take_rate[s]``. Take rates are
calibrated so that an ideal ranking (the top k by true expected revenue, ``P(click) x price``)
earns the surface's ``revenue_per_inference``.
Everything is deterministic from the config's seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.data import Rows
from dlrm.schema import FeatureSchema, load_schema

SPARSE_COLUMNS = (
    "user_id",
    "user_segment",
    "user_tier",
    "surface",
    "hour",
    "device",
    "item_id",
    "item_category",
    "item_price_bucket",
)
DENSE_COLUMNS = ("user_log_activity", "hour_sin", "hour_cos", "session_depth")

UV_WEIGHT = 3.0
"""Weight of the latent user x item affinity: the largest term, and the one retrieval learns."""
CALIBRATION_HEAVY_USERS = 150
"""Most active users scored exactly when take rates are calibrated (about 2/3 of traffic)."""
CALIBRATION_TAIL_REQUESTS = 250
"""Sampled requests standing for all other users in the calibration."""


@dataclass(frozen=True)
class SurfaceSpec:
    name: str
    """Surface (use case) name, as callers send it."""
    share: float
    """Share of all inferences."""
    revenue_per_inference: float
    """Dollars an ideal ranking earns per request; calibrates the take rate."""
    cross_strength: float = 1.0
    """``beta_s``: weight of the user/context x item crosses; drives the full model's uplift."""
    conversion_rate: float = 0.2
    """P(conversion | click)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"{self.share=} of surface {self.name} must be in [0, 1]")
        if self.revenue_per_inference < 0:
            raise ValueError(f"{self.revenue_per_inference=} of {self.name} must be >= 0")
        if not 0.0 < self.conversion_rate <= 1.0:
            raise ValueError(f"{self.conversion_rate=} of {self.name} must be in (0, 1]")


@dataclass(frozen=True)
class TierSpec:
    share: float
    """Share of users in this value tier."""
    price_affinity: float
    """Logit change per unit of standardised log price: high tiers click pricier items."""


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    """Seed of every random draw in the world."""
    schema: str = "world"
    """Feature schema (bundled name or path); table sizes come from it."""
    surfaces: tuple[SurfaceSpec, ...] = field(default=())
    """Surfaces with their traffic shares and revenue."""
    user_tiers: tuple[TierSpec, ...] = field(default=())
    """User value tiers; their count must equal the schema's ``user_tier`` cardinality."""
    latent_dim: int = 8
    """Dimension of the hidden user and item factors."""
    user_activity_zipf: float = 1.1
    """Zipf exponent of how often users come back."""
    item_popularity_zipf: float = 1.05
    """Zipf exponent of item popularity."""
    base_logit: float = -3.2
    """Global click logit offset (sets the average CTR)."""
    individual_noise: float = 0.1
    """Spread of a user's / item's factors around its segment's / category's centroid."""
    slate_size: int = 10
    """Items shown per request when revenue is computed."""
    train_rows: int = 400_000
    """Rows in the training log."""
    test_rows: int = 100_000
    """Rows in the held-out log."""
    replay_requests: int = 20_000
    """Requests in the replay log."""

    def __post_init__(self) -> None:
        if not self.surfaces:
            raise ValueError("world needs at least one surface")
        total = sum(s.share for s in self.surfaces)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"surface shares sum to {total}, must sum to 1")
        if not self.user_tiers:
            raise ValueError("world needs at least one user tier")
        tier_total = sum(t.share for t in self.user_tiers)
        if abs(tier_total - 1.0) > 1e-6:
            raise ValueError(f"user tier shares sum to {tier_total}, must sum to 1")
        for name in ("latent_dim", "slate_size", "train_rows", "test_rows", "replay_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.user_activity_zipf <= 0 or self.item_popularity_zipf <= 0:
            raise ValueError("zipf exponents must be > 0")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorldConfig:
        raw = dict(raw)
        try:
            raw["surfaces"] = tuple(SurfaceSpec(**s) for s in raw.get("surfaces", ()))
            raw["user_tiers"] = tuple(TierSpec(**t) for t in raw.get("user_tiers", ()))
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"bad world config: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path | None = None) -> WorldConfig:
        """Load a world config file; ``None`` loads the bundled default world."""
        if path is None:
            text = resources.files("dlrm.worlds").joinpath("default.json").read_text()
        else:
            text = Path(path).read_text()
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """Content hash: artifacts built from an equal config are reused."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **changes: Any) -> WorldConfig:
        return WorldConfig.from_dict({**self.to_dict(), **changes})


@dataclass
class Requests:
    """A batch of ``n`` requests (one user and one context each)."""

    user: np.ndarray
    surface: np.ndarray
    hour: np.ndarray
    device: np.ndarray
    session_depth: np.ndarray
    ts: np.ndarray
    """Seconds since the start of the log."""

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray | slice) -> Requests:
        return Requests(**{k: v[idx] for k, v in vars(self).items()})

    def save(self, path: Path) -> None:
        np.savez(path, **vars(self))

    @classmethod
    def load(cls, path: Path) -> Requests:
        with np.load(path) as z:
            return cls(**{k: z[k] for k in z.files})


def position_bias(slate_size: int) -> np.ndarray:
    """P(examine | position): the usual ``1 / log2(p + 2)`` for positions 0..n-1."""
    return (1.0 / np.log2(np.arange(slate_size) + 2.0)).astype(np.float64)


class World:
    """The hidden truth behind the synthetic traffic (see the module docstring)."""

    def __init__(self, config: WorldConfig, schema: FeatureSchema | None = None) -> None:
        self.config = config
        self.schema = schema or load_schema(config.schema)
        missing = [c for c in SPARSE_COLUMNS if c not in self.schema.sparse_names]
        if missing or self.schema.dense_names != list(DENSE_COLUMNS):
            raise ValueError(
                f"schema {self.schema.name} does not fit the world: missing sparse {missing}, "
                f"dense must be {list(DENSE_COLUMNS)}"
            )
        card = {f.name: f.cardinality for f in self.schema.sparse}
        if card["surface"] != len(config.surfaces):
            raise ValueError(
                f"schema surface cardinality {card['surface']} != {len(config.surfaces)} surfaces"
            )
        if card["user_tier"] != len(config.user_tiers):
            raise ValueError(
                f"schema user_tier cardinality {card['user_tier']} != {len(config.user_tiers)} tiers"
            )
        self.n_users = card["user_id"]
        self.n_items = card["item_id"]
        self.n_segments = card["user_segment"]
        self.n_categories = card["item_category"]
        self.n_price_buckets = card["item_price_bucket"]
        self.n_hours = card["hour"]
        self.n_devices = card["device"]
        self.surface_names = [s.name for s in config.surfaces]
        self._build(np.random.default_rng(config.seed))
        self.take_rate = self._calibrate_take_rates(np.random.default_rng(config.seed + 1))

    # -- construction -------------------------------------------------------------------------

    def _build(self, rng: np.random.Generator) -> None:
        cfg = self.config
        dim = cfg.latent_dim
        scale = 1.0 / np.sqrt(dim)

        # Users: segment centroid + individual noise; Zipf activity over a random order.
        self.user_segment = rng.integers(0, self.n_segments, self.n_users)
        tier_p = np.array([t.share for t in cfg.user_tiers])
        self.user_tier = rng.choice(len(tier_p), size=self.n_users, p=tier_p)
        seg_centroid = rng.normal(0.0, scale, (self.n_segments, dim))
        self.user_latent = seg_centroid[self.user_segment] + rng.normal(
            0.0, scale * cfg.individual_noise, (self.n_users, dim)
        )
        activity = 1.0 / np.arange(1, self.n_users + 1) ** cfg.user_activity_zipf
        self.user_activity = rng.permutation(activity / activity.sum())
        self.user_log_activity = np.log(self.user_activity * self.n_users).astype(np.float32)

        # Items: category centroid + noise; lognormal prices by category; Zipf popularity.
        self.item_category = rng.integers(0, self.n_categories, self.n_items)
        cat_centroid = rng.normal(0.0, scale, (self.n_categories, dim))
        self.item_latent = cat_centroid[self.item_category] + rng.normal(
            0.0, scale * cfg.individual_noise, (self.n_items, dim)
        )
        cat_log_price = rng.normal(3.0, 0.8, self.n_categories)
        log_price = cat_log_price[self.item_category] + rng.normal(0.0, 0.5, self.n_items)
        self.item_price = np.exp(log_price)
        edges = np.quantile(log_price, np.linspace(0, 1, self.n_price_buckets + 1)[1:-1])
        self.item_price_bucket = np.searchsorted(edges, log_price)
        self.item_log_price_std = (log_price - log_price.mean()) / log_price.std()
        popularity = 1.0 / np.arange(1, self.n_items + 1) ** cfg.item_popularity_zipf
        self.item_popularity = rng.permutation(popularity / popularity.sum())
        pop_logit = np.log(self.item_popularity * self.n_items)
        self.item_pop_logit = 0.3 * (pop_logit - pop_logit.mean())

        # Crosses (the hidden "feature interactions").
        n_surf = len(cfg.surfaces)
        self.surface_base = rng.normal(0.0, 0.3, n_surf)
        self.beta = np.array([s.cross_strength for s in cfg.surfaces])
        self.seg_cat = rng.normal(0.0, 0.6, (self.n_segments, self.n_categories))
        self.hour_cat = rng.normal(0.0, 0.6, (self.n_hours, self.n_categories))
        self.surface_cat = rng.normal(0.0, 0.7, (n_surf, self.n_categories))
        self.device_price = rng.normal(0.0, 0.4, (self.n_devices, self.n_price_buckets))
        self.tier_price = np.array([t.price_affinity for t in cfg.user_tiers])
        self.surface_share = np.array([s.share for s in cfg.surfaces])
        self.conversion_rate = np.array([s.conversion_rate for s in cfg.surfaces])
        # Diurnal traffic: more requests in the evening.
        hours = np.arange(self.n_hours)
        self.hour_weight = 1.0 + 0.6 * np.sin(2 * np.pi * (hours - 14) / self.n_hours)
        self.hour_weight /= self.hour_weight.sum()

    def _calibrate_take_rates(self, rng: np.random.Generator) -> np.ndarray:
        """Take rate per surface so that the ideal slate earns the target revenue."""
        take = np.zeros(len(self.config.surfaces))
        for s, spec in enumerate(self.config.surfaces):
            if spec.revenue_per_inference == 0.0:
                continue
            gross = self.ideal_revenue_per_inference(s, rng, take_rate=np.ones(len(take)))
            take[s] = spec.revenue_per_inference / gross
        return take

    def ideal_revenue_per_inference(
        self,
        surface: int,
        rng: np.random.Generator,
        take_rate: np.ndarray | None = None,
        heavy_users: int = CALIBRATION_HEAVY_USERS,
        tail_requests: int = CALIBRATION_TAIL_REQUESTS,
    ) -> float:
        """Expected dollars per request of ``surface`` under the ideal slate, over the traffic mix.

        Stratified by user: with Zipf activity a few users make most requests, so a plain sample
        of a few hundred requests misses the mean by 10-20%. The ``heavy_users`` most active users
        are each scored (twice, in random contexts) with their exact traffic weight; a sample of
        ``tail_requests`` stands for all the others.
        """
        heavy = np.argsort(-self.user_activity, kind="stable")[:heavy_users]
        tail_p = self.user_activity.copy()
        tail_p[heavy] = 0.0
        tail_mass = float(tail_p.sum())
        users = np.repeat(heavy, 2)
        weight = np.repeat(self.user_activity[heavy] / 2.0, 2)
        if tail_mass > 0 and tail_requests > 0:
            users = np.concatenate(
                [users, rng.choice(self.n_users, size=tail_requests, p=tail_p / tail_mass)]
            )
            weight = np.concatenate([weight, np.full(tail_requests, tail_mass / tail_requests)])
        req = self.sample_requests(len(users), rng, surface=surface)
        req.user = users
        gross = np.concatenate(
            [
                self.expected_revenue(part, self.ideal_slates(part), take_rate)
                for part in (req.take(slice(i, i + 128)) for i in range(0, len(req), 128))
            ]
        )
        return float(weight @ gross / weight.sum())

    def ideal_slates(self, req: Requests, k: int | None = None) -> np.ndarray:
        """``n x k`` item ids a perfect ranker shows: the top ``k`` by true expected revenue,
        ``P(click) x price`` (the surface's rates are common to a request), best first."""
        k = min(k or self.config.slate_size, self.n_items)
        catalog = np.broadcast_to(np.arange(self.n_items), (len(req), self.n_items))
        p = self.click_prob(req, catalog) * self.item_price[None, :]
        top = np.argpartition(-p, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(p, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)

    # -- the ground truth ---------------------------------------------------------------------

    def click_logit(self, req: Requests, items: np.ndarray) -> np.ndarray:
        """True click logit; ``items`` is ``n`` or ``n x K`` item ids for ``n`` requests."""
        squeeze = items.ndim == 1
        it = items[:, None] if squeeze else items
        u = req.user[:, None]
        s = req.surface[:, None]
        cat = self.item_category[it]
        beta = self.beta[s]
        uv = UV_WEIGHT * np.einsum("nd,nkd->nk", self.user_latent[req.user], self.item_latent[it])
        logit = (
            self.config.base_logit
            + self.surface_base[s]
            + self.item_pop_logit[it]
            + self.tier_price[self.user_tier[u]] * self.item_log_price_std[it]
            + beta * (uv + self.seg_cat[self.user_segment[u], cat] + self.hour_cat[req.hour[:, None], cat])
            + self.surface_cat[s, cat]
            + self.device_price[req.device[:, None], self.item_price_bucket[it]]
        )
        return logit[:, 0] if squeeze else logit

    def click_prob(self, req: Requests, items: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.click_logit(req, items)))

    def item_value(
        self, surface: np.ndarray, items: np.ndarray, take_rate: np.ndarray | None = None
    ) -> np.ndarray:
        """Dollars a click on ``items`` earns in expectation (conversion x price x take rate)."""
        take = self.take_rate if take_rate is None else take_rate
        s = surface[:, None] if items.ndim == 2 else surface
        return self.conversion_rate[s] * take[s] * self.item_price[items]

    def expected_revenue(
        self, req: Requests, slates: np.ndarray, take_rate: np.ndarray | None = None
    ) -> np.ndarray:
        """Expected dollars of showing ``slates`` (``n x k`` item ids, best first)."""
        p = self.click_prob(req, slates)
        bias = position_bias(slates.shape[1])[None, :]
        value = self.item_value(req.surface, slates, take_rate)
        return (bias * p * value).sum(axis=1)

    # -- traffic ------------------------------------------------------------------------------

    def sample_requests(
        self, n: int, rng: np.random.Generator, surface: int | None = None, duration_s: float = 86_400.0
    ) -> Requests:
        """``n`` requests over ``duration_s`` seconds with diurnal arrival rates."""
        hour = rng.choice(self.n_hours, size=n, p=self.hour_weight)
        ts = np.sort((hour + rng.random(n)) * (duration_s / self.n_hours))
        hour = (ts / (duration_s / self.n_hours)).astype(np.int64) % self.n_hours
        surf = (
            np.full(n, surface, dtype=np.int64)
            if surface is not None
            else rng.choice(len(self.surface_share), size=n, p=self.surface_share)
        )
        return Requests(
            user=rng.choice(self.n_users, size=n, p=self.user_activity),
            surface=surf,
            hour=hour,
            device=rng.integers(0, self.n_devices, n),
            session_depth=rng.geometric(0.3, n).astype(np.int64),
            ts=ts,
        )

    def dense_features(self, req: Requests) -> np.ndarray:
        angle = 2 * np.pi * req.hour / self.n_hours
        return np.stack(
            [
                self.user_log_activity[req.user],
                np.sin(angle),
                np.cos(angle),
                np.log1p(req.session_depth.astype(np.float64)),
            ],
            axis=1,
        ).astype(np.float32)

    def request_sparse(self, req: Requests) -> dict[str, np.ndarray]:
        """Request-side sparse ids by feature name."""
        return {
            "user_id": req.user,
            "user_segment": self.user_segment[req.user],
            "user_tier": self.user_tier[req.user],
            "surface": req.surface,
            "hour": req.hour,
            "device": req.device,
        }

    def item_sparse(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """Item-side sparse ids by feature name."""
        return {
            "item_id": items,
            "item_category": self.item_category[items],
            "item_price_bucket": self.item_price_bucket[items],
        }

    def rows(self, req: Requests, items: np.ndarray, labels: np.ndarray) -> Rows:
        cols = {**self.request_sparse(req), **self.item_sparse(items)}
        sparse = np.stack([cols[name] for name in self.schema.sparse_names], axis=1).astype(np.int64)
        return Rows(self.dense_features(req), sparse, labels.astype(np.float32))

    def impression_log(self, n: int, rng: np.random.Generator) -> tuple[Rows, np.ndarray]:
        """``n`` logged impressions with sampled clicks; also returns the true P(click).

        Half of the shown items follow popularity, half the user's preferred categories, as a
        production ranker's would.
        """
        req = self.sample_requests(n, rng)
        by_pop = rng.choice(self.n_items, size=n, p=self.item_popularity)
        affinity = self.seg_cat[self.user_segment[req.user]]
        cat_p = np.exp(2.0 * affinity)
        cat_p /= cat_p.sum(axis=1, keepdims=True)
        u = rng.random((n, 1))
        cats = (cat_p.cumsum(axis=1) < u).sum(axis=1)
        by_cat = self._popular_item_in(cats, rng)
        items = np.where(rng.random(n) < 0.5, by_pop, by_cat)
        p = self.click_prob(req, items)
        labels = (rng.random(n) < p).astype(np.float32)
        return self.rows(req, items, labels), p

    def _popular_item_in(self, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        order = np.argsort(self.item_category, kind="stable")
        sorted_cats = self.item_category[order]
        starts = np.searchsorted(sorted_cats, np.arange(self.n_categories))
        ends = np.searchsorted(sorted_cats, np.arange(self.n_categories), side="right")
        out = np.empty(len(cats), dtype=np.int64)
        for c in np.unique(cats):
            members = order[starts[c] : ends[c]]
            if len(members) == 0:
                members = np.arange(self.n_items)
            w = self.item_popularity[members]
            sel = cats == c
            out[sel] = rng.choice(members, size=int(sel.sum()), p=w / w.sum())
        return out

    def sample_outcomes(
        self, req: Requests, slates: np.ndarray, rng: np.random.Generator
    ) -> list[list[tuple[int, str, float]]]:
        """Draw (item, event, revenue) outcomes for shown slates from the ground truth."""
        p = self.click_prob(req, slates) * position_bias(slates.shape[1])[None, :]
        value = self.take_rate[req.surface][:, None] * self.item_price[slates]
        clicks = rng.random(p.shape) < p
        converts = clicks & (rng.random(p.shape) < self.conversion_rate[req.surface][:, None])
        out: list[list[tuple[int, str, float]]] = []
        for r in range(slates.shape[0]):
            events: list[tuple[int, str, float]] = []
            for k, item in enumerate(slates[r]):
                events.append((int(item), "impression", 0.0))
                if clicks[r, k]:
                    events.append((int(item), "click", 0.0))
                if converts[r, k]:
                    events.append((int(item), "conversion", float(value[r, k])))
            out.append(events)
        return out
