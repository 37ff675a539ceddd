"""``valuerank loadtest --faults``: the operations a team performs every week, each under load with
outcomes reported, and the books checked afterwards.

One ``serve --workers N`` group (N >= 2) shares a tracker in a ``redis-server`` started here with
``appendonly yes`` / ``appendfsync always`` (what makes an acknowledged outcome durable). For each
row, the generator runs one stage at ``--rps`` for ``--duration`` seconds, and a third of the way in:

    baseline       nothing
    tracker_redis  the tracker's redis-server is killed (SIGKILL) and restarted 2 s later
    worker_kill    one worker is killed (SIGKILL); the supervisor starts another
    reload         Admin.ReloadModel (the served folder again) on whichever worker answers
    drain          SIGTERM to the supervisor: every worker drains, the group exits 0 (last row)

Afterwards the tracker's own books in Redis are read: ``recorded`` is the outcomes it holds (one
dedupe key each), ``counted`` the outcomes added to its revenue cells. Against the generator's
acknowledged outcomes (every outcome of a ReportOutcomes call that returned OK: accepted, or a
duplicate of a resend whose first reply was lost): ``lost`` = acknowledged - recorded, ``duplicated``
= counted - acknowledged attributed (a double count), both floored at 0 and both expected 0.
``unattributed`` counts outcomes recorded for a request the tracker did not know yet (kept, but
in no segment's revenue). Requests refused after a drain began are expected (UNAVAILABLE: the
group is going away; nothing else takes its traffic here).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.live.loadgen import LoadConfig, LoadWorkers
from loadtest.live.servers import ServerProcess, start_serve
from serving.edge.client import RecommenderClient
from serving.revenue.local_redis import RedisProcess, free_port, require_binaries

FAULTS = ("baseline", "tracker_redis", "worker_kill", "reload", "drain")
PREFIX = "vr-faults:"
OUTAGE_S = 2.0
TOKEN_ENV = "VALUERANK_ADMIN_TOKEN"


def run_faults(config: LoadConfig, model_dir: Path, index_dir: Path, workers: int = 2) -> dict[str, Any]:
    """Every fault of ``FAULTS`` in order, one stage each; the table's rows."""
    require_binaries()
    token = os.environ.get(TOKEN_ENV) or f"faults-{os.getpid()}-{time.time_ns()}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="vr-faults-") as tmp:
        redis = RedisProcess(free_port(), Path(tmp), "--appendonly", "yes", "--appendfsync", "always")
        redis.start()
        tracker = Path(tmp) / "tracker.json"
        tracker.write_text(
            json.dumps({"type": "redis", "url": f"redis://{redis.address}/0", "key_prefix": PREFIX})
        )
        flags = ["--workers", str(max(workers, 2)), "--tracker-config", str(tracker), "--grace-s", "5"]
        os.environ[TOKEN_ENV] = token  # the group inherits it: never on a command line
        server = start_serve(model_dir, index_dir, flags)
        try:
            with LoadWorkers(replace(config, target=server.target)) as load:
                for fault in FAULTS:
                    before = _books(redis)
                    injected: dict[str, Any] = {}
                    inject = threading.Thread(
                        target=_inject, args=(fault, server, redis, token, config.duration / 3, injected)
                    )
                    inject.start()
                    report = load.run(replace(config, target=server.target))
                    inject.join()
                    rows.append(_row(fault, report, before, _books(redis), injected))
                    print(format_fault_row(rows[-1]), file=sys.stderr, flush=True)  # progress
        finally:
            server.stop()
            redis.kill()
        rows[-1]["exit_code"] = server.exit_code
    return {"rps": config.rps, "duration_s": config.duration, "workers": max(workers, 2), "faults": rows}


def _inject(
    fault: str, server: ServerProcess, redis: RedisProcess, token: str, after_s: float, out: dict[str, Any]
) -> None:
    time.sleep(after_s)  # where in the stage the fault lands: a third of the way in
    out["at_s"] = after_s
    try:
        if fault == "tracker_redis":
            redis.kill()
            time.sleep(OUTAGE_S)  # the outage
            redis.start()
        elif fault == "worker_kill":
            pid = _stats(server.target)["process"]["worker_pid"]
            os.kill(pid, signal.SIGKILL)
            out["killed_pid"] = pid
        elif fault == "reload":
            reply = _call(server.target, lambda client: client.reload_model(token, timeout_s=120.0))
            out["model_version"] = reply["model_version"]
            out["load_s"] = round(reply["load_s"], 3)
            out["peak_over_steady_rss"] = round(
                reply["peak_rss_bytes"] / max(reply["steady_rss_bytes"], 1), 3
            )
        elif fault == "drain":
            server.proc.send_signal(signal.SIGTERM)
    except Exception as exc:  # reported in the row: a fault that could not be injected is a result
        out["inject_error"] = f"{type(exc).__name__}: {exc}"


def _call(target: str, call: Callable[[RecommenderClient], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with RecommenderClient(target) as client:
            return await call(client)

    return asyncio.run(run())


def _stats(target: str) -> dict[str, Any]:
    return dict(_call(target, lambda client: client.routing_stats(timeout_s=30.0)))


def _books(redis: RedisProcess) -> dict[str, float]:
    """What the tracker holds in Redis: outcomes recorded (dedupe keys) and counted in its cells."""
    client = redis.client()
    try:
        recorded = sum(1 for _ in client.scan_iter(match=PREFIX + "seen:*", count=10_000))
        counted = 0.0
        for member in client.smembers(PREFIX + "cells"):
            name = member.decode() if isinstance(member, bytes) else str(member)
            counted += float(client.hget(PREFIX + "cell:" + name, "outcomes") or 0.0)
        return {"recorded": recorded, "counted": counted}
    finally:
        client.close()


def _row(
    fault: str,
    report: dict[str, Any],
    before: dict[str, float],
    after: dict[str, float],
    injected: dict[str, Any],
) -> dict[str, Any]:
    out = report.get("outcomes", {})
    acknowledged = int(out.get("accepted", 0) + out.get("duplicates", 0))
    attributed = acknowledged - int(out.get("unknown_requests", 0))
    recorded = int(after["recorded"] - before["recorded"])
    counted = round(after["counted"] - before["counted"])
    return {
        "fault": fault,
        **injected,
        "offered": report["offered"],
        "ok": report["ok"],
        "failed": report["offered"] - report["ok"],
        "errors": report["errors"],
        "paths": report.get("paths", {}),
        "p99_ms": report["latency_ms"]["p99"],
        "outcomes_sent": int(out.get("sent", 0)),
        "outcomes_refused_then_retried": int(out.get("retried", 0)),
        "outcomes_failed": int(out.get("failed", 0)),
        "acknowledged": acknowledged,
        "recorded": recorded,
        "counted": counted,
        # Recorded for a request the tracker did not know yet (its inference still in another
        # worker's buffer, or served during the outage): kept, but not in any segment's revenue.
        "unattributed": recorded - counted,
        "lost": max(acknowledged - recorded, 0),
        "duplicated": max(counted - attributed, 0),
    }


def format_fault_row(row: dict[str, Any]) -> str:
    return (
        f"{row['fault']:>13}: {row['ok']}/{row['offered']} requests ok"
        f" ({row['failed']} failed {row['errors']}), p99 {row['p99_ms']:.0f} ms;"
        f" outcomes acknowledged {row['acknowledged']}, recorded {row['recorded']}, "
        f"lost {row['lost']}, duplicated {row['duplicated']}, unattributed {row['unattributed']}"
        f" (refused and retried {row['outcomes_refused_then_retried']}, failed {row['outcomes_failed']})"
    )


def format_faults(result: dict[str, Any]) -> str:
    head = f"faults at {result['rps']:g} req/s, {result['duration_s']:g} s each"
    head += f", serve --workers {result['workers']}"
    return "\n".join([head, *(format_fault_row(r) for r in result["faults"])])
