"""The Prometheus endpoint of a real server, scraped over HTTP after real Recommend and ReportOutcomes."""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.config import ScoringConfig, ServeConfig

if TYPE_CHECKING:
    from conftest import ServingFolder

pytestmark = pytest.mark.integration
SURFACE = "ecommerce_recommendation"


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_by_path_and_surface_and_revenue_by_segment(
    serving_assets: ServingFolder, start_grpc_server: Any
) -> None:
    config = ServeConfig(
        port=0, metrics_port=0, scoring=ScoringConfig(precision="fp32", mlp_precision="fp32")
    )
    server = start_grpc_server(serving_assets.load(), config).wait_serving()
    assert server.server is not None and server.server.metrics_port is not None
    port = server.server.metrics_port
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        replies = [
            stub.Recommend(pb.RecommendRequest(user_id=u, surface=SURFACE, k=5, force_path=path), timeout=10)
            for u, path in [(1, "full"), (2, "full"), (3, "cheap")]
        ]
        item = replies[0].items[0].item_id
        outcome = pb.Outcome(
            request_id=replies[0].request_id, item_id=item, event=pb.EVENT_CONVERSION, revenue=2.5
        )
        assert stub.ReportOutcomes(pb.ReportOutcomesRequest(outcomes=[outcome]), timeout=10).accepted == 1
    samples = _scrape(port)
    count = "valuerank_request_latency_seconds_count"
    assert samples[(count, (("path", "full"), ("surface", SURFACE)))] == 2
    assert samples[(count, (("path", "cheap"), ("surface", SURFACE)))] == 1
    assert samples[("valuerank_admission_total", (("outcome", "admitted"),))] == 3
    segment = replies[0].routing.segment
    revenue = samples[("valuerank_revenue_per_inference", (("path", "full"), ("segment", segment)))]
    full_in_segment = sum(1 for r in replies if r.routing.segment == segment and r.path == "full")
    assert revenue == pytest.approx(2.5 / full_in_segment)
    assert samples[("valuerank_batches_total", (("batcher", "full"),))] >= 1
    assert ("valuerank_loop_lag_seconds", ()) in samples and ("valuerank_lambda", ()) in samples


def test_the_metrics_port_is_off_unless_asked_and_binds_localhost_by_default() -> None:
    assert ServeConfig().metrics_port is None and ServeConfig().metrics_host == "127.0.0.1"
    with pytest.raises(ValueError, match="metrics_port"):
        ServeConfig(metrics_port=70000)
