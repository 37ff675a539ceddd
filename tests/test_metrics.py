"""AUC and logloss against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dlrm import metrics


def brute_force_auc(labels: list[int], scores: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# Scores drawn from a few values, so that ties (within and across classes) are common.
labelled_scores = st.integers(min_value=2, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda ys: 0 < sum(ys) < len(ys)),
        st.lists(
            st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6, allow_nan=False)),
            min_size=n,
            max_size=n,
        ),
    )
)


@settings(max_examples=200, deadline=None)
@given(labelled_scores)
def test_auc_equals_pairwise_definition_including_ties(case: tuple[list[int], list[float]]) -> None:
    labels, scores = case
    assert metrics.auc(np.array(labels), np.array(scores)) == pytest.approx(
        brute_force_auc(labels, scores), abs=1e-12
    )


@settings(max_examples=50, deadline=None)
@given(labelled_scores)
def test_auc_is_invariant_to_monotone_transforms_and_flips_under_negation(
    case: tuple[list[int], list[float]],
) -> None:
    labels, scores = np.array(case[0]), np.array(case[1])
    squashed = np.arctan(scores)
    # arctan is strictly monotone on the reals but not in float64: it can map two nearby large
    # scores to one value (1e6 and 1e6 - 1e-10), creating a tie the scores did not have.
    assume(len(np.unique(squashed)) == len(np.unique(scores)))
    base = metrics.auc(labels, scores)
    assert metrics.auc(labels, squashed) == pytest.approx(base, abs=1e-12)
    assert metrics.auc(labels, -scores) == pytest.approx(1.0 - base, abs=1e-12)


def test_auc_of_perfect_random_and_constant_scores() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    assert metrics.auc(labels, labels + 0.1 * rng.random(5000)) == 1.0
    assert metrics.auc(labels, np.zeros(5000)) == 0.5
    assert abs(metrics.auc(labels, rng.random(5000)) - 0.5) < 0.03


def test_auc_rejects_one_class_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.auc(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.auc(np.array([0, 1, 1]), np.array([0.1, 0.2]))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.floats(1e-6, 1 - 1e-6, allow_nan=False)), min_size=1, max_size=50
    )
)
def test_logloss_equals_mean_negative_log_likelihood(pairs: list[tuple[int, float]]) -> None:
    labels = np.array([y for y, _ in pairs])
    probs = np.array([p for _, p in pairs])
    expected = -sum(math.log(p) if y else math.log(1 - p) for y, p in pairs) / len(pairs)
    assert metrics.logloss(labels, probs) == pytest.approx(expected, rel=1e-9)


def test_logloss_clips_certain_mistakes() -> None:
    # A confident wrong answer costs -log(eps), not infinity.
    assert metrics.logloss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(1e-7))
    assert metrics.logloss(np.array([1.0, 0.0]), np.array([1.0, 0.0])) < 1e-6
