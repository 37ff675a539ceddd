"""The slate order shared by the pipeline, the router's value model and the replay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dlrm.world import position_bias
from serving.ranking import cheap_slate, item_values_for, ranking_keys, retrieval_probs, top_k

_keys = arrays(np.float64, st.integers(1, 60), elements=st.floats(-5, 5).map(lambda x: round(x, 1)))


@given(keys=_keys, k=st.integers(1, 80))
def test_top_k_is_the_k_largest_best_first_ties_by_position(keys: np.ndarray, k: int) -> None:
    top = top_k(keys, k)
    assert len(top) == min(k, len(keys)) == len(set(top.tolist()))
    assert (np.diff(keys[top]) <= 0).all()
    rest = np.setdiff1d(np.arange(len(keys)), top)
    if len(rest):
        assert keys[rest].max() <= keys[top].min()
    for a, b in itertools.pairwise(top):
        if keys[a] == keys[b]:
            assert a < b


@settings(max_examples=50)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 10))
def test_value_order_earns_at_least_any_other_slate(seed: int, k: int) -> None:
    """Top k by P(click) x value, best first, maximises sum_p bias(p) P(click) value under any
    decreasing position bias (rearrangement inequality): never below the click order or random."""
    rng = np.random.default_rng(seed)
    probs, values = rng.uniform(0.001, 0.5, 40), rng.lognormal(3.0, 0.9, 40)
    bias = position_bias(k)
    keys = ranking_keys(probs, values)

    def earned(slate: np.ndarray) -> float:
        return float(bias[: len(slate)] @ keys[slate])

    best = earned(top_k(keys, k))
    assert best >= earned(top_k(probs, k)) - 1e-12
    assert best >= earned(rng.permutation(40)[:k]) - 1e-12


def test_keys_without_values_are_the_click_probabilities() -> None:
    probs = np.array([0.2, 0.7, 0.1])
    np.testing.assert_array_equal(ranking_keys(probs, None), probs)
    np.testing.assert_allclose(ranking_keys(probs, np.array([10.0, 1.0, 2.0])), [2.0, 0.7, 0.2])
    prices = np.array([3.0, 4.0])
    assert item_values_for("value", prices) is prices
    assert item_values_for("click", prices) is None
    assert item_values_for("value", None) is None
    with pytest.raises(ValueError, match="rank_by"):
        item_values_for("revenue", prices)


def test_retrieval_probs_are_a_monotone_sigmoid_without_overflow() -> None:
    scores = np.array([-1e4, -30.0, -1.0, 0.0, 2.0, 1e4])
    p = retrieval_probs(scores)  # pytest turns an overflow warning into an error
    assert ((p >= 0) & (p <= 1)).all() and (np.diff(p) >= 0).all()
    np.testing.assert_allclose(p[2:5], 1.0 / (1.0 + np.exp(-scores[2:5])))


def test_cheap_slate_ranks_the_two_tower_probability_times_value() -> None:
    scores = np.array([3.0, 0.0, 1.0])  # P(click) 0.95, 0.50, 0.73
    values = np.array([1.0, 3.0, 1.0])  # expected values 0.95, 1.50, 0.73
    assert cheap_slate(scores, values, 2).tolist() == [1, 0]
    assert cheap_slate(scores, None, 2).tolist() == [0, 2]
