"""`valuerank routing-stats`: a server's per-segment revenue per inference, uplift, lambda and
budget use (the GetRoutingStats RPC), as a table or as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc

from serving.edge.client import RecommenderClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank routing-stats", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of the call in seconds")
    parser.add_argument("--json", action="store_true", help="print the full snapshot as JSON")
    args = parser.parse_args(argv)
    try:
        stats = asyncio.run(_fetch(args.target, args.timeout))
    except grpc.aio.AioRpcError as exc:
        print(f"routing-stats: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats))
    else:
        print(format_table(stats))
    return 0


async def _fetch(target: str, timeout_s: float) -> dict[str, Any]:
    async with RecommenderClient(target) as client:
        return await client.routing_stats(timeout_s=timeout_s)


def format_table(stats: dict[str, Any]) -> str:
    """One line per segment and path: inferences, compute, revenue per inference."""
    router = stats.get("router", {})
    lines = [
        f"policy {router.get('policy', '?')}  lambda {router.get('lambda', 0.0):.4g}  "
        f"budget use {router.get('budget_use', 0.0):.2f}",
        f"{'segment':<30}{'path':>6}{'inferences':>12}{'compute ms':>12}{'revenue':>10}{'$/inference':>13}",
    ]
    for segment, paths in sorted(stats.get("segments", {}).items()):
        for path, cell in sorted(paths.items()):
            n = cell.get("inferences", 0.0)
            revenue = cell.get("revenue", 0.0)
            per = revenue / n if n else 0.0
            compute = cell.get("compute_ms", 0.0)
            lines.append(f"{segment:<30}{path:>6}{n:>12.0f}{compute:>12.1f}{revenue:>10.2f}{per:>13.4f}")
    return "\n".join(lines)
