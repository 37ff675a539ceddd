"""The Redis revenue tracker against real ``redis-server`` processes on free local ports.

Servers run with ``--appendonly yes --appendfsync always`` (the production durability); the
restart test kills one with SIGKILL and starts it again on the same port and folder, so the AOF
is what brings the state back. Time comes from a ManualClock.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embeddings.clock import ManualClock
from loadtest.redis_local import RedisProcess, free_port, require_binaries
from serving.domain import EVENTS, Outcome
from serving.errors import Unavailable
from serving.revenue.backends import make_tracker
from serving.revenue.config import MemoryTrackerConfig, RedisTrackerConfig
from serving.revenue.memory import InMemoryTracker
from serving.revenue.redis import RedisTracker
from serving.revenue.tracker import Inference, RevenueTracker

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
SEG_A = "ecommerce_recommendation/2"
SEG_B = "video_effects/0"


class RedisServer(RedisProcess):
    """One ``redis-server`` with AOF on (``appendfsync always``), owned by a test: start, kill -9
    (no shutdown, no final AOF flush), start again on the same port and directory."""

    def __init__(self, directory: Path) -> None:
        require_binaries()
        aof = ("--appendonly", "yes", "--appendfsync", "always", "--logfile", str(directory / "redis.log"))
        super().__init__(free_port(), directory, *aof)
        self.url = f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the module; tests keep apart by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, free to kill and restart."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def tracker_config(server: RedisServer, prefix: str, **overrides: object) -> RedisTrackerConfig:
    values: dict[str, object] = {"half_life_s": 600.0, "flush_interval_s": 0.0}
    values.update(overrides)
    return RedisTrackerConfig(url=server.url, key_prefix=prefix, **values)  # type: ignore[arg-type]


def new_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


def lifetime_revenue(tracker: RevenueTracker) -> dict[tuple[str, str], float]:
    return {key: stats.lifetime.revenue for key, stats in tracker.cells().items()}


# -- same answers as the in-process tracker --------------------------------------------------------


def test_redis_backend_matches_the_memory_backend(shared_server: RedisServer) -> None:
    """Decay, attribution, propensity weighting, unknown and expired requests, duplicates."""
    clock = ManualClock(T0)
    common = {"half_life_s": 600.0, "request_ttl_s": 300.0, "dedupe_ttl_s": 600.0}
    memory = InMemoryTracker(MemoryTrackerConfig(**common), clock)  # type: ignore[arg-type]
    shared = make_tracker(tracker_config(shared_server, new_prefix(), **common), clock)
    rnd = random.Random(3)
    for i in range(120):
        segment, path = rnd.choice((SEG_A, SEG_B)), rnd.choice(("full", "cheap"))
        inference = Inference(f"r{i}", segment, path, rnd.random(), rnd.choice((0.2, 0.5, 1.0)))  # type: ignore[arg-type]
        for tracker in (memory, shared):
            tracker.record_inference(inference)
        clock.advance(rnd.random() * 10)
        if i % 10 == 9:
            batch = [
                Outcome(f"r{rnd.randrange(-5, i + 1)}", rnd.randrange(2), rnd.choice(EVENTS), rnd.random())
                for _ in range(8)
            ]
            assert shared.record_outcomes(batch) == memory.record_outcomes(batch)
    clock.advance(400)  # every request has expired: these are unknown on both
    late = [Outcome("r119", 0, "click", 1.0)]
    assert shared.record_outcomes(late) == memory.record_outcomes(late)
    clock.advance(1000)
    want, got = memory.cells(), shared.cells()
    assert set(got) == set(want)
    for key in want:
        for part in ("lifetime", "window"):
            w, g = getattr(want[key], part), getattr(got[key], part)
            assert g.__dict__ == pytest.approx(w.__dict__, rel=1e-9), (key, part)
    shared.close()


outcome_st = st.builds(
    Outcome,
    st.sampled_from(("r0", "r1", "r2", "ghost")),
    st.integers(0, 2),
    st.sampled_from(EVENTS),
    st.sampled_from((0.0, 0.5, 1.25)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(outcome_st, max_size=10), max_size=6))
def test_each_outcome_key_counts_once(shared_server: RedisServer, batches: list[list[Outcome]]) -> None:
    clock = ManualClock(T0)
    tracker = RedisTracker(tracker_config(shared_server, new_prefix()), clock)
    served = {"r0": (SEG_A, "full"), "r1": (SEG_A, "cheap"), "r2": (SEG_B, "full")}
    for rid, (segment, path) in served.items():
        tracker.record_inference(Inference(rid, segment, path, 1.0))  # type: ignore[arg-type]
    tracker.flush()
    first: dict[tuple[str, int, str], float] = {}
    accepted = unknown = 0
    for batch in batches:
        report = tracker.record_outcomes(batch)
        assert report.accepted + report.duplicates == len(batch)
        accepted, unknown = accepted + report.accepted, unknown + report.unknown_requests
        for o in batch:
            first.setdefault(o.key, o.revenue)
    assert accepted == len(first)
    assert unknown == sum(1 for key in first if key[0] == "ghost")
    expected: dict[tuple[str, str], float] = defaultdict(float)
    for key, value in first.items():
        if key[0] in served:
            expected[served[key[0]]] += value
    got = lifetime_revenue(tracker)
    for cell in served.values():
        assert got[cell] == pytest.approx(expected[cell])
    tracker.close()


# -- replicas ---------------------------------------------------------------------------------------


def test_two_replicas_reporting_overlapping_batches_count_each_once(shared_server: RedisServer) -> None:
    clock, prefix = ManualClock(T0), new_prefix()
    a = RedisTracker(tracker_config(shared_server, prefix, max_batch=50), clock)
    b = RedisTracker(tracker_config(shared_server, prefix, max_batch=50), clock)
    served = {f"s{i}": ((SEG_A, SEG_B)[i % 2], ("full", "cheap")[i // 2 % 2]) for i in range(100)}
    for i, (rid, (segment, path)) in enumerate(served.items()):
        (a if i % 2 else b).record_inference(Inference(rid, segment, path, 1.0))  # type: ignore[arg-type]
    a.flush()
    b.flush()
    outcomes = [
        Outcome(rid, item, "click", 0.01 * (i + 1)) for i, rid in enumerate(served) for item in range(4)
    ]
    reports: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def replica(name: str, tracker: RedisTracker, seed: int) -> None:
        rnd = random.Random(seed)
        mine = outcomes[:] + rnd.sample(outcomes, 100)  # everything, some twice, in its own order
        rnd.shuffle(mine)
        start.wait()
        for i in range(0, len(mine), 25):
            report = tracker.record_outcomes(mine[i : i + 25])
            reports[name].append(report.accepted)
            assert report.accepted + report.duplicates == len(mine[i : i + 25])

    threads = [
        threading.Thread(target=replica, args=("a", a, 1)),
        threading.Thread(target=replica, args=("b", b, 2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(reports["a"]) + sum(reports["b"]) == len(outcomes)
    assert sum(reports["a"]) > 0 and sum(reports["b"]) > 0  # both really raced
    expected: dict[tuple[str, str], float] = defaultdict(float)
    for o in outcomes:
        expected[served[o.request_id]] += o.revenue
    for cell, revenue in lifetime_revenue(a).items():
        assert revenue == pytest.approx(expected[cell])
    assert sum(stats.lifetime.outcomes for stats in b.cells().values()) == len(outcomes)
    a.close()
    b.close()


def test_background_sender_delivers_inferences(shared_server: RedisServer) -> None:
    clock, prefix = ManualClock(T0), new_prefix()
    tracker = RedisTracker(tracker_config(shared_server, prefix, flush_interval_s=0.005), clock)
    reader = RedisTracker(tracker_config(shared_server, prefix), clock)
    for i in range(30):
        tracker.record_inference(Inference(f"r{i}", SEG_A, "full", 1.0))
    deadline = time.monotonic() + 10.0
    while (
        reader.cells().get((SEG_A, "full")) is None
        or reader.cells()[(SEG_A, "full")].lifetime.inferences < 30
    ):
        assert time.monotonic() < deadline, "inferences never reached Redis"
        threading.Event().wait(0.005)  # polling a real condition, bounded above
    assert reader.cells()[(SEG_A, "full")].lifetime.inferences == 30
    tracker.close()
    reader.close()


# -- Redis down, Redis restarted ------------------------------------------------------------------


def test_a_down_redis_degrades_and_refuses_to_acknowledge(own_server: RedisServer) -> None:
    clock = ManualClock(T0)
    tracker = RedisTracker(tracker_config(own_server, new_prefix(), max_batch=10, max_buffered=20), clock)
    tracker.record_inference(Inference("before", SEG_A, "full", 1.0))
    assert tracker.record_outcomes([Outcome("before", 1, "click", 1.0)]).accepted == 1
    assert tracker.cells()[(SEG_A, "full")].lifetime.revenue == 1.0
    own_server.kill()
    for i in range(25):  # never raises; 20 kept, 5 dropped
        tracker.record_inference(Inference(f"during{i}", SEG_A, "cheap", 1.0))
    assert tracker.health()["buffered_inferences"] == 20
    assert tracker.health()["inferences_dropped"] == 5
    with pytest.raises(Unavailable):
        tracker.record_outcomes([Outcome("before", 2, "click", 5.0)])
    assert tracker.cells()[(SEG_A, "full")].lifetime.revenue == 1.0  # the last state read
    assert tracker.health()["degraded"] == 1.0
    own_server.start()
    report = tracker.record_outcomes(
        [Outcome("before", 2, "click", 5.0), Outcome("during3", 1, "click", 2.0)]
    )
    assert (report.accepted, report.unknown_requests) == (2, 0)
    cells = tracker.cells()
    assert cells[(SEG_A, "full")].lifetime.revenue == 6.0
    assert cells[(SEG_A, "cheap")].lifetime.inferences == 20
    assert tracker.health()["degraded"] == 0.0
    tracker.close()


def test_restart_in_the_middle_of_a_stream_loses_none_and_counts_none_twice(own_server: RedisServer) -> None:
    """Two replicas stream overlapping outcome batches while the server is killed (SIGKILL) and
    started again on the same AOF, twice. Failed batches are retried (retries are safe: the
    outcomes are idempotent). The final totals must equal those of the distinct outcomes."""
    clock, prefix = ManualClock(T0), new_prefix()
    replicas = [
        RedisTracker(tracker_config(own_server, prefix, socket_timeout_s=0.5), clock) for _ in range(2)
    ]
    rnd = random.Random(11)
    cells = [(SEG_A, "full"), (SEG_A, "cheap"), (SEG_B, "full"), (SEG_B, "cheap")]
    served = {f"s{i}": cells[i % 4] for i in range(200)}
    for i, (rid, (segment, path)) in enumerate(served.items()):
        replicas[i % 2].record_inference(Inference(rid, segment, path, 1.0))  # type: ignore[arg-type]
    for tracker in replicas:
        tracker.flush()
    keys = [(rid, item, event) for rid in served for item in range(2) for event in ("click", "conversion")]
    price = {key: round(rnd.uniform(0.01, 2.0), 2) for key in keys}
    batches = [rnd.sample(keys, 20) for _ in range(150)] + [keys[i : i + 20] for i in range(0, len(keys), 20)]
    rnd.shuffle(batches)
    up = threading.Event()
    up.set()
    done = [0]
    failures = [0]
    progress = threading.Condition()

    def stream() -> None:
        for i, batch_keys in enumerate(batches):
            batch = [Outcome(*key, price[key]) for key in batch_keys]
            deadline = time.monotonic() + 30.0
            while True:
                try:
                    replicas[i % 2].record_outcomes(batch)
                    break
                except Unavailable:
                    failures[0] += 1
                    assert time.monotonic() < deadline, "Redis never came back"
                    up.wait(timeout=1.0)  # retry once the server is back (or after 1 s)
            with progress:
                done[0] += 1
                progress.notify_all()

    streamer = threading.Thread(target=stream)
    streamer.start()
    for fraction in (0.3, 0.6):
        with progress:
            assert progress.wait_for(lambda f=fraction: done[0] >= f * len(batches), timeout=30)
        up.clear()
        own_server.kill()  # mid-stream: a batch is usually in flight
        own_server.start()
        up.set()
    streamer.join(timeout=60)
    assert not streamer.is_alive()
    assert failures[0] > 0, "the restarts never hit the stream"

    expected_revenue: dict[tuple[str, str], float] = defaultdict(float)
    for (rid, _, _), value in price.items():
        expected_revenue[served[rid]] += value
    fresh = RedisTracker(tracker_config(own_server, prefix), clock)  # reads what the AOF kept
    got = fresh.cells()
    for cell in cells:
        assert got[cell].lifetime.outcomes == len(keys) / 4
        assert got[cell].lifetime.revenue == pytest.approx(expected_revenue[cell])
        assert got[cell].lifetime.inferences == len(served) / 4
    for tracker in (*replicas, fresh):
        tracker.close()
