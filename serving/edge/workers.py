"""``serve --workers N``: N server processes on one port, and the supervisor that runs them.

One Python process serves from one core at most (its event loop holds the GIL); N workers that
bind one port with ``grpc.so_reuseport`` let the kernel spread connections over N cores. The
supervisor:

1. builds once what every worker would otherwise build: in ``--artifacts`` mode it trains the
   model and builds the index, then hands the workers ``--model`` / ``--index``;
2. gives them one revenue tracker: the configured Redis one, or, with the embedded default (the
   in-process tracker cannot be shared), a private ``redis-server`` of its own on a free port;
   with an outcome log configured that Redis keeps an append-only file (``appendfsync always``)
   beside it, so an acknowledged outcome stays durable;
3. starts the workers (``--workers 1 --reuse-port`` on one port chosen up front; metrics on
   consecutive ports), prints ``serving on HOST:PORT`` once every worker is SERVING, restarts a
   worker that dies, and on SIGINT / SIGTERM has every worker drain, then exits with the worst
   worker's code.

Each worker's router learns from the requests it serves (connections land on workers at random,
so each sees the same mix). GetRoutingStats answers from one worker; its ``process`` section
(``serving.edge.process``) counts the CPU time of the whole group, so a load generator's server
CPU per request stays right.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serving.config import ServeConfig
from serving.edge.process import SUPERVISOR_ENV
from serving.revenue.config import MemoryTrackerConfig, RedisTrackerConfig
from serving.revenue.local_redis import RedisProcess, free_port, require_binaries

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
"""How long a worker may take to load the model and index and say ``serving on``."""
RESTART_PAUSE_S = 1.0
"""Pause before restarting a worker that died (a worker that dies on start does not spin)."""


def run_workers(
    config: ServeConfig,
    command: Sequence[str],
    argv: Sequence[str],
    model: Path,
    index: Path,
    tracker_file: Path | None,
) -> int:
    """Serve ``config`` with ``config.workers`` worker processes until SIGINT or SIGTERM.

    ``command`` starts one server (``python -m serving.commands.serve``: the caller's, so that
    this module does not depend on the command that depends on it); ``argv`` is the supervisor's
    own command line: each worker gets it with the overrides that make it one worker of the
    group appended (argparse keeps the last value of a flag)."""
    with contextlib.ExitStack() as stack:
        tracker, redis = _shared_tracker(config, stack)
        if tracker is not None:
            tracker_file = _write_json(stack, asdict(tracker))
        port = config.port or free_port()
        group = _WorkerGroup(config, list(command), list(argv), model, index, tracker_file, port)
        stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        try:
            group.start_all(stopping)
        except RuntimeError as exc:
            print(f"serve: error: {exc}", file=sys.stderr)
            group.stop_all(config.grace_s)
            return 1
        if stopping.is_set():
            return group.stop_all(config.grace_s)
        redis_note = f", tracker on redis {redis.address}" if redis is not None else ""
        print(f"workers: {config.workers} (pids {group.pids()}){redis_note}", flush=True)
        print(f"serving on {config.host}:{port}", flush=True)
        while not stopping.wait(0.5):
            group.restart_dead(stopping)
        log.info("stopping %d workers (grace %.1f s)", config.workers, config.grace_s)
        return group.stop_all(config.grace_s)


class _WorkerGroup:
    def __init__(
        self,
        config: ServeConfig,
        command: list[str],
        argv: list[str],
        model: Path,
        index: Path,
        tracker_file: Path | None,
        port: int,
    ) -> None:
        self.config = config
        self.command = command
        self.argv = argv
        self.model = model
        self.index = index
        self.tracker_file = tracker_file
        self.port = port
        self.procs: list[subprocess.Popen[str] | None] = [None] * config.workers

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def start_all(self, stopping: threading.Event) -> None:
        for i in range(len(self.procs)):
            if stopping.is_set():
                return
            self.procs[i] = self._start(i)

    def restart_dead(self, stopping: threading.Event) -> None:
        for i, proc in enumerate(self.procs):
            if proc is None or proc.poll() is None:
                continue
            log.warning("worker %d (pid %d) exited with %s; restarting it", i, proc.pid, proc.returncode)
            if stopping.wait(RESTART_PAUSE_S):
                return
            try:
                self.procs[i] = self._start(i)
            except RuntimeError as exc:  # the next pass tries again
                log.error("restarting worker %d failed: %s", i, exc)

    def stop_all(self, grace_s: float) -> int:
        live = [p for p in self.procs if p is not None]
        for proc in live:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in live:
            try:
                codes.append(proc.wait(grace_s + 30.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return max((abs(c) for c in codes), default=0)

    def _start(self, i: int) -> subprocess.Popen[str]:
        flags = [*self.argv, "--workers", "1", "--reuse-port", "--port", str(self.port)]
        flags += ["--model", str(self.model), "--index", str(self.index)]
        if self.tracker_file is not None:
            flags += ["--tracker-config", str(self.tracker_file)]
        if self.config.metrics_port is not None:
            metrics_port = self.config.metrics_port + i if self.config.metrics_port else 0
            flags += ["--metrics-port", str(metrics_port)]
        if self.config.decision_log is not None:  # one writer per file
            flags += ["--decision-log", f"{self.config.decision_log}.worker{i}"]
        proc = subprocess.Popen(
            [*self.command, *flags],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, SUPERVISOR_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        for line in proc.stdout:
            if line.startswith("serving on "):
                break
            print(f"[worker {i}] {line}", end="", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"worker {i} did not become ready in {READY_TIMEOUT_S:.0f} s")
        else:
            raise RuntimeError(f"worker {i} exited before serving (code {proc.wait()})")
        # The rest of its output is passed through by a thread, so that its pipe never fills.
        threading.Thread(target=_relay, args=(proc, i), daemon=True).start()
        return proc


def _shared_tracker(
    config: ServeConfig, stack: contextlib.ExitStack
) -> tuple[RedisTrackerConfig | None, RedisProcess | None]:
    """The tracker config the workers share, and the private Redis started for it (if any)."""
    tracker = config.tracker
    if isinstance(tracker, RedisTrackerConfig):
        return None, None  # the configured one: the workers get the same --tracker-config
    assert isinstance(tracker, MemoryTrackerConfig)
    require_binaries()
    durable = tracker.outcome_log is not None
    if durable:
        workdir = Path(str(tracker.outcome_log)).resolve().parent / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        extra: tuple[str, ...] = ("--appendonly", "yes", "--appendfsync", "always")
    else:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vr-workers-")))
        extra = ()
    redis = RedisProcess(free_port(), workdir, *extra, "--maxmemory-policy", "noeviction")
    redis.start()
    stack.callback(redis.kill)
    shared = RedisTrackerConfig(
        url=f"redis://{redis.address}/0",
        half_life_s=tracker.half_life_s,
        request_ttl_s=tracker.request_ttl_s,
        dedupe_ttl_s=tracker.dedupe_ttl_s,
    )
    return shared, redis


def _write_json(stack: contextlib.ExitStack, data: dict[str, Any]) -> Path:
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vr-workers-")))
    path = folder / "tracker.json"
    path.write_text(json.dumps(data))
    return path


def _relay(proc: subprocess.Popen[str], i: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[worker {i}] {line}", end="", flush=True)
