"""What a load run sends: arrival times by profile, the world's requests, and outcomes from its ground truth.

Profiles shape the offered rate ``r(t)`` over a run of ``D`` seconds at base rate ``R`` and
``peak`` factor ``P``::

    steady   R throughout
    step     R, then P x R from D/2 on
    spike    R, with P x R in the middle fifth (0.4 D .. 0.6 D)
    ramp     R rising linearly to P x R at D

Poisson arrivals are drawn by thinning a Poisson process at the highest rate; constant ones
invert the cumulative rate, so both follow ``r(t)`` exactly in expectation.

The requests are the world's (``World.sample_requests``: surfaces in their shares, users by
activity, hour, device, session depth), encoded before the run starts; outcomes are drawn
from the world's click and conversion probabilities for the slate actually shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dlrm.world import Requests, World
from serving.domain import Outcome, Query

PROFILES = ("steady", "step", "spike", "ramp")


def rate_function(
    profile: str, rps: float, duration: float, peak: float
) -> Callable[[np.ndarray], np.ndarray]:
    """``r(t)`` in requests per second for an array of times in ``[0, duration)``."""
    if profile == "steady":
        return lambda t: np.full_like(t, rps, dtype=np.float64)
    if profile == "step":
        return lambda t: np.where(t < duration / 2, rps, peak * rps)
    if profile == "spike":
        return lambda t: np.where((t >= 0.4 * duration) & (t < 0.6 * duration), peak * rps, rps)
    if profile == "ramp":
        return lambda t: rps * (1.0 + (peak - 1.0) * np.asarray(t) / duration)
    raise ValueError(f"{profile=} must be one of {PROFILES}")


def arrival_offsets(
    rps: float,
    duration: float,
    kind: str,
    rng: np.random.Generator,
    profile: str = "steady",
    peak: float = 1.0,
) -> np.ndarray:
    """Intended send times, seconds from the start, sorted, all in ``[0, duration)``."""
    rate = rate_function(profile, rps, duration, peak)
    if kind == "constant":
        grid = np.linspace(0.0, duration, 4097)
        cumulative = np.concatenate([[0.0], np.cumsum(rate(grid[:-1]) * np.diff(grid))])
        n = int(cumulative[-1] + 1e-9)
        return np.interp(np.arange(n), cumulative, grid)
    top = float(max(rps, peak * rps)) if profile != "steady" else rps
    n = rng.poisson(top * duration)
    times = np.sort(rng.uniform(0.0, duration, n))  # a Poisson process, conditioned on its count
    if profile == "steady":
        return times
    return times[rng.random(n) < rate(times) / top]


def world_queries(world: World, req: Requests, prefix: str, k: int, candidates: int) -> list[Query]:
    """One Recommend query per request, with the context a feed service would send."""
    dense = world.dense_features(req)
    names = world.schema.dense_names
    # The server knows each user's activity from its catalog; the rest is the call's context.
    sent = [j for j, name in enumerate(names) if name != "user_log_activity"]
    return [
        Query(
            request_id=f"{prefix}-{i}",
            user_id=int(req.user[i]),
            surface=world.surface_names[int(req.surface[i])],
            sparse={"hour": int(req.hour[i]), "device": int(req.device[i])},
            dense={names[j]: float(dense[i, j]) for j in sent},
            k=k,
            num_candidates=candidates,
        )
        for i in range(len(req))
    ]


@dataclass
class SlateValues:
    """Expected and drawn revenue of shown slates, with the outcomes to report."""

    expected: np.ndarray
    """Expected dollars per slate under the world's ground truth."""
    outcomes: list[Outcome]
    realised: np.ndarray
    """Dollars per slate in the drawn outcomes."""


def slate_values(
    world: World,
    req: Requests,
    request_ids: list[str],
    slates: list[np.ndarray],
    rng: np.random.Generator,
) -> SlateValues:
    """Ground truth for slates shown to ``req`` (each slate its own length)."""
    n = len(slates)
    expected = np.zeros(n)
    realised = np.zeros(n)
    outcomes: list[Outcome] = []
    by_length: dict[int, list[int]] = {}
    for i, slate in enumerate(slates):
        by_length.setdefault(len(slate), []).append(i)
    for length, rows in by_length.items():
        if length == 0:
            continue
        idx = np.asarray(rows)
        sub = req.take(idx)
        stacked = np.stack([slates[i] for i in rows])
        expected[idx] = world.expected_revenue(sub, stacked)
        for row, events in zip(rows, world.sample_outcomes(sub, stacked, rng), strict=True):
            for item, event, revenue in events:
                outcomes.append(Outcome(request_ids[row], item, event, revenue))
                realised[row] += revenue
    return SlateValues(expected, outcomes, realised)
