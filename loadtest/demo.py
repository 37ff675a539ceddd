"""`valuerank demo`: the whole system end to end on embedded defaults.

1. build the synthetic world's logs, train the DLRM, build the retrieval index (each stage
   reuses its artifact when the config is unchanged);
2. start ``valuerank serve`` as a child process on a free port and wait until it is SERVING;
3. drive a burst of Recommend calls (the world's replay requests, a few in flight at once)
   and report outcomes drawn from the world's ground truth for every shown slate;
4. print per-surface latency and revenue per inference, then stop the server gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlrm.train import train_world
from dlrm.world import Requests, World, WorldConfig
from embeddings.index_stage import ensure_index
from embeddings.precision_bench import ensure_measured
from loadtest.live.servers import start_serve
from serving.domain import Outcome, Query, Recommendation
from serving.edge.client import RecommenderClient


@dataclass
class SurfaceReport:
    latencies_ms: list[float] = field(default_factory=list)
    paths: dict[str, int] = field(default_factory=dict)
    realised_revenue: float = 0.0
    expected_revenue: float = 0.0

    def add(self, rec: Recommendation, latency_ms: float) -> None:
        self.latencies_ms.append(latency_ms)
        self.paths[rec.path] = self.paths.get(rec.path, 0) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank demo", description=__doc__)
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument("--requests", type=int, default=1500, help="Recommend calls to drive")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight at once")
    parser.add_argument("--k", type=int, default=10, help="items per response")
    parser.add_argument("--policy", default="value_aware", help="routing policy of the server")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")

    started = time.perf_counter()
    config = WorldConfig.load(args.world)
    model = train_world(config, args.artifacts)
    index_dir = ensure_index(config, args.artifacts)
    ensure_measured(model)  # `valuerank bench precision`: the server reads its choice at start-up
    world = World(config)
    print(
        f"demo: model {model.version} (test AUC {model.metrics['test_auc']:.4f}, ground truth "
        f"{model.metrics['ground_truth_auc']:.4f}); index {index_dir}",
        file=sys.stderr,
    )

    server = start_serve(model.path, index_dir, ["--policy", args.policy])
    print(f"demo: server up at {server.target}", file=sys.stderr)
    try:
        summary = asyncio.run(_drive(world, server.target, args))
    finally:
        server.stop()
    summary["server_exit_code"] = server.exit_code
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary)
    return 0 if server.exit_code == 0 else 1


# -- the traffic --------------------------------------------------------------------------


def _query(world: World, req: Requests, i: int, k: int) -> Query:
    dense = world.dense_features(req.take(slice(i, i + 1)))[0]
    return Query(
        request_id=f"demo-{i}",
        user_id=int(req.user[i]),
        surface=world.surface_names[int(req.surface[i])],
        sparse={"hour": int(req.hour[i]), "device": int(req.device[i])},
        dense={
            name: float(v)
            for name, v in zip(world.schema.dense_names, dense, strict=True)
            if name != "user_log_activity"
        },
        k=k,
    )


async def _drive(world: World, target: str, args: argparse.Namespace) -> dict[str, object]:
    logs_rng = np.random.default_rng(world.config.seed + 7)
    requests = world.sample_requests(args.requests, logs_rng)
    outcome_rng = np.random.default_rng(world.config.seed + 8)
    per_surface = {name: SurfaceReport() for name in world.surface_names}
    accepted = duplicates = 0
    failures: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)

    async with RecommenderClient(target) as client:

        async def worker() -> None:
            nonlocal accepted, duplicates
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    rec = await client.recommend(_query(world, requests, i, args.k), timeout_s=2.0)
                except Exception as exc:
                    failures.append(f"request {i}: {exc}")
                    continue
                latency = (time.perf_counter() - t0) * 1000.0
                one = requests.take(slice(i, i + 1))
                slate = rec.item_ids[None, :]
                report = per_surface[world.surface_names[int(requests.surface[i])]]
                report.add(rec, latency)
                report.expected_revenue += float(world.expected_revenue(one, slate)[0])
                events = world.sample_outcomes(one, slate, outcome_rng)[0]
                outcomes = [Outcome(rec.request_id, item, event, revenue) for item, event, revenue in events]
                report.realised_revenue += sum(o.revenue for o in outcomes)
                result = await client.report_outcomes(outcomes)
                accepted += result.accepted
                duplicates += result.duplicates

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        stats = await client.routing_stats()

    surfaces = {}
    for name, rep in per_surface.items():
        n = len(rep.latencies_ms)
        if n == 0:
            continue
        lat = np.array(rep.latencies_ms)
        surfaces[name] = {
            "requests": n,
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "full_share": round(rep.paths.get("full", 0) / n, 3),
            "revenue_per_inference": round(rep.realised_revenue / n, 4),
            "expected_revenue_per_inference": round(rep.expected_revenue / n, 4),
        }
    all_lat = np.concatenate([np.array(r.latencies_ms) for r in per_surface.values() if r.latencies_ms])
    return {
        "requests": len(all_lat),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "throughput_rps": round(len(all_lat) / elapsed, 1),
        "p50_ms": round(float(np.percentile(all_lat, 50)), 2),
        "p99_ms": round(float(np.percentile(all_lat, 99)), 2),
        "outcomes_accepted": accepted,
        "outcomes_duplicates": duplicates,
        "surfaces": surfaces,
        "routing": stats,
    }


def _print_table(summary: dict[str, object]) -> None:
    surfaces = summary["surfaces"]
    assert isinstance(surfaces, dict)
    header = (
        f"{'surface':<26}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'full %':>8}"
        f"{'$/inference':>13}{'expected $':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, row in surfaces.items():
        print(
            f"{name:<26}{row['requests']:>9}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
            f"{100 * row['full_share']:>7.0f}%{row['revenue_per_inference']:>13.4f}"
            f"{row['expected_revenue_per_inference']:>12.4f}"
        )
    print("-" * len(header))
    print(
        f"{summary['requests']} requests ({summary['failures']} failed) at "
        f"{summary['throughput_rps']} req/s, "
        f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms; outcomes accepted "
        f"{summary['outcomes_accepted']}, duplicates {summary['outcomes_duplicates']}; "
        f"server exit code {summary['server_exit_code']}; {summary['total_seconds']} s in all"
    )
