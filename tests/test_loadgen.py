"""`valuerank loadtest`: the open-loop schedule, its config, and a run against a real server."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.live.loadgen import LoadConfig, arrival_offsets, format_report, run_load


@settings(max_examples=100, deadline=None)
@given(
    rps=st.floats(0.5, 2000.0),
    duration=st.floats(0.1, 20.0),
    kind=st.sampled_from(["poisson", "constant"]),
    seed=st.integers(0, 2**31),
)
def test_arrivals_are_sorted_inside_the_run_and_constant_ones_are_evenly_spaced(
    rps: float, duration: float, kind: str, seed: int
) -> None:
    t = arrival_offsets(rps, duration, kind, np.random.default_rng(seed))
    assert np.all(np.diff(t) >= 0)
    assert np.all((t >= 0) & (t < duration))
    if kind == "constant":
        assert len(t) == int(rps * duration)
        assert np.allclose(np.diff(t), 1.0 / rps)


def test_poisson_arrivals_come_at_the_asked_rate() -> None:
    counts = [len(arrival_offsets(200.0, 10.0, "poisson", np.random.default_rng(s))) for s in range(20)]
    # 2,000 expected per run, standard deviation sqrt(2000) = 45: the mean of 20 runs within 3 sigma.
    assert abs(np.mean(counts) - 2000.0) < 3 * 45 / np.sqrt(20)


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("target", {"target": "10.0.0.1:50051"}),
        ("rps", {"rps": 0.0}),
        ("duration", {"duration": -1.0}),
        ("deadline_ms", {"deadline_ms": 0.0}),
        ("k", {"k": 600, "candidates": 500}),
        ("processes", {"processes": 0}),
    ],
)
def test_load_config_rejects_bad_values(field: str, changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        LoadConfig(**changes)  # type: ignore[arg-type]


@pytest.mark.integration
def test_open_loop_run_against_a_real_server_counts_every_request(grpc_server: str) -> None:
    config = LoadConfig(target=grpc_server, rps=40.0, duration=1.5, arrivals="constant", candidates=200)
    report = run_load(config)
    assert report["offered"] == 60 and report["ok"] == 60 and report["errors"] == {}
    assert report["paths"] == {"full": 60}  # the fixture's server runs always_full
    assert report["achieved_rps"] == pytest.approx(40.0)
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"] < 1000.0
    # 40 req/s is far below what one worker sends, but the server shares these 2 cores in this
    # process: a send or two may start more than 5 ms late (1 in 1,616 seen at 200 req/s).
    assert report["generator"]["late_sends"] <= 3 and report["generator"]["max_lag_ms"] < 500.0
    assert "ok 40.0 req/s" in format_report(report)


@pytest.mark.integration
def test_requests_past_their_deadline_are_errors_by_code_and_not_latencies(grpc_server: str) -> None:
    config = LoadConfig(
        target=grpc_server, rps=50.0, duration=0.4, arrivals="constant", deadline_ms=0.001, processes=2
    )
    report = run_load(config)
    assert report["offered"] == 20 and report["ok"] == 0
    assert report["errors"] == {"DEADLINE_EXCEEDED": 20} and report["error_share"] == 1.0
