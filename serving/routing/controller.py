"""The lambda controller: holds a compute budget and a p99 target under changing load.

The value-aware router sends a request to the full path when its estimated uplift per extra CPU
millisecond exceeds ``lambda`` (DCAF, Alibaba 2020). Rather than stepping ``lambda`` itself, whose
right value can sit anywhere from 1e-6 to 1 $/ms and jumps whenever the value model refits, this
controller steers the **share of requests above lambda**; the router turns a share ``s`` into
``lambda = quantile(recent value estimates, 1 - s)``. In share space the plant is close to linear
(spend ~ share x full cost), so one set of gains works on any world.

Once per window of the injected clock:

* budget error ``e_b = (spent - allowed) / typical allowed``: ``spent`` is the CPU ms the
  window's requests took; ``allowed`` is ``budget_share`` x what always-full would have spent on
  them (requests x the measured full-path cost) and/or ``budget_ms_per_s`` x the window's
  length, the smaller; "typical" is a running mean over windows. Absolute, not relative,
  overspend: the integral then balances the budget over the day, busy windows weighing more;
* latency error ``e_l = p99 / p99_target_ms - 1`` over the window's latencies;
* ``e = min(max(e_b, e_l), 2)``: the tighter constraint governs; both under target gives
  ``e < 0`` and the share rises toward 1 (everyone worth it gets the full path).

``share = feed_forward + c``: the feed-forward is the router's estimate of the share that spends
the budget (1 without a share budget); ``c`` is a PI term in velocity form, ``c -= kp * (e -
e_prev) + ki * e``, clamped to ``[-1, max_boost]`` so it cannot wind up. Under a load step the
error jumps and the share moves within a few windows; as lambda is a quantile of the value
estimates, the lowest-value requests are the first to lose the full path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from embeddings.clock import Clock


@dataclass(frozen=True)
class ControllerConfig:
    budget_share: float | None = 0.5
    """Compute budget as a share of what always-full would spend on the same traffic; None: none."""
    budget_ms_per_s: float | None = None
    """Compute budget as CPU ms per second of clock time (the cores the fleet has); None: none."""
    p99_target_ms: float | None = None
    """Latency target: a window's p99 above it lowers the full share; None: not controlled."""
    window_s: float = 1.0
    """Control interval on the injected clock."""
    kp: float = 0.1
    """Proportional gain: share change per unit of relative error change."""
    ki: float = 0.15
    """Integral gain: share change per unit of relative error per window."""
    max_boost: float = 0.25
    """Most the feedback may add to the feed-forward share (it may take all of it away)."""
    min_share: float = 0.0
    """Lowest full share the controller asks for (guardrails and exploration come on top)."""
    min_window_requests: int = 20
    """Windows with fewer requests leave the share unchanged (too little evidence)."""

    def __post_init__(self) -> None:
        if self.budget_share is not None and not 0.0 < self.budget_share <= 10.0:
            raise ValueError(f"{self.budget_share=} must be in (0, 10] or None")
        if self.budget_ms_per_s is not None and self.budget_ms_per_s <= 0:
            raise ValueError(f"{self.budget_ms_per_s=} must be > 0 or None")
        if self.p99_target_ms is not None and self.p99_target_ms <= 0:
            raise ValueError(f"{self.p99_target_ms=} must be > 0 or None")
        if self.window_s <= 0:
            raise ValueError(f"{self.window_s=} must be > 0")
        if self.kp < 0 or self.ki <= 0:
            raise ValueError(f"{self.kp=} must be >= 0 and {self.ki=} > 0")
        if not 0.0 <= self.max_boost <= 1.0:
            raise ValueError(f"{self.max_boost=} must be in [0, 1]")
        if not 0.0 <= self.min_share < 1.0:
            raise ValueError(f"{self.min_share=} must be in [0, 1)")
        if self.min_window_requests < 1:
            raise ValueError(f"{self.min_window_requests=} must be >= 1")


class LambdaController:
    """Feedback controller of the full share; not thread-safe (the router calls it under its lock)."""

    def __init__(self, config: ControllerConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._feed_forward = 1.0
        self._correction = 0.0
        self._prev_error: float | None = None
        self._typical_allowed: float | None = None
        self._window_start = clock.now()
        self._window_end = self._window_start + config.window_s
        self._spent = 0.0
        self._full_equivalent = 0.0
        self._latencies: list[float] = []
        self._requests = 0
        self.windows = 0
        self.last: dict[str, float] = {}

    @property
    def share(self) -> float:
        """The full share the router should aim at now."""
        return min(max(self._feed_forward + self._correction, self.config.min_share), 1.0)

    @property
    def correction(self) -> float:
        return self._correction

    def record(self, compute_ms: float, full_equivalent_ms: float, latency_ms: float) -> None:
        """One served request: what it cost, what always-full would have cost, how long it took."""
        self._spent += compute_ms
        self._full_equivalent += full_equivalent_ms
        self._latencies.append(latency_ms)
        self._requests += 1

    def due(self) -> bool:
        """Whether the next ``tick`` closes a window."""
        return self.clock.now() >= self._window_end

    def tick(self, feed_forward: float | None = None, hold: bool = False, saturated: bool = False) -> float:
        """Close the window if the clock has passed its end; returns the share to aim at.

        ``feed_forward``: the router's estimate of the share that meets the budget (kept until the
        next one; 1.0 until the first). ``hold``: the router is not following the share (it is
        warming up), so a closing window teaches the feedback nothing. ``saturated``: a higher share
        would change nothing (every request the router values positively already gets the full
        path), so the feedback may lower the share but not raise it (anti-windup)."""
        if feed_forward is not None and math.isfinite(feed_forward):
            self._feed_forward = min(max(feed_forward, 0.0), 1.0)
        now = self.clock.now()
        if now < self._window_end:
            return self.share
        elapsed = now - self._window_start
        if not hold and self._requests >= self.config.min_window_requests:
            error = self._error(elapsed)
            if error is not None:
                prev = error if self._prev_error is None else self._prev_error
                step = self.config.kp * (error - prev) + self.config.ki * error
                if not (saturated and step < 0):
                    self._correction = min(max(self._correction - step, -1.0), self.config.max_boost)
                self._prev_error = error
                self.windows += 1
        # An idle stretch closes as one window: no evidence, no change.
        self._window_start = now
        self._window_end = now + self.config.window_s
        self._spent = self._full_equivalent = 0.0
        self._latencies = []
        self._requests = 0
        return self.share

    def _error(self, elapsed_s: float) -> float | None:
        cfg = self.config
        errors = []
        allowed = math.inf
        if cfg.budget_share is not None and self._full_equivalent > 0:
            allowed = cfg.budget_share * self._full_equivalent
        if cfg.budget_ms_per_s is not None:
            allowed = min(allowed, cfg.budget_ms_per_s * max(elapsed_s, 1e-9))
        self.last = {"spent_ms": self._spent, "requests": float(self._requests)}
        if math.isfinite(allowed) and allowed > 0:
            if self._typical_allowed is None:
                self._typical_allowed = allowed
            self._typical_allowed += 0.1 * (allowed - self._typical_allowed)
            errors.append((self._spent - allowed) / self._typical_allowed)
            self.last.update(allowed_ms=allowed, budget_use=self._spent / allowed)
        if cfg.p99_target_ms is not None:
            p99 = float(np.percentile(self._latencies, 99))
            errors.append(p99 / cfg.p99_target_ms - 1.0)
            self.last.update(p99_ms=p99)
        return min(max(errors), 2.0) if errors else None

    def stats(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "feed_forward": self._feed_forward,
            "correction": self._correction,
            "windows": self.windows,
            **self.last,
        }
