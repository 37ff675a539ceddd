"""Prometheus metrics of a pipeline (``prometheus_client``), on HTTP with ``valuerank serve --metrics-port``.

Two kinds, so that the hot path pays only for what must be counted per request:

* per request, observed as it is answered: latency by path and surface, queue wait by path;
* at scrape time, read from the pipeline's own counters (``Pipeline.routing_stats``): admission
  (admitted, degraded, fallback, refused by reason), the event loop's lag, lambda and budget use,
  batches and mean batch size per batcher, the embedding store's cache hit rate, and per
  segment and path the inferences, revenue per inference and revenue per CPU-second.

Each pipeline has its own ``CollectorRegistry``: two servers in one process (tests) never share
series.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.domain import Recommendation

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ServingMetrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """``snapshot``: the pipeline's ``routing_stats`` (read at each scrape, off the event loop)."""
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "valuerank_request_latency_seconds",
            "Recommend latency inside the server, by the path that answered and the calling surface",
            ["path", "surface"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "valuerank_queue_wait_seconds",
            "Time a request waited for its batch to start computing, by path",
            ["path"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshot))

    def observe(self, rec: Recommendation, surface: str) -> None:
        self.latency.labels(rec.path, surface).observe(rec.timings.total_ms / 1000.0)
        self.queue_wait.labels(rec.path).observe(rec.timings.queue_ms / 1000.0)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        stats = self.snapshot()
        admission = stats.get("admission", {})
        decisions = CounterMetricFamily(
            "valuerank_admission", "Requests by what admission did with them", labels=["outcome"]
        )
        for name, value in sorted(admission.items()):
            if name not in ("in_flight", "loop_lag_ms", "slo_ms"):
                decisions.add_metric([name], float(value))
        yield decisions
        yield GaugeMetricFamily(
            "valuerank_in_flight", "Requests inside the pipeline", admission.get("in_flight", 0)
        )
        yield GaugeMetricFamily(
            "valuerank_loop_lag_seconds",
            "Event-loop lag (how late a short timer fires)",
            admission.get("loop_lag_ms", 0.0) / 1000.0,
        )
        router = stats.get("router", {})
        yield GaugeMetricFamily(
            "valuerank_lambda", "The router's price of a full-path millisecond", _num(router.get("lambda"))
        )
        yield GaugeMetricFamily(
            "valuerank_budget_use",
            "Compute used over the budget (1 = on budget)",
            _num(router.get("budget_use")),
        )
        batches = CounterMetricFamily("valuerank_batches", "Batches computed, by batcher", labels=["batcher"])
        mean_size = GaugeMetricFamily(
            "valuerank_batch_size_mean", "Mean requests per batch", labels=["batcher"]
        )
        for name, b in sorted(stats.get("batches", {}).items()):
            batches.add_metric([name], float(b["batches"]))
            mean_size.add_metric([name], b["items"] / b["batches"] if b["batches"] else 0.0)
        yield batches
        yield mean_size
        store = stats.get("embedding_store")
        if store is not None:
            yield GaugeMetricFamily(
                "valuerank_cache_hit_rate",
                "Hot-row cache hit rate of the item embedding store",
                _num(store.get("hit_rate")),
            )
        inferences = CounterMetricFamily(
            "valuerank_inferences", "Inferences by segment and path", labels=["segment", "path"]
        )
        per_inference = GaugeMetricFamily(
            "valuerank_revenue_per_inference", "Realised revenue per inference", labels=["segment", "path"]
        )
        per_cpu_s = GaugeMetricFamily(
            "valuerank_revenue_per_cpu_second",
            "Realised revenue per CPU-second of scoring",
            labels=["segment", "path"],
        )
        for segment, paths in sorted(stats.get("segments", {}).items()):
            for path, cell in sorted(paths.items()):
                n = float(cell.get("inferences", 0.0))
                revenue = float(cell.get("revenue", 0.0))
                cpu_s = float(cell.get("compute_ms", 0.0)) / 1000.0
                inferences.add_metric([segment, path], n)
                per_inference.add_metric([segment, path], revenue / n if n else 0.0)
                per_cpu_s.add_metric([segment, path], revenue / cpu_s if cpu_s else 0.0)
        yield inferences
        yield per_inference
        yield per_cpu_s


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0
