"""The in-process revenue tracker: decay, idempotence, attribution, expiry, and its durable log.

Time comes from a ManualClock; the log lives in a temporary folder (fsync is real).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.clock import ManualClock
from serving.domain import EVENTS, Outcome
from serving.errors import InvalidArgument, Unavailable
from serving.revenue.backends import make_tracker, tracker_config_from_dict
from serving.revenue.config import MemoryTrackerConfig, RedisTrackerConfig
from serving.revenue.ledger import Cell, Counters
from serving.revenue.memory import InMemoryTracker
from serving.revenue.tracker import Inference, RevenueTracker

T0 = 1_700_000_000.0
HALF_LIFE = 600.0
SEG_A = "ecommerce_recommendation/2"
SEG_B = "video_effects/0"


def config(log: Path | None = None, **overrides: object) -> MemoryTrackerConfig:
    values: dict[str, object] = {"half_life_s": HALF_LIFE, "request_ttl_s": 3600.0, "dedupe_ttl_s": 7200.0}
    values.update(overrides)
    return MemoryTrackerConfig(outcome_log=None if log is None else str(log), **values)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "revenue.log"


def lifetime(tracker: RevenueTracker, segment: str, path: str) -> Counters:
    return tracker.cells()[(segment, path)].lifetime  # type: ignore[index]


def window(tracker: RevenueTracker, segment: str, path: str) -> Counters:
    return tracker.cells()[(segment, path)].window  # type: ignore[index]


# -- decaying windows ----------------------------------------------------------------------------


def test_window_halves_every_half_life_and_lifetime_stays(clock: ManualClock) -> None:
    tracker = InMemoryTracker(config(), clock)
    for i in range(8):
        tracker.record_inference(Inference(f"r{i}", SEG_A, "full", 2.0))
    assert window(tracker, SEG_A, "full").inferences == pytest.approx(8.0)
    clock.advance(HALF_LIFE)
    assert window(tracker, SEG_A, "full").inferences == pytest.approx(4.0)
    assert window(tracker, SEG_A, "full").compute_ms == pytest.approx(8.0)
    tracker.record_outcomes([Outcome("r0", 1, "click", 1.0)])
    clock.advance(HALF_LIFE)
    w = window(tracker, SEG_A, "full")
    assert (w.inferences, w.revenue) == pytest.approx((2.0, 0.5))
    life = lifetime(tracker, SEG_A, "full")
    assert (life.inferences, life.compute_ms, life.revenue) == (8.0, 16.0, 1.0)


@given(st.lists(st.tuples(st.floats(0, 5000), st.floats(0, 100)), min_size=1, max_size=30), st.randoms())
def test_window_does_not_depend_on_arrival_order(adds: list[tuple[float, float]], rnd: random.Random) -> None:
    in_order, shuffled = Cell(), Cell()
    for t, x in sorted(adds):
        in_order.add(t, HALF_LIFE, {0: x})
    rnd.shuffle(adds)
    for t, x in adds:
        shuffled.add(t, HALF_LIFE, {0: x})
    now = 6000.0
    exact = sum(x * 2 ** (-(now - t) / HALF_LIFE) for t, x in adds)
    assert in_order.stats(now, HALF_LIFE).window.inferences == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert shuffled.stats(now, HALF_LIFE).window.inferences == pytest.approx(exact, rel=1e-9, abs=1e-9)


# -- idempotence and attribution -------------------------------------------------------------------

KNOWN = ("r0", "r1", "r2", "r3")
outcome_st = st.builds(
    Outcome,
    st.sampled_from((*KNOWN, "never-served")),
    st.integers(0, 2),
    st.sampled_from(EVENTS),
    st.sampled_from((0.0, 0.25, 1.5)),
)


def serve_known(tracker: RevenueTracker) -> dict[str, tuple[str, str, float]]:
    """r0..r3 over two segments and both paths, with propensities; returns where each went."""
    served = {"r0": (SEG_A, "full", 0.5), "r1": (SEG_A, "cheap", 0.25), "r2": (SEG_B, "full", 1.0)}
    served["r3"] = (SEG_B, "cheap", 0.8)
    for rid, (segment, path, q) in served.items():
        tracker.record_inference(Inference(rid, segment, path, 1.0, q))  # type: ignore[arg-type]
    return served


class ExactlyOnce:
    """The expected effect of a stream of outcome batches: each key counts once, first wins."""

    def __init__(self, served: dict[str, tuple[str, str, float]]) -> None:
        self.served = served
        self.first: dict[tuple[str, int, str], Outcome] = {}
        self.accepted = self.unknown = 0

    def report(self, tracker: RevenueTracker, batches: list[list[Outcome]]) -> None:
        for batch in batches:
            report = tracker.record_outcomes(batch)
            assert report.accepted + report.duplicates == len(batch)
            self.accepted += report.accepted
            self.unknown += report.unknown_requests
            for o in batch:
                self.first.setdefault(o.key, o)

    def check(self, tracker: RevenueTracker) -> None:
        assert self.accepted == len(self.first)
        assert self.unknown == sum(1 for key in self.first if key[0] not in self.served)
        revenue: dict[tuple[str, str], float] = defaultdict(float)
        ipw: dict[tuple[str, str], float] = defaultdict(float)
        count: dict[tuple[str, str], int] = defaultdict(int)
        for key, o in self.first.items():
            if key[0] in self.served:
                segment, path, q = self.served[key[0]]
                revenue[(segment, path)] += o.revenue
                ipw[(segment, path)] += o.revenue / q
                count[(segment, path)] += 1
        for segment, path, _ in self.served.values():
            life = lifetime(tracker, segment, path)
            assert life.revenue == pytest.approx(revenue[(segment, path)])
            assert life.ipw_revenue == pytest.approx(ipw[(segment, path)])
            assert life.outcomes == count[(segment, path)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(outcome_st, max_size=12), max_size=8))
def test_each_outcome_key_counts_once(batches: list[list[Outcome]]) -> None:
    tracker = InMemoryTracker(config(), ManualClock(T0))
    expect = ExactlyOnce(serve_known(tracker))
    expect.report(tracker, batches)
    expect.check(tracker)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(outcome_st, max_size=12), max_size=6), st.integers(0, 6))
def test_each_outcome_key_counts_once_across_a_reopen(batches: list[list[Outcome]], reopen_at: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, clock = config(Path(tmp) / "revenue.log"), ManualClock(T0)
        tracker = InMemoryTracker(cfg, clock)
        expect = ExactlyOnce(serve_known(tracker))
        expect.report(tracker, batches[:reopen_at])
        tracker.close()
        tracker = InMemoryTracker(cfg, clock)
        expect.report(tracker, batches)  # resends the first part too: all duplicates now
        expect.check(tracker)
        tracker.close()


def test_revenue_goes_to_the_serving_segment_and_path(clock: ManualClock) -> None:
    tracker = InMemoryTracker(config(), clock)
    tracker.record_inference(Inference("a", SEG_A, "full", 3.0, propensity=0.8))
    tracker.record_inference(Inference("b", SEG_A, "cheap", 0.1, propensity=0.2))
    tracker.record_inference(Inference("c", SEG_B, "full", 2.0))
    report = tracker.record_outcomes(
        [Outcome("a", 1, "click", 0.4), Outcome("b", 7, "conversion", 2.0), Outcome("zz", 1, "click", 5.0)]
    )
    assert (report.accepted, report.duplicates, report.unknown_requests) == (3, 0, 1)
    full_a, cheap_a = lifetime(tracker, SEG_A, "full"), lifetime(tracker, SEG_A, "cheap")
    assert (full_a.revenue, full_a.outcomes, full_a.compute_ms) == (0.4, 1.0, 3.0)
    assert full_a.ipw_inferences == pytest.approx(1 / 0.8)
    assert full_a.ipw_revenue == pytest.approx(0.4 / 0.8)
    assert cheap_a.ipw_revenue_per_inference == pytest.approx((2.0 / 0.2) / (1 / 0.2))
    assert lifetime(tracker, SEG_B, "full").revenue == 0.0
    snap = tracker.snapshot()
    assert snap[SEG_A]["cheap"]["revenue"] == 2.0
    assert snap[SEG_A]["cheap"]["window_revenue"] == 2.0
    assert set(snap) == {SEG_A, SEG_B}


def test_bad_outcome_rejects_the_whole_batch(clock: ManualClock) -> None:
    tracker = InMemoryTracker(config(), clock)
    tracker.record_inference(Inference("a", SEG_A, "full", 1.0))
    with pytest.raises(InvalidArgument, match=r"outcomes\[1\]\.event"):
        tracker.record_outcomes([Outcome("a", 1, "click", 1.0), Outcome("a", 2, "purchase", 1.0)])
    with pytest.raises(InvalidArgument, match=r"outcomes\[0\]\.revenue"):
        tracker.record_outcomes([Outcome("a", 1, "click", float("nan"))])
    assert lifetime(tracker, SEG_A, "full").outcomes == 0
    assert tracker.record_outcomes([Outcome("a", 1, "click", 1.0)]).accepted == 1


# -- bounded memory --------------------------------------------------------------------------------


def test_requests_expire_after_their_ttl(clock: ManualClock) -> None:
    tracker = InMemoryTracker(config(request_ttl_s=100.0, dedupe_ttl_s=200.0), clock)
    tracker.record_inference(Inference("old", SEG_A, "full", 1.0))
    clock.advance(60)
    tracker.record_inference(Inference("new", SEG_A, "full", 1.0))
    clock.advance(50)  # "old" is 110 s old, "new" 50 s
    report = tracker.record_outcomes([Outcome("old", 1, "click", 1.0), Outcome("new", 1, "click", 2.0)])
    assert (report.accepted, report.unknown_requests) == (2, 1)
    assert lifetime(tracker, SEG_A, "full").revenue == 2.0
    assert tracker.health()["requests"] == 1
    clock.advance(200)  # outcome keys expire too: a re-report is accepted again, as unknown
    report = tracker.record_outcomes([Outcome("new", 1, "click", 2.0)])
    assert (report.accepted, report.unknown_requests) == (1, 1)
    assert lifetime(tracker, SEG_A, "full").revenue == 2.0
    assert tracker.health()["outcome_keys"] == 1


def test_caps_forget_oldest_and_never_count_twice(clock: ManualClock) -> None:
    tracker = InMemoryTracker(config(max_requests=3, max_outcome_keys=2), clock)
    for rid in ("a", "b", "c", "d"):
        tracker.record_inference(Inference(rid, SEG_A, "full", 1.0))
    assert tracker.record_outcomes([Outcome("a", 1, "click", 1.0)]).unknown_requests == 1  # evicted
    assert tracker.health()["requests_evicted"] == 1
    tracker.record_outcomes([Outcome("b", 1, "click", 1.0), Outcome("c", 1, "click", 1.0)])
    # Three keys under a cap of two: ("a", 1, "click") was forgotten. Now ("b", 1, "click") goes,
    # and request "b" with it, so its re-report below is accepted again but earns nothing.
    tracker.record_outcomes([Outcome("d", 1, "click", 1.0)])
    assert tracker.health()["outcome_keys_evicted"] == 2
    again = tracker.record_outcomes([Outcome("b", 1, "click", 1.0)])
    assert (again.accepted, again.unknown_requests) == (1, 1)
    assert lifetime(tracker, SEG_A, "full").revenue == 3.0


# -- the durable log -------------------------------------------------------------------------------


def traffic(tracker: RevenueTracker, clock: ManualClock, n: int = 40, seed: int = 0) -> None:
    rnd = random.Random(seed)
    for i in range(n):
        segment, path = rnd.choice((SEG_A, SEG_B)), rnd.choice(("full", "cheap"))
        tracker.record_inference(
            Inference(f"q{seed}-{i}", segment, path, rnd.random(), rnd.choice((0.1, 1.0)))
        )  # type: ignore[arg-type]
        clock.advance(rnd.random() * 30)
        if i % 5 == 4:
            batch = [
                Outcome(f"q{seed}-{rnd.randrange(i + 3)}", rnd.randrange(3), "click", rnd.random())
                for _ in range(4)
            ]
            tracker.record_outcomes(batch)


def test_reopen_replays_the_log_to_the_same_state(clock: ManualClock, log_path: Path) -> None:
    tracker = InMemoryTracker(config(log_path), clock)
    traffic(tracker, clock)
    before, health = tracker.snapshot(), tracker.health()
    tracker.close()
    clock.advance(0)
    reopened = InMemoryTracker(config(log_path), clock)
    assert reopened.snapshot() == before
    assert {k: reopened.health()[k] for k in ("requests", "outcome_keys")} == {
        k: health[k] for k in ("requests", "outcome_keys")
    }
    reopened.close()


def test_torn_last_line_is_ignored(clock: ManualClock, log_path: Path) -> None:
    tracker = InMemoryTracker(config(log_path), clock)
    traffic(tracker, clock)
    before = tracker.snapshot()
    tracker.close()
    with log_path.open("ab") as f:  # what a crash in the middle of a write leaves
        f.write(b'{"k":"o","t":1700000100.0,"r":"q0-1","i":2,"e":"cli')
    reopened = InMemoryTracker(config(log_path), clock)
    assert reopened.snapshot() == before
    assert reopened.record_outcomes([Outcome("q0-1", 2, "click", 9.0)]).accepted == 1  # appends cleanly
    after = reopened.snapshot()
    reopened.close()
    again = InMemoryTracker(config(log_path), clock)
    assert again.snapshot() == after
    again.close()


def test_outcome_is_in_the_file_when_acknowledged(clock: ManualClock, log_path: Path) -> None:
    tracker = InMemoryTracker(config(log_path), clock)
    tracker.record_inference(Inference("a", SEG_A, "full", 1.0))
    tracker.record_outcomes([Outcome("a", 3, "conversion", 4.5)])
    lines = log_path.read_text().splitlines()  # read before close: no flush at close involved
    assert '"k":"i"' in lines[-2] and '"r":"a"' in lines[-2]
    assert '"k":"o"' in lines[-1] and '"v":4.5' in lines[-1]
    tracker.close()


def test_failed_fsync_acknowledges_nothing_and_the_retry_counts_once(
    clock: ManualClock, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = InMemoryTracker(config(log_path), clock)
    tracker.record_inference(Inference("a", SEG_A, "full", 1.0))
    real_fsync, calls = os.fsync, []

    def failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_once)
    batch = [Outcome("a", 1, "click", 1.0), Outcome("a", 2, "click", 2.0)]
    with pytest.raises(Unavailable):
        tracker.record_outcomes(batch)
    assert lifetime(tracker, SEG_A, "full").revenue == 0.0
    assert tracker.record_outcomes(batch).accepted == 2  # rewrites the log from memory first
    assert lifetime(tracker, SEG_A, "full").revenue == 3.0
    assert tracker.health()["log_io_errors"] == 1
    tracker.close()
    reopened = InMemoryTracker(config(log_path), clock)
    assert lifetime(reopened, SEG_A, "full").revenue == 3.0
    reopened.close()


def test_compaction_bounds_the_file_and_keeps_the_state(clock: ManualClock, log_path: Path) -> None:
    cfg = config(log_path, compact_bytes=4096, request_ttl_s=60.0, dedupe_ttl_s=60.0)
    tracker = InMemoryTracker(cfg, clock)
    for seed in range(6):
        traffic(tracker, clock, n=40, seed=seed)
    before = tracker.snapshot()
    assert log_path.stat().st_size < 3 * 4096
    tracker.close()
    reopened = InMemoryTracker(cfg, clock)
    assert reopened.snapshot() == before
    reopened.close()


def test_a_second_writer_is_refused(clock: ManualClock, log_path: Path) -> None:
    tracker = InMemoryTracker(config(log_path), clock)
    with pytest.raises(RuntimeError, match="in use"):
        InMemoryTracker(config(log_path), clock)
    tracker.close()
    InMemoryTracker(config(log_path), clock).close()


def test_restart_in_the_middle_of_a_stream_loses_none_and_counts_none_twice(
    clock: ManualClock, log_path: Path
) -> None:
    """Outcome batches with repeats and overlaps; mid-stream the tracker is closed and reopened,
    and later 'crashes' after making a batch durable but before the client saw the answer (plus a
    torn line): the client resends that batch. Totals must equal the distinct outcomes'."""
    rnd = random.Random(7)
    cells = [(SEG_A, "full"), (SEG_A, "cheap"), (SEG_B, "full"), (SEG_B, "cheap")]
    served = {f"s{i}": cells[i % 4] for i in range(60)}
    tracker = InMemoryTracker(config(log_path), clock)
    for rid, (segment, path) in served.items():
        tracker.record_inference(Inference(rid, segment, path, 1.0))  # type: ignore[arg-type]
    tracker.flush()
    keys = [(rid, item, event) for rid in served for item in range(2) for event in ("click", "conversion")]
    price = {key: round(rnd.uniform(0.01, 2.0), 2) for key in keys}
    stream = [rnd.sample(keys, 12) for _ in range(40)] + [keys[i : i + 12] for i in range(0, len(keys), 12)]
    for i, batch_keys in enumerate(stream):
        batch = [Outcome(*key, price[key]) for key in batch_keys]
        tracker.record_outcomes(batch)
        clock.advance(1.0)
        if i == 13:  # clean restart
            tracker.close()
            tracker = InMemoryTracker(config(log_path), clock)
        if i == 29:  # crash after the fsync, before the answer reached the client
            tracker.close()
            with log_path.open("ab") as f:
                f.write(b'{"k":"o","t":1.0,"r":"s1","i":0,"e":"cl')
            tracker = InMemoryTracker(config(log_path), clock)
            assert tracker.record_outcomes(batch).accepted == 0  # the client's resend
    expected: dict[tuple[str, str], float] = defaultdict(float)
    for (rid, _, _), value in price.items():
        expected[served[rid]] += value
    for segment, path in cells:
        life = lifetime(tracker, segment, path)
        assert life.revenue == pytest.approx(expected[(segment, path)])
        assert life.outcomes == len(keys) / 4
    tracker.close()


# -- config and registry ---------------------------------------------------------------------------


def test_configs_validate() -> None:
    with pytest.raises(ValueError, match="dedupe_ttl_s"):
        MemoryTrackerConfig(request_ttl_s=100.0, dedupe_ttl_s=50.0)
    with pytest.raises(ValueError, match="half_life_s"):
        RedisTrackerConfig(half_life_s=0.0)
    with pytest.raises(ValueError, match="url"):
        RedisTrackerConfig(url="localhost:6379")
    with pytest.raises(ValueError, match="unknown memory tracker settings"):
        tracker_config_from_dict({"type": "memory", "url": "redis://x"})
    with pytest.raises(ValueError, match="tracker type"):
        tracker_config_from_dict({"type": "dynamo"})
    cfg = tracker_config_from_dict({"type": "redis", "url": "redis://cache:6379/1", "half_life_s": 60})
    assert isinstance(cfg, RedisTrackerConfig) and cfg.half_life_s == 60


def test_make_tracker_builds_the_memory_backend_without_importing_redis(log_path: Path) -> None:
    tracker = make_tracker(config(log_path), ManualClock(T0))
    assert isinstance(tracker, InMemoryTracker) and log_path.exists()
    tracker.close()
    code = (
        "import sys; from serving.revenue.backends import make_tracker; "
        "from serving.revenue.config import MemoryTrackerConfig; "
        "make_tracker(MemoryTrackerConfig()).close(); print('redis' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
