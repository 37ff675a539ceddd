"""`valuerank loadtest`: open-loop Recommend load against a server, from processes of its own.

Arrivals are scheduled before the run (Poisson or evenly spaced, at ``--rps`` for ``--duration``
seconds) and each request's latency is measured from its *intended* send time, so a slow server
cannot slow the generator into flattering it (no coordinated omission). Each worker process
sends its share of the schedule on one asyncio loop and never waits for a reply before the next
send; when it falls behind its schedule it says so (``generator.late_sends``, ``kept_up``).

Traffic follows the world: surfaces in the world's shares, users drawn Zipf by activity, k and
the number of candidates as given. The report: achieved ok requests per second (goodput),
latency percentiles from an HDR histogram, errors by status code and the path mix; a progress
line each second on stderr; ``--json`` for one JSON object.

Not yet here (issue 9): outcomes drawn from the world and reported back, profiles other than
steady, ``--plot``, ``--find-capacity`` and the overload scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import queue
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from hdrh.histogram import HdrHistogram

from dlrm.configs import add_flags, from_flags

LATE_MS = 5.0
"""A send this much behind its intended time counts as late: the generator did not keep up."""
MAX_LATENCY_US = 60_000_000
"""Largest latency the histogram holds (60 s), at 3 significant digits."""


@dataclass(frozen=True)
class LoadConfig:
    target: str = "127.0.0.1:50051"
    """Server address, host:port (loopback only)."""
    rps: float = 100.0
    """Offered load: requests per second, all worker processes together."""
    duration: float = 10.0
    """Seconds of load."""
    arrivals: Literal["poisson", "constant"] = "poisson"
    """Poisson arrivals (exponential gaps) or evenly spaced ones."""
    deadline_ms: float = 1000.0
    """Deadline of each Recommend call."""
    k: int = 10
    """Items per slate."""
    candidates: int = 500
    """Candidates retrieved per request (num_candidates)."""
    processes: int = 1
    """Worker processes sending the load (each takes rps / processes)."""
    seed: int = 0
    """Seed of arrivals, users and surfaces."""
    world: str | None = None
    """World config whose surface mix and user activity the traffic follows (None: bundled)."""

    def __post_init__(self) -> None:
        host = self.target.rpartition(":")[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError(f"{self.target=} must be a loopback address (127.0.0.1:PORT)")
        if not 0.0 < self.rps <= 100_000.0:
            raise ValueError(f"{self.rps=} must be in (0, 100000]")
        if not 0.0 < self.duration <= 3600.0:
            raise ValueError(f"{self.duration=} must be in (0, 3600]")
        if self.arrivals not in ("poisson", "constant"):
            raise ValueError(f"{self.arrivals=} must be poisson or constant")
        if self.deadline_ms <= 0:
            raise ValueError(f"{self.deadline_ms=} must be > 0")
        if not 1 <= self.k <= self.candidates <= 10_000:
            raise ValueError(f"{self.k=} and {self.candidates=} must satisfy 1 <= k <= candidates <= 10000")
        if not 1 <= self.processes <= 64:
            raise ValueError(f"{self.processes=} must be in 1..64")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank loadtest", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_flags(parser, LoadConfig)
    args = parser.parse_args(argv)
    try:
        config = from_flags(LoadConfig, args)
    except ValueError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    report = run_load(config, progress=True)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def arrival_offsets(rps: float, duration: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Intended send times, seconds from the start, sorted, all in ``[0, duration)``."""
    if kind == "constant":
        return np.arange(int(rps * duration)) / rps
    n = rng.poisson(rps * duration)
    return np.sort(rng.uniform(0.0, duration, n))  # a Poisson process, conditioned on its count


def run_load(config: LoadConfig, *, progress: bool = False) -> dict[str, Any]:
    """Drive the load from ``config.processes`` worker processes and merge what they measured."""
    ctx = mp.get_context("spawn")  # a clean interpreter: nothing of the caller's threads or loops
    sent = ctx.Value("q", 0)
    done = ctx.Value("q", 0)
    ready = ctx.Barrier(config.processes + 1)
    results = ctx.Queue()
    start_at = ctx.Value("d", 0.0)
    workers = [
        ctx.Process(target=_worker, args=(config, i, sent, done, ready, start_at, results), daemon=True)
        for i in range(config.processes)
    ]
    for w in workers:
        w.start()
    ready.wait(timeout=120.0)  # every worker has imported and connected
    with start_at.get_lock():
        start_at.value = time.time() + 0.2
    ready.wait(timeout=10.0)
    parts: list[dict[str, Any]] = []
    last = 0.0
    while len(parts) < config.processes:
        with contextlib.suppress(queue.Empty):  # nothing yet: report progress
            part = results.get(timeout=1.0)
            if "failed" in part:
                raise RuntimeError(f"load worker {part['index']} failed:\n{part['failed']}")
            parts.append(part)
        dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if dead and results.empty():
            raise RuntimeError(f"a load worker died (exit code {dead[0]}) before reporting")
        elapsed = time.time() - start_at.value
        if progress and elapsed - last >= 1.0:
            last = elapsed
            print(
                f"loadtest: {min(elapsed, config.duration):5.1f}/{config.duration:.0f} s  "
                f"sent {sent.value}  answered {done.value}",
                file=sys.stderr,
                flush=True,
            )
    for w in workers:
        w.join(timeout=10.0)
    return merge(config, parts)


def _worker(
    config: LoadConfig,
    index: int,
    sent: Any,
    done: Any,
    ready: Any,
    start_at: Any,
    results: Any,
) -> None:
    try:
        results.put(asyncio.run(_drive(config, index, sent, done, ready, start_at)))
    except BaseException:  # the parent must hear of it, not wait for a report that never comes
        results.put({"index": index, "failed": traceback.format_exc()})
        raise


async def _drive(
    config: LoadConfig, index: int, sent: Any, done: Any, ready: Any, start_at: Any
) -> dict[str, Any]:
    # Imported in the worker only: the parent process needs none of the client stack.
    import grpc

    from dlrm.world import WorldConfig
    from serving.domain import Query
    from serving.edge.client import RecommenderClient

    rng = np.random.default_rng([config.seed, index])
    offsets = arrival_offsets(config.rps / config.processes, config.duration, config.arrivals, rng)
    world = WorldConfig.load(Path(config.world) if config.world else None)
    shares = np.array([s.share for s in world.surfaces])
    surfaces = rng.choice(len(world.surfaces), size=len(offsets), p=shares / shares.sum())
    users = rng.zipf(1.0 + max(world.user_activity_zipf - 1.0, 0.05), size=len(offsets)) - 1
    histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
    errors: Counter[str] = Counter()
    paths: Counter[str] = Counter()
    lags: list[float] = []
    timeout_s = config.deadline_ms / 1000.0

    async with RecommenderClient(config.target) as client:
        await client.routing_stats(timeout_s=30.0)  # connected and serving before the clock starts
        await asyncio.get_running_loop().run_in_executor(None, ready.wait, 120.0)
        await asyncio.get_running_loop().run_in_executor(None, ready.wait, 10.0)
        t0 = start_at.value

        async def one(i: int, intended: float) -> None:
            query = Query(
                request_id=f"lt{config.seed}-{index}-{i}",
                user_id=int(users[i] % 1_000_000),
                surface=world.surfaces[int(surfaces[i])].name,
                sparse={},
                dense={},
                k=config.k,
                num_candidates=config.candidates,
            )
            try:
                rec = await client.recommend(query, timeout_s=timeout_s)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            else:
                histogram.record_value(max(1, int((time.time() - intended) * 1e6)))
                paths[rec.path] += 1
            with done.get_lock():
                done.value += 1

        tasks = []
        for i, offset in enumerate(offsets):
            intended = t0 + float(offset)
            wait = intended - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            lags.append(max(0.0, time.time() - intended) * 1000.0)
            tasks.append(asyncio.create_task(one(i, intended)))
            with sent.get_lock():
                sent.value += 1
        await asyncio.gather(*tasks)
    return {
        "histogram": histogram.encode().decode("ascii"),
        "offered": len(offsets),
        "errors": dict(errors),
        "paths": dict(paths),
        "late_sends": int(sum(lag > LATE_MS for lag in lags)),
        "max_lag_ms": max(lags, default=0.0),
    }


def merge(config: LoadConfig, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the workers' results (histograms added, counters summed)."""
    histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
    errors: Counter[str] = Counter()
    paths: Counter[str] = Counter()
    for part in parts:
        histogram.decode_and_add(part["histogram"])
        errors.update(part["errors"])
        paths.update(part["paths"])
    offered = sum(p["offered"] for p in parts)
    ok = histogram.get_total_count()
    late = sum(p["late_sends"] for p in parts)
    return {
        "config": asdict(config),
        "offered": offered,
        "offered_rps": offered / config.duration,
        "ok": ok,
        "achieved_rps": ok / config.duration,
        "latency_ms": {
            name: histogram.get_value_at_percentile(pct) / 1000.0
            for name, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
        }
        | {"max": histogram.get_max_value() / 1000.0},
        "errors": dict(errors),
        "error_share": sum(errors.values()) / offered if offered else 0.0,
        "paths": dict(paths),
        "generator": {
            "late_sends": late,
            "max_lag_ms": max((p["max_lag_ms"] for p in parts), default=0.0),
            "kept_up": late <= 0.001 * max(offered, 1),
        },
    }


def format_report(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    gen = report["generator"]
    lines = [
        f"offered {report['offered_rps']:.1f} req/s ({report['offered']} requests), "
        f"ok {report['achieved_rps']:.1f} req/s",
        "latency ms (from intended send): " + "  ".join(f"{k} {v:.2f}" for k, v in lat.items()),
        f"errors {report['errors'] or 0}  paths {report['paths']}",
        f"generator: {gen['late_sends']} sends more than {LATE_MS:g} ms late (max {gen['max_lag_ms']:.1f} ms)"
        + ("" if gen["kept_up"] else "  -- it did NOT keep up with the offered rate"),
    ]
    return "\n".join(lines)
