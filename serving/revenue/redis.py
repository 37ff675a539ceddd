"""The revenue tracker shared by all replicas through Redis.

Every update is one Lua script, so it is atomic across replicas, and the Redis server's AOF
(``appendonly yes``, ``appendfsync always``: the reply leaves after the fsync) makes an
acknowledged outcome durable. Keys, under ``key_prefix`` P::

    P req:<request_id>                     "<path>\\t<propensity>\\t<expires_at>\\t<segment>", PX request TTL
    P seen:<request_id>|<item_id>|<event>  "1", SET NX, PX dedupe TTL: the idempotence key
    P cell:<path>|<segment>                hash: lifetime counters (inferences, compute_ms, revenue,
                                           outcomes, ipw_inferences, ipw_revenue), the window's
                                           w_<counter> valued at w_ts (tracker clock)
    P cells                                set of "<path>|<segment>"
    P batch:<id>                           "1", SET NX, PX 1 h: an inference batch already applied

``OUTCOMES_LUA`` takes a batch of outcomes; per outcome it sets the dedupe key with NX (already
there: a duplicate) and looks up the request, then adds the revenue to the cells, all in one
atomic step, so two replicas reporting the same outcome count it once. ``INFERENCES_LUA`` stores
the request entries and adds per-cell sums the client made. Expiry is checked against the
tracker's clock (the stored ``expires_at``); Redis's own TTLs bound the memory.

Degradation when Redis is down: ``record_inference`` never touches the network. It appends to a
local buffer that a background thread sends in batches (``INFERENCES``, made idempotent by the
batch key, so a batch whose reply was lost is resent safely). While Redis is unreachable the
buffer holds up to ``max_buffered`` inferences; beyond that new ones are dropped and counted
(``inferences_dropped``). ``record_outcomes`` sends the buffer first (so a request served here
is known before its outcomes) and raises ``Unavailable`` if Redis does not confirm: nothing is
acknowledged that is not durable, and the caller's retry is safe. ``cells`` answers from the last
state it read when Redis is down.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from embeddings.clock import Clock, WallClock
from serving.decay import decay
from serving.domain import Outcome, OutcomeReport, Path_
from serving.errors import Unavailable
from serving.revenue.config import RedisTrackerConfig
from serving.revenue.ledger import (
    COUNTERS,
    I_COMPUTE_MS,
    I_INFERENCES,
    I_IPW_INFERENCES,
    Cell,
    Cells,
    CellStats,
    Counters,
)
from serving.revenue.log import InferenceRecord
from serving.revenue.tracker import Inference, RevenueTracker, check_outcomes

log = logging.getLogger(__name__)

_BATCH_TTL_MS = 3_600_000

# Adds lifetime deltas and window deltas (valued at time t) to one cell: the window is decayed
# to the later of t and its own time first, as revenue_ledger.Cell does. One read, one write.
_ADD_LUA = """
local NAMES = {'inferences', 'compute_ms', 'revenue', 'outcomes', 'ipw_inferences', 'ipw_revenue'}
local FIELDS = {'w_ts'}
for i = 1, #NAMES do FIELDS[i + 1] = NAMES[i]; FIELDS[i + 1 + #NAMES] = 'w_' .. NAMES[i] end
local function fmt(x) return string.format('%.17g', x) end
local function add(prefix, segment, path, t, half_life, life, win)
  local member = path .. '|' .. segment
  local key = prefix .. 'cell:' .. member
  redis.call('SADD', prefix .. 'cells', member)
  local old = redis.call('HMGET', key, unpack(FIELDS))
  local ts = tonumber(old[1]) or t
  local keep, scale = 1, 1
  if t > ts then
    keep = 2 ^ (-(t - ts) / half_life)
    ts = t
  elseif t < ts then
    scale = 2 ^ (-(ts - t) / half_life)
  end
  local out = {'w_ts', fmt(ts)}
  for i = 1, #NAMES do
    local lifetime = (tonumber(old[i + 1]) or 0) + life[i]
    local window = (tonumber(old[i + 1 + #NAMES]) or 0) * keep + win[i] * scale
    out[#out + 1] = NAMES[i]
    out[#out + 1] = fmt(lifetime)
    out[#out + 1] = 'w_' .. NAMES[i]
    out[#out + 1] = fmt(window)
  end
  redis.call('HSET', key, unpack(out))
end
"""

INFERENCES_LUA = (
    _ADD_LUA
    + """
-- KEYS[1]: the batch key. ARGV: prefix, half_life_s, request_ttl_ms, batch_ttl_ms, n, then n pairs
-- (request_id, "<path>\t<propensity>\t<expires_at>\t<segment>"), then per cell 15 values:
-- segment, path, t, 6 lifetime deltas, 6 window deltas valued at t (summed by the client).
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) then return 0 end
local prefix, half_life, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
for i = 6, 5 + 2 * n, 2 do
  redis.call('SET', prefix .. 'req:' .. ARGV[i], ARGV[i + 1], 'PX', ARGV[3])
end
for i = 6 + 2 * n, #ARGV, 15 do
  local life, win = {}, {}
  for j = 1, 6 do
    life[j] = tonumber(ARGV[i + 2 + j])
    win[j] = tonumber(ARGV[i + 8 + j])
  end
  add(prefix, ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), half_life, life, win)
end
return n
"""
)

OUTCOMES_LUA = (
    _ADD_LUA
    + """
-- ARGV: prefix, half_life_s, now, dedupe_ttl_ms, then per outcome: request_id, item_id, event, revenue
local prefix, half_life, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local accepted, duplicates, unknown = 0, 0, 0
local cells, order = {}, {}
for i = 5, #ARGV, 4 do
  local rid = ARGV[i]
  local seen = prefix .. 'seen:' .. rid .. '|' .. ARGV[i + 1] .. '|' .. ARGV[i + 2]
  if redis.call('SET', seen, '1', 'NX', 'PX', ARGV[4]) then
    accepted = accepted + 1
    local served = redis.call('GET', prefix .. 'req:' .. rid)
    local path, q, expires, segment
    if served then
      path, q, expires, segment = string.match(served, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
    end
    if path and tonumber(expires) > now then
      local member = path .. '|' .. segment
      local cell = cells[member]
      if not cell then
        cell = {segment = segment, path = path, life = {0, 0, 0, 0, 0, 0}}
        cells[member] = cell
        order[#order + 1] = member
      end
      local revenue = tonumber(ARGV[i + 3])
      cell.life[3] = cell.life[3] + revenue
      cell.life[4] = cell.life[4] + 1
      cell.life[6] = cell.life[6] + revenue / tonumber(q)
    else
      unknown = unknown + 1
    end
  else
    duplicates = duplicates + 1
  end
end
for _, member in ipairs(order) do
  local cell = cells[member]
  add(prefix, cell.segment, cell.path, now, half_life, cell.life, cell.life)
end
return {accepted, duplicates, unknown}
"""
)


class RedisTracker(RevenueTracker):
    def __init__(
        self,
        config: RedisTrackerConfig | None = None,
        clock: Clock | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.config = config or RedisTrackerConfig()
        self.clock = clock or WallClock()
        # One retry, on a fresh connection: after a server restart the pooled sockets are dead.
        # Both scripts are idempotent, so a retry after a lost reply is safe.
        self.client = client or redis.Redis.from_url(
            self.config.url,
            socket_timeout=self.config.socket_timeout_s,
            socket_connect_timeout=self.config.connect_timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        self._inferences_script = self.client.register_script(INFERENCES_LUA)
        self._outcomes_script = self.client.register_script(OUTCOMES_LUA)
        self._prefix = self.config.key_prefix
        self._lock = threading.Lock()  # the buffer and counters
        self._send_lock = threading.Lock()  # one sender of inference batches at a time
        self._buffer: deque[InferenceRecord] = deque()
        self._inflight: tuple[str, list[InferenceRecord]] | None = None
        self._last_raw: dict[str, dict[str, str]] = {}
        self._counts = dict.fromkeys(
            ("inferences_dropped", "flush_errors", "outcome_errors", "read_errors"), 0
        )
        self._degraded = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if self.config.flush_interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="vr-revenue-flush", daemon=True)
            self._thread.start()

    def record_inference(self, inference: Inference) -> None:
        record = InferenceRecord(
            self.clock.now(),
            inference.request_id,
            inference.segment,
            inference.path,
            inference.compute_ms,
            inference.propensity,
        )
        with self._lock:
            inflight = len(self._inflight[1]) if self._inflight is not None else 0
            if len(self._buffer) + inflight >= self.config.max_buffered:
                self._counts["inferences_dropped"] += 1
                dropped = self._counts["inferences_dropped"]
                if dropped % 10_000 == 1:
                    log.warning("revenue buffer full: %s inferences dropped so far", dropped)
                return
            self._buffer.append(record)
            full = len(self._buffer) >= self.config.max_batch
        if full:
            self._wake.set()

    def record_outcomes(self, outcomes: list[Outcome]) -> OutcomeReport:
        check_outcomes(outcomes)
        self.flush()
        accepted = duplicates = unknown = 0
        step = self.config.max_batch
        # Chunks keep each script short (Redis runs one at a time). Each outcome is idempotent,
        # so after a failure mid-way the caller's retry of the whole batch is still exact.
        for start in range(0, len(outcomes), step):
            args: list[Any] = [
                self._prefix,
                repr(self.config.half_life_s),
                repr(self.clock.now()),
                int(self.config.dedupe_ttl_s * 1000),
            ]
            for o in outcomes[start : start + step]:
                args += [o.request_id, o.item_id, o.event, repr(float(o.revenue))]
            try:
                a, d, u = self._outcomes_script(keys=[], args=args)
            except redis.RedisError as exc:
                raise self._failed("outcome_errors", exc) from exc
            accepted, duplicates, unknown = accepted + int(a), duplicates + int(d), unknown + int(u)
        self._recovered()
        return OutcomeReport(accepted, duplicates, unknown)

    def cells(self) -> Cells:
        try:
            members: list[str] = sorted(str(m) for m in self.client.smembers(self._prefix + "cells"))
            pipe = self.client.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(self._prefix + "cell:" + member)
            raw: dict[str, dict[str, str]] = dict(zip(members, pipe.execute(), strict=True))
            self._last_raw = raw
        except redis.RedisError as exc:
            with self._lock:
                self._counts["read_errors"] += 1
            log.warning("revenue cells from the last read: Redis unreachable (%s)", exc)
            raw = self._last_raw
        now = self.clock.now()
        out: Cells = {}
        for member, fields in raw.items():
            path, _, segment = member.partition("|")
            out[(segment, cast(Path_, path))] = _cell_stats(fields, now, self.config.half_life_s)
        return out

    def flush(self) -> None:
        """Send every buffered inference; raises ``Unavailable`` (keeping them) if Redis fails."""
        with self._send_lock:
            while True:
                if self._inflight is None:
                    with self._lock:
                        if not self._buffer:
                            return
                        n = min(len(self._buffer), self.config.max_batch)
                        self._inflight = (uuid.uuid4().hex, [self._buffer.popleft() for _ in range(n)])
                        # Resent under the same id until Redis confirms it: applied once.
                batch_id, batch = self._inflight
                args = self._inference_args(batch)
                try:
                    self._inferences_script(keys=[self._prefix + "batch:" + batch_id], args=args)
                except redis.RedisError as exc:
                    raise self._failed("flush_errors", exc) from exc
                with self._lock:
                    self._inflight = None

    def health(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self._counts.items()}
            inflight = len(self._inflight[1]) if self._inflight is not None else 0
            out["buffered_inferences"] = float(len(self._buffer) + inflight)
            out["degraded"] = float(self._degraded)
        return out

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        try:
            self.flush()
        except Unavailable:
            unsent = self.health()["buffered_inferences"]
            log.error("revenue tracker closed with %s inferences unsent", unsent)
        self.client.close()

    # -- internals ------------------------------------------------------------------------------

    def _inference_args(self, batch: list[InferenceRecord]) -> list[Any]:
        """Script arguments: one request entry per inference, but one sum per cell (a Cell of
        the ledger does the decay arithmetic), so Redis does one cell update per cell, not per
        inference."""
        ttl = self.config.request_ttl_s
        args: list[Any] = [
            self._prefix,
            repr(self.config.half_life_s),
            int(ttl * 1000),
            _BATCH_TTL_MS,
            len(batch),
        ]
        sums: dict[tuple[str, Path_], Cell] = {}
        for r in batch:
            args += [r.request_id, f"{r.path}\t{r.propensity!r}\t{r.t + ttl!r}\t{r.segment}"]
            cell = sums.get((r.segment, r.path))
            if cell is None:
                cell = sums[(r.segment, r.path)] = Cell()
            cell.add(
                r.t,
                self.config.half_life_s,
                {I_INFERENCES: 1.0, I_COMPUTE_MS: r.compute_ms, I_IPW_INFERENCES: 1.0 / r.propensity},
            )
        for (segment, path), cell in sums.items():
            args += [segment, path, repr(cell.ts), *map(repr, cell.lifetime), *map(repr, cell.window)]
        return args

    def _run(self) -> None:
        """Background sender: every ``flush_interval_s``, or at once when a batch is full; backs off
        (up to 1 s) while Redis is unreachable."""
        interval = backoff = self.config.flush_interval_s
        while not self._stop.is_set():
            if backoff > interval:
                self._stop.wait(backoff)  # during an outage a full buffer must not spin the thread
            else:
                self._wake.wait(interval)
                self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
                self._recovered()
                backoff = interval
            except Unavailable:
                backoff = min(max(backoff * 2, 0.05), 1.0)
            except Exception:  # never let the sender die: the buffer would grow until it drops
                log.exception("revenue flush thread")
                backoff = 1.0

    def _failed(self, counter: str, exc: Exception) -> Unavailable:
        with self._lock:
            self._counts[counter] += 1
            first = not self._degraded
            self._degraded = True
        if first:
            log.warning("revenue tracker: Redis unreachable (%s); outcomes refused, inferences buffered", exc)
        return Unavailable(f"revenue store unreachable: {exc}")

    def _recovered(self) -> None:
        with self._lock:
            was, self._degraded = self._degraded, False
        if was:
            log.warning("revenue tracker: Redis reachable again")


def _cell_stats(fields: dict[str, str], now: float, half_life_s: float) -> CellStats:
    lifetime = Counters(*(float(fields.get(c, 0.0)) for c in COUNTERS))
    ts = float(fields.get("w_ts", now))
    window = Counters(*(decay(float(fields.get("w_" + c, 0.0)), now - ts, half_life_s) for c in COUNTERS))
    return CellStats(lifetime, window)
