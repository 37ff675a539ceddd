"""Off-policy evaluation of routing policies from a live decision log (``serving.decision_log``).

A server logs, per request, the path it took and the probability it had of taking it, and later
the outcomes. For a target policy ``pi`` (P(full | request), a function of logged fields), with
``w_i = pi(a_i | x_i) / p_log(a_i | x_i)``:

* IPS: ``mean(w_i * r_i)``, unbiased wherever the logging policy could take ``pi``'s action;
* SNIPS: ``sum(w_i * r_i) / sum(w_i)``, a little biased, steadier;
* doubly robust: ``mean(sum_a pi(a|x_i) rhat(x_i, a) + w_i * (r_i - rhat(x_i, a_i)))`` with
  ``rhat`` the mean revenue per (segment, path), cross-fitted on two folds so that no request's
  reward model saw its own reward. Unbiased if either the propensities or ``rhat`` are right;
  lower variance than IPS when ``rhat`` explains part of the revenue.

Standard errors are those of the per-request terms. ``support`` is the share of requests on
which ``pi``'s action had a positive logging probability: below 1, IPS cannot see part of what
``pi`` would do (DR falls back on ``rhat`` there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.counterfactual import ScoredLog
from loadtest.policy_sim import PolicyRun
from serving.decision_log import DecisionLog, DecisionRecord, from_line
from serving.domain import Outcome
from serving.routing.policies import StaticTiersConfig


@dataclass
class LoggedData:
    """Logged requests joined with their revenue."""

    surface: np.ndarray
    segment: np.ndarray
    full: np.ndarray
    """Bool: the logged path was full."""
    propensity: np.ndarray
    """P(logged path) under the logging policy."""
    reward: np.ndarray
    """Revenue of each request (its outcomes, each counted once)."""
    compute_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.reward)

    @property
    def p_full(self) -> np.ndarray:
        return np.where(self.full, self.propensity, 1.0 - self.propensity)


def read_log(path: Path) -> tuple[LoggedData, dict[str, int]]:
    """Join decisions and outcomes; returns the data and counts of what was read or skipped."""
    decisions: dict[str, DecisionRecord] = {}
    revenue: dict[str, float] = {}
    seen: set[tuple[str, int, str]] = set()
    counts = {"lines": 0, "bad_lines": 0, "duplicate_outcomes": 0, "orphan_outcomes": 0}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            counts["lines"] += 1
            try:
                record = from_line(line)
            except ValueError:
                counts["bad_lines"] += 1
                continue
            if isinstance(record, DecisionRecord):
                decisions[record.request_id] = record
            elif record.key in seen:
                counts["duplicate_outcomes"] += 1
            else:
                seen.add(record.key)
                revenue[record.request_id] = revenue.get(record.request_id, 0.0) + record.revenue
    counts["orphan_outcomes"] = sum(1 for r in revenue if r not in decisions)
    counts["requests"] = len(decisions)
    rows = list(decisions.values())
    data = LoggedData(
        surface=np.array([d.surface for d in rows], dtype=object),
        segment=np.array([d.segment for d in rows], dtype=object),
        full=np.array([d.path == "full" for d in rows], dtype=bool),
        propensity=np.array([d.propensity for d in rows], dtype=np.float64),
        reward=np.array([revenue.get(d.request_id, 0.0) for d in rows], dtype=np.float64),
        compute_ms=np.array([d.compute_ms for d in rows], dtype=np.float64),
    )
    return data, counts


def estimate(data: LoggedData, target_p_full: np.ndarray) -> dict[str, float]:
    """IPS, SNIPS and doubly robust estimates of the revenue per request of a target policy."""
    n = len(data)
    if n == 0:
        raise ValueError("no logged requests to evaluate")
    target = np.clip(np.asarray(target_p_full, dtype=np.float64), 0.0, 1.0)
    p_full = data.p_full
    p_logged = np.where(data.full, p_full, 1.0 - p_full)
    pi_logged = np.where(data.full, target, 1.0 - target)
    w = pi_logged / p_logged
    ips_terms = w * data.reward
    r_full, r_cheap = _cross_fitted_reward_model(data)
    r_logged = np.where(data.full, r_full, r_cheap)
    dr_terms = target * r_full + (1.0 - target) * r_cheap + w * (data.reward - r_logged)
    # Support: pi's action (either one it gives mass to) could have been logged.
    supported = ((target <= 0) | (p_full > 0)) & ((target >= 1) | (p_full < 1))
    return {
        "ips": float(ips_terms.mean()),
        "ips_se": float(ips_terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "snips": float(ips_terms.sum() / w.sum()) if w.sum() > 0 else float("nan"),
        "dr": float(dr_terms.mean()),
        "dr_se": float(dr_terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "support": float(supported.mean()),
    }


def _cross_fitted_reward_model(data: LoggedData) -> tuple[np.ndarray, np.ndarray]:
    """Mean reward per (segment, path), fitted on the other fold; per path when a cell is empty."""
    n = len(data)
    fold = np.arange(n) % 2
    out = {True: np.zeros(n), False: np.zeros(n)}
    for f in (0, 1):
        train = fold != f
        test = fold == f
        for path in (True, False):
            cell = train & (data.full == path)
            fallback = float(data.reward[cell].mean()) if cell.any() else float(data.reward[train].mean())
            means: dict[Any, float] = {}
            for seg in np.unique(data.segment[cell]):
                means[seg] = float(data.reward[cell & (data.segment == seg)].mean())
            out[path][test] = [means.get(seg, fallback) for seg in data.segment[test]]
    return out[True], out[False]


def evaluate_log(path: Path, static: StaticTiersConfig | None = None) -> dict[str, Any]:
    """Estimate what each fixed policy, and the logging policy itself, would have earned."""
    static = static or StaticTiersConfig()
    data, counts = read_log(path)
    if len(data) == 0:
        raise ValueError(f"{path} holds no decision records")
    targets = {
        "always_full": np.ones(len(data)),
        "always_cheap": np.zeros(len(data)),
        "static_tiers": np.isin(data.surface, list(static.full_surfaces)).astype(np.float64),
        "logged": data.p_full,
    }
    cost_full = float(data.compute_ms[data.full].mean()) if data.full.any() else float("nan")
    cost_cheap = float(data.compute_ms[~data.full].mean()) if (~data.full).any() else float("nan")
    estimates = {}
    for name, target in targets.items():
        est = estimate(data, target)
        share = float(target.mean())
        est.update(
            full_share=share,
            compute_ms_per_request=share * cost_full + (1.0 - share) * cost_cheap,
        )
        estimates[name] = est
    return {
        "log": str(path),
        "counts": counts,
        "observed_revenue_per_request": float(data.reward.mean()),
        "estimates": estimates,
    }


def write_replay_log(log: ScoredLog, run: PolicyRun, path: Path) -> None:
    """Write a replayed online policy's decisions and sampled outcomes in the live log format, so
    the live-log estimators can be checked against the replay's exact counterfactuals."""
    out = DecisionLog(path)
    try:
        for i, decision in enumerate(run.decisions):
            rid = f"replay-{i}"
            cost = float(log.cost_ms[decision.path][i])
            out.write(
                DecisionRecord.of(
                    rid,
                    float(log.requests.ts[i]),
                    log.segments[i],
                    log.surface_names[i],
                    decision,
                    cost,
                    float(run.latency_ms[i]),
                )
            )
            for item, revenue in log.conversions[decision.path][i]:
                out.write(Outcome(rid, item, "conversion", revenue))
    finally:
        out.close()
