"""``valuerank loadtest --faults`` end to end on the tiny model: a real ``serve --workers 2`` group,
its tracker's real ``redis-server`` killed and restarted, a worker killed, a reload and a drain,
each under load with outcomes; the tracker's books must match what the generator was told."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.live.faults import FAULTS, run_faults
from loadtest.live.loadgen import LoadConfig

pytestmark = pytest.mark.integration


def test_every_fault_under_load_loses_and_double_counts_no_outcome(serving_assets: Any) -> None:
    config = LoadConfig(
        rps=40.0, duration=3.0, arrivals="constant", candidates=200, processes=1, outcome_retry_s=6.0
    )
    result = run_faults(config, serving_assets.model_dir, serving_assets.index_dir, workers=2)
    rows = {row["fault"]: row for row in result["faults"]}
    assert list(rows) == list(FAULTS)
    for fault, row in rows.items():
        assert "inject_error" not in row, row
        assert row["acknowledged"] > 0, fault
        assert (row["lost"], row["duplicated"]) == (0, 0), row
        if fault != "drain":
            assert row["failed"] == 0 and row["outcomes_failed"] == 0, row
    assert rows["tracker_redis"]["outcomes_refused_then_retried"] > 0  # the outage was real
    assert rows["worker_kill"]["killed_pid"] > 0
    assert rows["reload"]["peak_over_steady_rss"] < 1.6
    drain = rows["drain"]
    assert set(drain["errors"]) <= {"UNAVAILABLE"} and drain["exit_code"] == 0, drain
