"""Micro-batching of concurrent requests into one model call (after Ray Serve's ``batching.py``).

Requests queue up; a single consumer takes the first one, then whatever else arrives within
``timeout_s`` up to ``max_batch_size``, and runs the batch function on a worker thread. While a
batch computes, the next one accumulates, so batches grow with load without adding latency
at low load. One future per request; the number of results must equal the batch size; a
failure is set on every future of the batch.

The batcher also keeps what admission needs to predict a new request's wait
(``expected_wait_s``): how many requests are queued, whether a batch is computing, and a
moving average of the wall time per batch and per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class BatchResult(Generic[Out]):
    value: Out
    queue_s: float
    """Time from submit to the start of the batch's computation."""
    compute_cpu_s: float
    """This request's share of the batch's CPU time (split by its weight)."""
    batch_size: int


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    weight: float
    future: asyncio.Future[BatchResult[Out]]
    submitted: float


class MicroBatcher(Generic[In, Out]):
    def __init__(
        self,
        fn: Callable[[list[In]], list[Out]],
        executor: Executor,
        *,
        max_batch_size: int = 16,
        timeout_s: float = 0.0005,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"{max_batch_size=} must be >= 1")
        if timeout_s < 0:
            raise ValueError(f"{timeout_s=} must be >= 0")
        self._fn = fn
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._busy_since: float | None = None
        self.batch_wall_s = 0.0
        """Moving average of a batch's wall time (0 until the first batch)."""
        self.item_wall_s = 0.0
        """Moving average of a batch's wall time per request in it."""
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, item: In, weight: float = 1.0) -> BatchResult[Out]:
        if self._closed:
            raise RuntimeError("batcher is closed")
        self.start()
        future: asyncio.Future[BatchResult[Out]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, weight, future, time.perf_counter()))
        return await future

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def expected_wait_s(self, now: float | None = None) -> float:
        """Predicted time from a submit now until its batch starts computing: what the batch
        computing now has left, then the queue ahead of it at the recent wall time per request.
        An idle batcher predicts 0 (its next submit starts at once), so a prediction learnt
        under load can never lock traffic out once the load is gone. A batch already past its
        average is taken to need half an average more: slow batches tend to run on."""
        if self._busy_since is None and self._queue.empty():
            return 0.0
        now = time.perf_counter() if now is None else now
        running = 0.0
        if self._busy_since is not None:
            running = max(self.batch_wall_s - (now - self._busy_since), 0.5 * self.batch_wall_s)
        return running + self._queue.qsize() * self.item_wall_s

    def _learn(self, wall_s: float, size: int) -> None:
        # The first batch sets the averages; later ones move them by 1/8 (a few batches' memory).
        rate = 1.0 if self.batches == 0 else 0.125
        self.batch_wall_s += rate * (wall_s - self.batch_wall_s)
        self.item_wall_s += rate * (wall_s / size - self.item_wall_s)
        self.batches += 1
        self.items += size

    async def close(self) -> None:
        """Stop taking work; pending requests get an error."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("batcher closed"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # What is already queued joins at once (no timer per item); then wait for more.
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            deadline = loop.time() + self.timeout_s
            while self.timeout_s > 0 and len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(remaining, 0.0)))
                except TimeoutError:
                    break
            live = [p for p in batch if not p.future.cancelled()]
            if not live:
                continue
            started = time.perf_counter()
            self._busy_since = started
            try:
                values, cpu_s = await loop.run_in_executor(self._executor, self._call, [p.item for p in live])
                if len(values) != len(live):
                    raise RuntimeError(
                        f"batch function returned {len(values)} results for {len(live)} inputs"
                    )
            except Exception as exc:
                self._busy_since = None
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self._busy_since = None
            self._learn(time.perf_counter() - started, len(live))
            total_weight = sum(p.weight for p in live) or 1.0
            for p, value in zip(live, values, strict=True):
                if not p.future.done():
                    p.future.set_result(
                        BatchResult(value, started - p.submitted, cpu_s * p.weight / total_weight, len(live))
                    )

    def _call(self, items: list[In]) -> tuple[list[Out], float]:
        cpu = time.thread_time()
        values = self._fn(items)
        return values, time.thread_time() - cpu
