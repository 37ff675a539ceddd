"""The synthetic world: deterministic from its seed, traffic mix and revenue as configured."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dlrm.world import Requests, SurfaceSpec, World, WorldConfig, position_bias

CONFIG = WorldConfig.load()


@pytest.fixture(scope="module")
def world() -> World:
    return World(CONFIG)


def test_same_seed_gives_identical_logs_and_different_seed_differs(world: World) -> None:
    again = World(CONFIG)
    np.testing.assert_array_equal(again.take_rate, world.take_rate)
    a, pa = world.impression_log(3000, np.random.default_rng(7))
    b, pb = again.impression_log(3000, np.random.default_rng(7))
    for x, y in ((a.sparse, b.sparse), (a.dense, b.dense), (a.labels, b.labels), (pa, pb)):
        np.testing.assert_array_equal(x, y)
    other = World(CONFIG.replace(seed=CONFIG.seed + 1))
    _, pc = other.impression_log(3000, np.random.default_rng(7))
    assert not np.array_equal(pa, pc)
    assert not np.array_equal(world.user_latent, other.user_latent)


def test_surface_shares_match_the_config(world: World) -> None:
    req = world.sample_requests(40_000, np.random.default_rng(1))
    shares = np.bincount(req.surface, minlength=len(CONFIG.surfaces)) / len(req)
    np.testing.assert_allclose(shares, [s.share for s in CONFIG.surfaces], atol=0.01)
    assert (np.diff(req.ts) >= 0).all() and req.ts.max() < 86_400.0


def test_take_rates_calibrate_revenue_per_inference_with_the_ideal_slate(world: World) -> None:
    rng = np.random.default_rng(12345)  # not the calibration's own draws
    for s, spec in enumerate(CONFIG.surfaces):
        if spec.revenue_per_inference == 0.0:
            assert world.take_rate[s] == 0.0
            continue
        measured = world.ideal_revenue_per_inference(s, rng, heavy_users=100, tail_requests=150)
        assert measured == pytest.approx(spec.revenue_per_inference, rel=0.2), spec.name


def test_ideal_slate_beats_a_random_one(world: World) -> None:
    rng = np.random.default_rng(3)
    req = world.sample_requests(200, rng, surface=0)
    ideal = world.ideal_slates(req)
    assert ideal.shape == (200, CONFIG.slate_size)
    value = world.click_prob(req, ideal) * world.item_price[ideal]
    assert (np.diff(value, axis=1) <= 0).all()  # best first
    # Nothing outside the slate earns more in expectation than its last item.
    others = np.broadcast_to(np.arange(world.n_items), (200, world.n_items))
    all_values = world.click_prob(req, others) * world.item_price[None, :]
    np.testing.assert_allclose(np.sort(all_values, axis=1)[:, -1], value[:, 0])
    assert (np.sort(all_values, axis=1)[:, -CONFIG.slate_size] == value[:, -1]).all()
    random_slates = rng.integers(0, world.n_items, (200, CONFIG.slate_size))
    assert world.expected_revenue(req, ideal).mean() > 2 * world.expected_revenue(req, random_slates).mean()


def test_click_model_shapes_and_range(world: World) -> None:
    req = world.sample_requests(50, np.random.default_rng(4))
    items = np.random.default_rng(5).integers(0, world.n_items, (50, 7))
    p = world.click_prob(req, items)
    assert p.shape == (50, 7) and ((p > 0) & (p < 1)).all()
    # The 1-D form scores one item per request, equal to the matching column of the 2-D form.
    np.testing.assert_allclose(world.click_prob(req, items[:, 3]), p[:, 3])
    assert (np.diff(position_bias(10)) < 0).all() and position_bias(10)[0] == 1.0


def test_the_contextual_crosses_matter(world: World) -> None:
    """Same user and item, another surface or hour: the true P(click) moves (the DLRM's uplift)."""
    req = world.sample_requests(500, np.random.default_rng(6))
    items = np.random.default_rng(8).integers(0, world.n_items, 500)
    base = world.click_logit(req, items)
    moved = Requests(**{**vars(req), "surface": (req.surface + 1) % len(CONFIG.surfaces)})
    later = Requests(**{**vars(req), "hour": (req.hour + 6) % world.n_hours})
    assert np.abs(world.click_logit(moved, items) - base).mean() > 0.2
    assert np.abs(world.click_logit(later, items) - base).mean() > 0.2


def test_outcomes_follow_the_slates(world: World) -> None:
    req = world.sample_requests(300, np.random.default_rng(9))
    slates = world.ideal_slates(req, k=5)
    outcomes = world.sample_outcomes(req, slates, np.random.default_rng(10))
    assert len(outcomes) == 300
    n_clicks = 0
    for r, events in enumerate(outcomes):
        assert [item for item, event, _ in events if event == "impression"] == slates[r].tolist()
        clicked = {item for item, event, _ in events if event == "click"}
        n_clicks += len(clicked)
        for item, event, revenue in events:
            if event == "conversion":
                assert item in clicked and revenue > 0
            else:
                assert revenue == 0.0
    assert n_clicks > 0


def test_features_fit_the_schema(world: World) -> None:
    rows, p = world.impression_log(1000, np.random.default_rng(11))
    cards = np.array([f.cardinality for f in world.schema.sparse])
    assert rows.sparse.shape == (1000, len(cards)) and ((rows.sparse >= 0) & (rows.sparse < cards)).all()
    assert rows.dense.shape == (1000, len(world.schema.dense)) and np.isfinite(rows.dense).all()
    assert abs(rows.labels.mean() - p.mean()) < 0.05


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"surfaces": ()}, "at least one surface"),
        ({"user_tiers": ()}, "at least one user tier"),
        ({"train_rows": 0}, "train_rows"),
        ({"item_popularity_zipf": 0.0}, "zipf"),
    ],
)
def test_config_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **changes)


def test_config_rejects_shares_that_do_not_sum_to_one_and_bad_specs() -> None:
    surfaces = (*CONFIG.surfaces[:-1], replace(CONFIG.surfaces[-1], share=0.5))
    with pytest.raises(ValueError, match="sum to 1"):
        replace(CONFIG, surfaces=surfaces)
    with pytest.raises(ValueError, match="conversion_rate"):
        SurfaceSpec("x", 1.0, 0.1, conversion_rate=0.0)
    with pytest.raises(ValueError, match="bad world config"):
        WorldConfig.from_dict({**CONFIG.to_dict(), "colour": "red"})


def test_config_key_tracks_content() -> None:
    assert WorldConfig.load().key() == CONFIG.key()
    assert CONFIG.replace(train_rows=1000).key() != CONFIG.key()
    assert WorldConfig.from_dict(CONFIG.to_dict()) == CONFIG
