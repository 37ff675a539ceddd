"""``serve --workers 2`` as a real process group: two workers on one port behind one supervisor,
sharing the revenue tracker through the private ``redis-server`` the supervisor starts."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import wait_until

from loadtest.live.servers import ServerProcess, start_serve
from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.revenue.local_redis import require_binaries

pytestmark = pytest.mark.integration

CONNECTIONS = 24
"""Connections land on a worker by the kernel's hash of their ports: with 24, both workers get
some except with probability 2**-23."""
WAIT_S = 120.0


@pytest.fixture(scope="module")
def workers(serving_assets: Any) -> Iterator[ServerProcess]:
    require_binaries()
    flags = ["--workers", "2", "--policy", "always_full", "--grace-s", "2"]
    server = start_serve(serving_assets.model_dir, serving_assets.index_dir, flags)
    yield server
    server.stop()


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.RecommenderStub]:
    # A local subchannel pool: each channel its own TCP connection (gRPC would share one).
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, pb_grpc.RecommenderStub(channel)


def _stats(stub: pb_grpc.RecommenderStub) -> dict[str, Any]:
    return dict(json.loads(stub.GetRoutingStats(pb.GetRoutingStatsRequest(), timeout=30).json))


def _by_worker(target: str, n: int = CONNECTIONS) -> dict[int, pb_grpc.RecommenderStub]:
    """One stub per worker pid that answered, from ``n`` fresh connections."""
    found: dict[int, pb_grpc.RecommenderStub] = {}
    for _ in range(n):
        _, stub = _stub(target)
        found.setdefault(_stats(stub)["process"]["worker_pid"], stub)
    return found


def _inferences(stats: dict[str, Any]) -> float:
    return sum(cell["inferences"] for paths in stats["segments"].values() for cell in paths.values())


def test_two_workers_share_the_port_and_count_cpu_of_the_group(workers: ServerProcess) -> None:
    stubs = _by_worker(workers.target)
    assert len(stubs) == 2, "connections reached one worker only"
    process = _stats(next(iter(stubs.values())))["process"]
    assert process["pid"] == workers.proc.pid  # the supervisor
    assert process["processes"] == 4  # supervisor, its redis-server, two workers
    assert process["cpu_s"] > 0


def test_an_outcome_reported_to_the_other_worker_counts_once(workers: ServerProcess) -> None:
    (pid_a, stub_a), (_, stub_b) = sorted(_by_worker(workers.target).items())
    before = _inferences(_stats(stub_b))
    rec = pb.RecommendRequest(request_id="w-shared-1", user_id=3, surface="ecommerce_recommendation", k=5)
    assert len(stub_a.Recommend(rec, timeout=30).items) == 5
    # Worker A sends its inference to the shared Redis in the background; B sees it there.
    seen_by_b = lambda: _inferences(_stats(stub_b)) >= before + 1  # noqa: E731
    wait_until(seen_by_b, "worker A's inference in worker B's stats", timeout_s=WAIT_S)
    batch = pb.ReportOutcomesRequest(
        outcomes=[
            pb.Outcome(request_id="w-shared-1", item_id=1, event=pb.EVENT_CLICK),
            pb.Outcome(request_id="w-shared-1", item_id=1, event=pb.EVENT_CONVERSION, revenue=4.25),
        ]
    )
    first = stub_b.ReportOutcomes(batch, timeout=30)
    assert (first.accepted, first.duplicates, first.unknown_requests) == (2, 0, 0)
    again = stub_a.ReportOutcomes(batch, timeout=30)
    assert (again.accepted, again.duplicates) == (0, 2)
    revenue = sum(paths.get("full", {}).get("revenue", 0.0) for paths in _stats(stub_a)["segments"].values())
    assert revenue == pytest.approx(4.25)
    assert pid_a != _stats(stub_b)["process"]["worker_pid"]


def test_a_killed_worker_is_restarted_and_the_other_keeps_serving(workers: ServerProcess) -> None:
    stubs = _by_worker(workers.target)
    victim, survivor = sorted(stubs)
    os.kill(victim, signal.SIGKILL)
    rec = pb.RecommendRequest(request_id="w-survivor", user_id=5, surface="ecommerce_recommendation", k=3)
    assert len(stubs[survivor].Recommend(rec, timeout=30).items) == 3

    def new_workers() -> set[int]:
        try:
            return set(_by_worker(workers.target)) - {victim, survivor}
        except grpc.RpcError:  # a connection queued on the killed worker's socket is reset
            return set()

    restarted = wait_until(new_workers, "a restarted worker", timeout_s=WAIT_S)
    assert len(restarted) == 1
    assert workers.proc.poll() is None


def test_value_aware_workers_learn_from_each_other_and_sigterm_drains_every_worker(
    serving_assets: Any,
) -> None:
    require_binaries()
    flags = ["--workers", "2", "--policy", "value_aware", "--budget-share", "0.5"]
    server = start_serve(serving_assets.model_dir, serving_assets.index_dir, flags)
    try:
        (pid_a, stub_a), (pid_b, stub_b) = sorted(_by_worker(server.target).items())
        for i in range(150):  # A serves; B serves one request (its exchange starts with it)
            rec = pb.RecommendRequest(
                request_id=f"learn-{i}", user_id=i, surface="ecommerce_recommendation", k=5
            )
            (stub_b if i == 0 else stub_a).Recommend(rec, timeout=30)

        def learnt_from_a() -> dict[str, Any] | None:
            model = _stats(stub_b)["router"]["value_model"]
            return model if model["peers"] == 1 and model["peer_labels"] > 0 else None

        b_model = wait_until(learnt_from_a, "worker A's labels in worker B's router", timeout_s=WAIT_S)
        a_model = _stats(stub_a)["router"]["value_model"]
        assert b_model["shared"] and a_model["shared"]
        # What B holds of A is A's own labels at some exchange: never more, never counted twice.
        assert b_model["peer_labels"] <= a_model["labels"] - a_model["peer_labels"]
        pids = {pid_a, pid_b}
    finally:
        server.stop()
    assert server.exit_code == 0
    for pid in pids:  # no orphaned worker left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
