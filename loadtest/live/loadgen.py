"""`valuerank loadtest`: open-loop Recommend load against a server, from processes of its own.

Arrivals are scheduled before each run (``loadtest.live.traffic``: Poisson or evenly spaced, in a
steady, step, spike or ramp profile) and each request's latency is measured from its *intended*
send time, so a slow server cannot slow the generator into flattering it (no coordinated
omission). Each worker process sends its share of the schedule on one asyncio loop from
requests encoded before the clock starts, never waits for a reply before the next send, and
says when it fell behind its schedule (``generator.late_sends``, ``kept_up``).

Traffic is the world's; outcomes for every shown slate are drawn from the world's ground truth
and reported back with ``ReportOutcomes`` in batches (retried when the server says UNAVAILABLE
or RESOURCE_EXHAUSTED: the tracker counts each outcome once), so revenue per inference is live,
per surface and per path. The report (``loadtest.live.report``): goodput, latency percentiles
from an HDR histogram, errors by status code, the path mix, expected and realised revenue per
inference and per second, the server's own CPU time per request (from its GetRoutingStats), and
per-second series for ``--plot``. The command is ``loadtest.live.command``; ``--find-capacity``
and ``--overload`` are in ``loadtest.live.capacity``.

The worker processes start once (imports, the world) and run any number of stages
(``LoadWorkers.run``), so a capacity search does not pay their start-up at every rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing as mp
import queue
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
from hdrh.histogram import HdrHistogram

from loadtest.live.report import MAX_LATENCY_US, merge
from loadtest.live.traffic import PROFILES, arrival_offsets, slate_values, world_queries

LATE_MS = 20.0
"""A send this much behind its intended time counts as late. Smaller lags are a shared machine's
scheduler slices (several busy processes on 2 cores) and are in the measured latency anyway,
which runs from the intended time; a send 20 ms late means the generator is falling behind."""
RPS_PER_PROCESS = 700.0
"""Offered rate one worker process sends comfortably (``processes=0`` divides by it)."""
OUTCOMES_PER_CALL = 500
"""Outcomes per ReportOutcomes call: a feed service's batch, not a whole second's events."""
RETRIED_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
"""ReportOutcomes failures that are retried: nothing was acknowledged, or it may have been (dedup)."""


@dataclass(frozen=True)
class LoadConfig:
    target: str = "127.0.0.1:50051"
    """Server address, host:port (loopback only)."""
    rps: float = 100.0
    """Offered load: requests per second, all worker processes together (the base rate of a profile)."""
    duration: float = 10.0
    """Seconds of load."""
    profile: Literal["steady", "step", "spike", "ramp"] = "steady"
    """Shape of the offered rate over the run (``loadtest.live.traffic``)."""
    peak: float = 3.0
    """Peak rate of the step, spike and ramp profiles, as a multiple of ``rps``."""
    arrivals: Literal["poisson", "constant"] = "poisson"
    """Poisson arrivals (exponential gaps) or evenly spaced ones."""
    deadline_ms: float = 1000.0
    """Deadline of each Recommend call."""
    k: int = 10
    """Items per slate."""
    candidates: int = 500
    """Candidates retrieved per request (num_candidates)."""
    outcomes: bool = True
    """Report outcomes drawn from the world's ground truth for every shown slate."""
    outcome_batch_ms: float = 100.0
    """Outcomes are sent in one ReportOutcomes call per this many milliseconds."""
    outcome_retry_s: float = 30.0
    """How long a refused ReportOutcomes (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) is
    retried, with backoff up to 1 s, before its outcomes count as failed."""
    request_start: bool = False
    """Send ``x-request-start`` (the send time) with each call, so the server spends the time a call
    queued before it saw it from the SLO and refuses calls that queued past it. Off by default: on
    a machine the generator shares, its own delays before the socket write count as queueing."""
    processes: int = 0
    """Worker processes sending the load (0: one per ~700 req/s of peak rate)."""
    connections: int = 4
    """TCP connections per worker process, requests spread over them in turn: several, as many
    callers would open, so that a server of several processes on one port (``serve --workers``)
    gets load on every one."""
    seed: int = 0
    """Seed of arrivals, requests and outcomes."""
    world: str | None = None
    """World config whose traffic and ground truth the run follows (None: bundled)."""

    def __post_init__(self) -> None:
        host = self.target.rpartition(":")[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError(f"{self.target=} must be a loopback address (127.0.0.1:PORT)")
        if not 0.0 < self.rps <= 100_000.0:
            raise ValueError(f"{self.rps=} must be in (0, 100000]")
        if not 0.0 < self.duration <= 3600.0:
            raise ValueError(f"{self.duration=} must be in (0, 3600]")
        if self.profile not in PROFILES:
            raise ValueError(f"{self.profile=} must be one of {PROFILES}")
        if not 1.0 <= self.peak <= 100.0:
            raise ValueError(f"{self.peak=} must be in [1, 100]")
        if self.arrivals not in ("poisson", "constant"):
            raise ValueError(f"{self.arrivals=} must be poisson or constant")
        if self.outcome_retry_s < 0:
            raise ValueError(f"{self.outcome_retry_s=} must be >= 0")
        if self.deadline_ms <= 0 or self.outcome_batch_ms <= 0:
            raise ValueError(f"{self.deadline_ms=} and {self.outcome_batch_ms=} must be > 0")
        if not 1 <= self.k <= self.candidates <= 10_000:
            raise ValueError(f"{self.k=} and {self.candidates=} must satisfy 1 <= k <= candidates <= 10000")
        if not 0 <= self.processes <= 64:
            raise ValueError(f"{self.processes=} must be in 0..64")
        if not 1 <= self.connections <= 64:
            raise ValueError(f"{self.connections=} must be in 1..64")

    @property
    def peak_rps(self) -> float:
        return self.rps * (1.0 if self.profile == "steady" else self.peak)

    @property
    def worker_processes(self) -> int:
        return self.processes or max(1, min(8, int(np.ceil(self.peak_rps / RPS_PER_PROCESS))))


def run_load(config: LoadConfig, *, progress: bool = False) -> dict[str, Any]:
    """One run of ``config`` from fresh worker processes."""
    with LoadWorkers(config) as workers:
        return workers.run(config, progress=progress)


class LoadWorkers:
    """Worker processes started once (imports, the world, a connection), then run stage after stage.

    Every stage may change the rate, duration, profile and deadline; the target, the world and
    the number of processes are fixed when the workers start.
    """

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.processes = config.worker_processes
        ctx = mp.get_context("spawn")  # a clean interpreter: nothing of the caller's threads or loops
        self._sent = ctx.Value("q", 0)
        self._done = ctx.Value("q", 0)
        self._results: Any = ctx.Queue()
        self._commands: list[Any] = [ctx.Queue() for _ in range(self.processes)]
        self._workers = [
            ctx.Process(
                target=_worker,
                args=(config, i, self.processes, self._commands[i], self._results, self._sent, self._done),
                daemon=True,
            )
            for i in range(self.processes)
        ]
        for w in self._workers:
            w.start()
        self._collect("ready", timeout_s=180.0)  # imported, world built, connected and served

    def __enter__(self) -> LoadWorkers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for commands in self._commands:
            with contextlib.suppress(Exception):
                commands.put(None)
        for w in self._workers:
            w.join(timeout=10.0)
            if w.is_alive():
                w.kill()

    def run(self, stage: LoadConfig, *, progress: bool = False, label: str = "") -> dict[str, Any]:
        """Drive one stage (``stage``'s rate, duration, profile, deadline, seed) and report it."""
        stage = replace(stage, target=self.config.target, world=self.config.world, processes=self.processes)
        tag = uuid.uuid4().hex[:8]  # request ids unique across stages and runs against one server
        with self._sent.get_lock(), self._done.get_lock():
            self._sent.value = self._done.value = 0
        for commands in self._commands:
            commands.put(("prepare", stage, tag))
        self._collect("prepared", timeout_s=120.0)
        before = _server_process_stats(stage.target)
        start_at = time.time() + 0.2
        for commands in self._commands:
            commands.put(("start", start_at))
        samples: list[tuple[float, dict[str, Any]]] = []
        parts = self._collect(
            "report",
            timeout_s=stage.duration + 3 * stage.deadline_ms / 1000.0 + 120.0,
            progress=(stage, start_at, label) if progress else None,
            sample=lambda: _sample_server(stage.target, start_at, samples),
        )
        after = _server_process_stats(stage.target)
        return merge(stage, parts, before, after, samples)

    def _collect(
        self,
        kind: str,
        timeout_s: float,
        progress: tuple[LoadConfig, float, str] | None = None,
        sample: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Wait for every worker's ``kind`` message, printing progress and calling ``sample``
        (the server's resident memory) every ``SAMPLE_S`` meanwhile."""
        parts: list[dict[str, Any]] = []
        deadline = time.time() + timeout_s
        last = 0.0
        sampled = 0.0
        while len(parts) < self.processes:
            with contextlib.suppress(queue.Empty):  # nothing yet: report progress
                part = self._results.get(timeout=0.5)
                if part.get("kind") == "failed":
                    raise RuntimeError(f"load worker {part['index']} failed:\n{part['traceback']}")
                parts.append(part)
            dead = [w.exitcode for w in self._workers if w.exitcode is not None]
            if dead and self._results.empty():
                raise RuntimeError(f"a load worker exited (code {dead[0]}) before its {kind!r} message")
            if time.time() > deadline:
                raise TimeoutError(f"load workers sent no {kind!r} message within {timeout_s:.0f} s")
            if sample is not None and time.time() - sampled >= SAMPLE_S:
                sampled = time.time()
                sample()
            if progress is not None:
                stage, start_at, label = progress
                elapsed = time.time() - start_at
                if elapsed - last >= 1.0:
                    last = elapsed
                    print(
                        f"loadtest{label}: {min(max(elapsed, 0.0), stage.duration):5.1f}"
                        f"/{stage.duration:.0f} s  "
                        f"sent {self._sent.value}  answered {self._done.value}",
                        file=sys.stderr,
                        flush=True,
                    )
        return parts


SAMPLE_S = 5.0
"""Seconds between samples of the server's resident memory during a stage."""


def _sample_server(target: str, start_at: float, samples: list[tuple[float, dict[str, Any]]]) -> None:
    stats = _server_process_stats(target)
    if stats is not None and time.time() >= start_at:
        samples.append((time.time() - start_at, stats))


def _server_process_stats(target: str) -> dict[str, Any] | None:
    """The server's ``process`` section of GetRoutingStats (its CPU time), or None if it has none."""
    from serving.edge.client import RecommenderClient

    async def fetch() -> dict[str, Any] | None:
        async with RecommenderClient(target) as client:
            stats = await client.routing_stats(timeout_s=30.0)
        process = stats.get("process")
        return dict(process) if isinstance(process, dict) else None

    try:
        return asyncio.run(fetch())
    except Exception:  # a server without the section, or one that stopped: the report says so
        return None


# -- the worker process ---------------------------------------------------------------------


def _worker(
    config: LoadConfig, index: int, processes: int, commands: Any, results: Any, sent: Any, done: Any
) -> None:
    try:
        asyncio.run(_serve_stages(config, index, processes, commands, results, sent, done))
    except BaseException:  # the parent must hear of it, not wait for a message that never comes
        results.put({"kind": "failed", "index": index, "traceback": traceback.format_exc()})
        raise


async def _serve_stages(
    config: LoadConfig, index: int, processes: int, commands: Any, results: Any, sent: Any, done: Any
) -> None:
    # Imported in the worker only: the parent process needs none of the world or the client stack.
    from dlrm.world import World, WorldConfig
    from serving.edge.client import RecommenderClient

    world = World(WorldConfig.load(Path(config.world) if config.world else None))
    loop = asyncio.get_running_loop()
    # A local subchannel pool per client: its own TCP connection (gRPC shares one otherwise).
    clients = [
        RecommenderClient(config.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(config.connections)
    ]
    try:
        for client in clients:  # connected and serving before any clock starts
            await client.routing_stats(timeout_s=60.0)
        results.put({"kind": "ready", "index": index})
        while True:
            command = await loop.run_in_executor(None, commands.get)
            if command is None:
                return
            _, stage, tag = command
            run = _Run(world, clients, stage, index, processes, tag, sent, done)
            results.put({"kind": "prepared", "index": index})
            _, start_at = await loop.run_in_executor(None, commands.get)
            # No collector pauses inside a measured stage (they would be counted as the server's
            # latency); the garbage of a bounded stage is collected after it.
            gc.collect()
            gc.disable()
            try:
                report = await run.drive(start_at)
            finally:
                gc.enable()
            results.put({"kind": "report", "index": index, **report})
    finally:
        for client in clients:
            await client.close()


class _Run:
    """One worker's share of one stage: its schedule, its encoded requests, what came back."""

    def __init__(
        self,
        world: Any,
        clients: list[Any],
        stage: LoadConfig,
        index: int,
        processes: int,
        tag: str,
        sent: Any,
        done: Any,
    ) -> None:
        from serving.edge.convert import encode_query

        self.world = world
        self.clients = clients
        self.stage = stage
        self.sent = sent
        self.done = done
        rng = np.random.default_rng([stage.seed, index])
        self.outcome_rng = np.random.default_rng([stage.seed, index, 1])
        self.offsets = arrival_offsets(
            stage.rps / processes, stage.duration, stage.arrivals, rng, stage.profile, stage.peak
        )
        self.requests = world.sample_requests(len(self.offsets), rng)
        queries = world_queries(world, self.requests, f"lt{tag}-{index}", stage.k, stage.candidates)
        self.request_ids = [q.request_id for q in queries]
        self.payloads = [encode_query(q) for q in queries]
        n = len(self.offsets)
        self.latency_ms = np.full(n, np.nan, dtype=np.float32)
        self.path = np.full(n, "", dtype=object)
        self.error = np.full(n, "", dtype=object)
        self.slates: dict[int, np.ndarray] = {}
        self.expected = np.full(n, np.nan)
        """Expected dollars of each answered request's slate under the world's ground truth."""
        self.realised = np.full(n, np.nan)
        """Dollars in the outcomes drawn for it."""
        self.histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
        self.refused = HdrHistogram(1, MAX_LATENCY_US, 3)
        self.unreported: list[int] = []
        self.outcome_counts: Counter[str] = Counter()
        self.stopping = False
        self.lags: list[float] = []

    async def drive(self, start_at: float) -> dict[str, Any]:
        import grpc

        timeout_s = self.stage.deadline_ms / 1000.0

        async def one(i: int, intended: float) -> None:
            try:
                sent_at = time.time() if self.stage.request_start else None
                reply = await self.clients[i % len(self.clients)].recommend_encoded(
                    self.payloads[i], timeout_s=timeout_s, sent_at=sent_at
                )
            except grpc.aio.AioRpcError as exc:
                self.error[i] = exc.code().name
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.refused.record_value(max(1, int((time.time() - intended) * 1e6)))
            else:
                latency = time.time() - intended
                self.histogram.record_value(max(1, int(latency * 1e6)))
                self.latency_ms[i] = latency * 1000.0
                self.path[i] = reply.path
                self.slates[i] = reply.item_ids
                self.unreported.append(i)
            with self.done.get_lock():
                self.done.value += 1

        reporter = asyncio.create_task(self._report_outcomes_every(self.stage.outcome_batch_ms / 1000.0))
        tasks = []
        for i, offset in enumerate(self.offsets):
            intended = start_at + float(offset)
            wait = intended - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.lags.append(max(0.0, time.time() - intended) * 1000.0)
            tasks.append(asyncio.create_task(one(i, intended)))
            with self.sent.get_lock():
                self.sent.value += 1
        await asyncio.gather(*tasks)
        self.stopping = True  # the reporter ends its round (a cancel could drop a batch in flight)
        await reporter
        await self._report_outcomes()  # what the last interval left
        return self._result()

    async def _report_outcomes_every(self, interval_s: float) -> None:
        while not self.stopping:
            await asyncio.sleep(interval_s)
            await self._report_outcomes()

    async def _report_outcomes(self) -> None:
        rows, self.unreported = self.unreported, []
        if not rows:
            return
        idx = np.asarray(rows)
        # The world's ground truth is numpy and Python loops over the slates: on a thread, so the
        # sending loop keeps its schedule.
        values = await asyncio.get_running_loop().run_in_executor(
            None,
            slate_values,
            self.world,
            self.requests.take(idx),
            [self.request_ids[i] for i in rows],
            [self.slates[i] for i in rows],
            self.outcome_rng,
        )
        self.expected[idx] = values.expected
        self.realised[idx] = values.realised
        if not self.stage.outcomes or not values.outcomes:
            return
        self.outcome_counts["sent"] += len(values.outcomes)
        for start in range(0, len(values.outcomes), OUTCOMES_PER_CALL):
            await self._send(values.outcomes[start : start + OUTCOMES_PER_CALL])

    async def _send(self, outcomes: list[Any]) -> None:
        """Until acknowledged, or ``outcome_retry_s`` has passed: an outage of the tracker (a Redis
        restart) is ridden out, and the tracker's dedupe makes every resend safe."""
        import grpc

        give_up = time.monotonic() + self.stage.outcome_retry_s
        attempt = 0
        while True:
            try:
                client = self.clients[attempt % len(self.clients)]  # a retry may reach another worker
                report = await client.report_outcomes(outcomes, timeout_s=5.0)
            except grpc.aio.AioRpcError as exc:
                self.outcome_counts[f"refused_{exc.code().name}"] += len(outcomes)
                if exc.code().name not in RETRIED_CODES or time.monotonic() >= give_up:
                    self.outcome_counts["failed"] += len(outcomes)
                    return
                self.outcome_counts["retried"] += len(outcomes)
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
                attempt += 1
            else:
                self.outcome_counts["accepted"] += report.accepted
                self.outcome_counts["duplicates"] += report.duplicates
                self.outcome_counts["unknown_requests"] += report.unknown_requests
                return

    def _result(self) -> dict[str, Any]:
        surfaces = np.array(self.world.surface_names, dtype=object)[self.requests.surface]
        return {
            "histogram": self.histogram.encode().decode("ascii"),
            "refused_histogram": self.refused.encode().decode("ascii"),
            "offsets": self.offsets.astype(np.float32),
            "latency_ms": self.latency_ms,
            "path": self.path.astype(str),
            "error": self.error.astype(str),
            "surface": surfaces.astype(str),
            "expected": self.expected,
            "realised": self.realised,
            "outcomes": dict(self.outcome_counts),
            "late_sends": int(sum(lag > LATE_MS for lag in self.lags)),
            "max_lag_ms": max(self.lags, default=0.0),
        }
