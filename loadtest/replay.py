"""`valuerank replay`: offline replay of routing policies on the world's replay log, in-process.

Every logged request is retrieved and scored with both paths (costs measured live), both slates
are priced from the world's ground truth, and then each policy runs over the requests in time
order (``loadtest.policy_sim``):

* ``always_full`` (one large model for all), ``always_cheap``;
* ``static_tiers`` (the configured per-surface table) and ``static_tiers@B``, the best per-surface
  table that fits budget B (B = share of always-full's compute);
* ``value_aware@B``: the online router of ``serving.routing.policies``, learning from scratch during the
  day (exploration, realised outcomes, measured costs), with its controller holding budget B;
* ``oracle@B``: knows every request's true uplift and gives the full path to the highest ones;
  ``oracle_segment@B`` knows only every segment's (surface x tier) true mean uplift.

Value-aware routing learns from scratch during the replayed day (``--warmup-requests N`` lets it
first run over N requests of another day drawn from the world). Its feedback is what a server
would give it: the measured compute, the modelled latency, the full model's scores when it ran
(``Router.observe_scored``) and the sampled revenue of the slate it served
(reported as an outcome, through ``serving.feedback`` as the server does); it never reads the true uplift.

With ``--log PATH`` it instead estimates, from a decision/outcome log written by a server
(``serving.decision_log``), what each policy would have earned: inverse-propensity and doubly
robust estimates (``loadtest.offpolicy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.configs import add_flags, from_flags
from dlrm.world import World, WorldConfig
from embeddings.clock import ManualClock
from loadtest.counterfactual import ScoredLog, score_log
from loadtest.policy_sim import (
    LoadModel,
    PolicyRun,
    arrival_times,
    best_static_tables,
    oracle_mask,
    run_mask,
    run_router,
    segment_oracle_mask,
    summarise,
    table_mask,
)
from serving.config import ScoringConfig
from serving.routing.config import RouterConfig, ValueAwareConfig
from serving.routing.policies import make_router
from serving.routing.router import Router

DEFAULT_BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class ReplayConfig:
    requests: int = 0
    """Requests of the replay log to use, from its start (0: all)."""
    candidates: int = 200
    """Candidates retrieved and scored per request."""
    batch: int = 16
    """Requests per full-path scoring call (the pipeline's micro-batch size)."""
    seed: int = 0
    """Seed of the realised outcomes and of the routers' exploration."""
    window_requests: int = 200
    """Controller window, in requests at the day's mean rate (0: use --window-s as given)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """The scoring paths and slate order, as ``serve`` runs them (precision auto: the model's
    measured choice, measured now when the model folder has none)."""
    warmup_requests: int = 0
    """Requests of a previous day (drawn from the world with another seed) that learning policies
    run over before the replayed day, which alone is measured; 0: they start cold."""

    def __post_init__(self) -> None:
        if self.requests < 0:
            raise ValueError(f"{self.requests=} must be >= 0")
        if not 1 <= self.candidates <= 10_000:
            raise ValueError(f"{self.candidates=} must be in 1..10000")
        if self.batch < 1:
            raise ValueError(f"{self.batch=} must be >= 1")
        if self.window_requests < 0:
            raise ValueError(f"{self.window_requests=} must be >= 0")
        if self.warmup_requests < 0:
            raise ValueError(f"{self.warmup_requests=} must be >= 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank replay", description=__doc__)
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument("--index", type=Path, default=None, help="index folder (default: built/reused)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--budgets", type=_budgets, default=DEFAULT_BUDGETS, help="comma-separated shares")
    parser.add_argument("--plot", type=Path, default=None, help="write the revenue-vs-compute PNG here")
    parser.add_argument("--log", type=Path, default=None, help="estimate policies from a live JSONL log")
    parser.add_argument(
        "--write-log", type=Path, default=None, help="write value_aware@0.5's decisions as a JSONL log"
    )
    add_flags(parser, ReplayConfig)
    add_flags(parser, LoadModel)
    add_flags(parser, RouterConfig, skip=("policy", "seed", "budget_share", "static_tiers"))
    args = parser.parse_args(argv)
    try:
        if args.log is not None:
            from loadtest.offpolicy import evaluate_log

            result = evaluate_log(args.log)
        else:
            result = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=None if args.json else 2) if args.json else format_report(result))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = from_flags(ReplayConfig, args)
    load = from_flags(LoadModel, args)
    progress = not args.json or sys.stderr.isatty()
    world_config = WorldConfig.load(args.world)
    log, warmup = build_scored_logs(world_config, args.artifacts, args.index, config, progress=progress)
    router = from_flags(RouterConfig, args, policy="value_aware", seed=config.seed)
    result = replay(log, load, router, config, args.budgets, warmup)
    result["world"] = {"key": world_config.key(), "file": str(args.world) if args.world else "bundled"}
    if args.plot is not None:
        from loadtest.plot import plot_curves

        plot_curves(result, args.plot)
        result["plot"] = str(args.plot)
    if args.write_log is not None:
        from loadtest.offpolicy import write_replay_log

        runs = result["_runs"]
        nearest = min(args.budgets, key=lambda b: abs(b - 0.5))
        write_replay_log(log, runs[f"value_aware@{nearest:g}"], args.write_log)
        result["log"] = str(args.write_log)
    result.pop("_runs", None)
    return result


def build_scored_logs(
    world_config: WorldConfig,
    artifacts: Path,
    index_dir: Path | None,
    config: ReplayConfig,
    *,
    progress: bool,
) -> tuple[ScoredLog, ScoredLog | None]:
    """Train (or reuse) the model and index of ``world_config``; score its replay log and, when
    ``config.warmup_requests``, a warm-up day drawn from the world with another seed."""
    from dlrm.synth import ensure_world_logs
    from dlrm.train import train_world
    from serving.assets import ServingAssets

    world = World(world_config)
    logs = ensure_world_logs(world_config, artifacts, world=world, log=progress)
    model = train_world(world_config, artifacts, progress=progress)
    if "auto" in (config.scoring.precision, config.scoring.mlp_precision):
        from embeddings.precision_bench import ensure_measured

        ensure_measured(model)  # as `valuerank bench precision` would, before a server starts
    if index_dir is None:
        from embeddings.index_stage import ensure_index

        index_dir = ensure_index(world_config, artifacts, progress=progress)
    assets = ServingAssets.load(model.path, index_dir)
    requests = logs.replay
    if config.requests:
        requests = requests.take(slice(0, config.requests))
    score = dict(
        candidates=config.candidates,
        batch=config.batch,
        rank_by=config.scoring.rank_by,
        retrieval_value_weight=config.scoring.retrieval_value_weight,
        precision=config.scoring.precision,
        mlp_precision=config.scoring.mlp_precision,
        progress=progress,
    )
    log = score_log(world, assets, requests, seed=config.seed, **score)  # type: ignore[arg-type]
    warmup = None
    if config.warmup_requests:
        # Another day of the same world: the replayed requests are never seen before they count.
        rng = np.random.default_rng([world_config.seed, 7919, config.seed])
        earlier = world.sample_requests(config.warmup_requests, rng)
        warmup = score_log(world, assets, earlier, seed=config.seed + 1, **score)  # type: ignore[arg-type]
    return log, warmup


def replay(
    log: ScoredLog,
    load: LoadModel,
    router: RouterConfig,
    config: ReplayConfig,
    budgets: tuple[float, ...],
    warmup: ScoredLog | None = None,
) -> dict[str, Any]:
    """Run every policy over ``log``; the result's ``policies`` maps names to their summaries.
    ``router``: the value-aware router's settings (its budget is each of ``budgets`` in turn) and
    the configured per-surface table."""
    value_aware, static = router.value_aware, router.static_tiers
    times = arrival_times(log, load)
    warm = None if warmup is None else (warmup, arrival_times(warmup, load))
    if config.window_requests and len(log) > 1:
        window_s = config.window_requests * float(times[-1] - times[0]) / len(log)
        value_aware = dataclasses.replace(
            value_aware, controller=dataclasses.replace(value_aware.controller, window_s=max(window_s, 1e-6))
        )
    runs: dict[str, PolicyRun] = {}
    runs["always_full"] = run_mask(log, "always_full", np.ones(len(log), dtype=bool), times, load)
    runs["always_cheap"] = run_mask(log, "always_cheap", np.zeros(len(log), dtype=bool), times, load)
    runs["static_tiers"] = run_mask(log, "static_tiers", table_mask(log, static.full_surfaces), times, load)
    tables = best_static_tables(log, budgets)
    for b in budgets:
        runs[f"static_tiers@{b:g}"] = run_mask(
            log, f"static_tiers@{b:g}", table_mask(log, tables[b]), times, load
        )
        runs[f"oracle@{b:g}"] = run_mask(log, f"oracle@{b:g}", oracle_mask(log, b), times, load)
        runs[f"oracle_segment@{b:g}"] = run_mask(
            log, f"oracle_segment@{b:g}", segment_oracle_mask(log, b), times, load
        )
        make = _value_aware_factory(log, router, value_aware, b)
        runs[f"value_aware@{b:g}"] = run_router(log, f"value_aware@{b:g}", make, times, load, warm)
    if warm is not None and budgets:
        # The same router from a cold start on the replayed day, for the record.
        b = min(budgets, key=lambda x: abs(x - 0.5))
        make = _value_aware_factory(log, router, value_aware, b)
        runs[f"value_aware_cold@{b:g}"] = run_router(log, f"value_aware_cold@{b:g}", make, times, load)
    policies = {name: summarise(log, r, load) for name, r in runs.items()}
    for name, r in runs.items():
        if r.router_stats:
            policies[name]["router"] = _router_summary(r.router_stats)
    full_rev = policies["always_full"]["revenue"]
    checks: dict[str, Any] = {"value_aware_over_always_full": {}, "value_aware_over_static": {}}
    checks["value_aware_over_oracle"] = {}
    checks["value_aware_over_oracle_segment"] = {}
    # The headroom any router has over per-surface tables: what the oracle gains over the best one.
    checks["oracle_over_static"] = {}
    for b in budgets:
        va = policies[f"value_aware@{b:g}"]["revenue"]
        checks["value_aware_over_always_full"][f"{b:g}"] = va / full_rev if full_rev else float("nan")
        st = policies[f"static_tiers@{b:g}"]["revenue"]
        checks["value_aware_over_static"][f"{b:g}"] = va / st if st else float("nan")
        orc = policies[f"oracle@{b:g}"]["revenue"]
        checks["value_aware_over_oracle"][f"{b:g}"] = va / orc if orc else float("nan")
        seg = policies[f"oracle_segment@{b:g}"]["revenue"]
        checks["value_aware_over_oracle_segment"][f"{b:g}"] = va / seg if seg else float("nan")
        checks["oracle_over_static"][f"{b:g}"] = orc / st if st else float("nan")
    return {
        "requests": len(log),
        "warmup_requests": 0 if warmup is None else len(warmup),
        "candidates": config.candidates,
        "slate_size": log.k,
        "costs": {
            "full_ms_per_request": float(log.cost_ms["full"].mean()),
            "cheap_ms_per_request": float(log.cost_ms["cheap"].mean()),
            "full_over_cheap": float(log.cost_ms["full"].mean() / max(log.cost_ms["cheap"].mean(), 1e-9)),
            "retrieval_ms_per_request": log.retrieval_ms,
            "full_batch": config.batch,
        },
        "ranking": _ranking_summary(log),
        "load_model": {
            **dataclasses.asdict(load),
            "day_seconds": float(times[-1] - times[0]) if len(times) else 0.0,
        },
        "static_tables": {f"{b:g}": list(tables[b]) for b in budgets}
        | {"static_tiers": list(static.full_surfaces)},
        "policies": policies,
        "checks": checks,
        "readme_table": readme_table(policies, budgets),
        "_runs": runs,
    }


def _value_aware_factory(
    log: ScoredLog, router: RouterConfig, value_aware: ValueAwareConfig, budget: float
) -> Callable[[ManualClock], Router]:
    controller = dataclasses.replace(value_aware.controller, budget_share=budget)
    cfg = dataclasses.replace(
        router, policy="value_aware", value_aware=dataclasses.replace(value_aware, controller=controller)
    )

    def make(clock: ManualClock) -> Router:
        return make_router(cfg, clock, schema=log.schema, item_values=log.item_values)

    return make


def readme_table(policies: dict[str, Any], budgets: tuple[float, ...]) -> str:
    """The seed's comparison as a markdown table: one model for all, a static cascade, value-aware."""
    rows = [
        ("One model for all (always_full)", "always_full"),
        ("Static cascade (static_tiers)", "static_tiers"),
    ]
    for b in budgets:
        if f"{b:g}" in ("0.5", "0.7"):
            rows.append((f"Value-aware routing, {b:.0%} budget", f"value_aware@{b:g}"))
    rows.append(("Cheap path for all (always_cheap)", "always_cheap"))
    lines = [
        "| policy | compute vs full | cost per 1,000 requests (CPU s) | p50 latency (ms) | "
        "throughput per core (req/s) | revenue per inference |",
        "|---|---|---|---|---|---|",
    ]
    for label, name in rows:
        if name not in policies:
            continue
        p = policies[name]
        lines.append(
            f"| {label} | {p['compute_share']:.0%} | {p['cost_per_1000_cpu_s']:.3f} | "
            f"{p['latency_p50_ms']:.2f} | {p['throughput_per_core']:,.0f} | "
            f"${p['revenue_per_inference']:.4f} |"
        )
    return "\n".join(lines)


def _ranking_summary(log: ScoredLog) -> dict[str, Any]:
    """Revenue per inference of each path's slates ordered by expected value and by click."""
    rev = log.ranking_revenue
    n = max(len(log), 1)
    out: dict[str, Any] = {"served": "click" if log.item_values is None else "value"}
    for order in ("value", "click"):
        out[f"{order}_revenue_per_inference"] = {p: r / n for p, r in rev.get(order, {}).items()}
    if rev.get("value") and rev.get("click"):
        out["value_over_click"] = {
            p: rev["value"][p] / rev["click"][p] if rev["click"][p] else float("nan") for p in rev["value"]
        }
    return out


def _router_summary(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "lambda": stats.get("lambda"),
        "cost_ms": stats.get("cost_ms"),
        "value_model": stats.get("value_model"),
        "explored": sum(s["explored"] for s in stats.get("segments", {}).values()),
    }


def format_report(result: dict[str, Any]) -> str:
    if "estimates" in result:  # a live-log evaluation
        return json.dumps(result, indent=2)
    lines = [
        f"replay of {result['requests']} requests, {result['candidates']} candidates, "
        f"full {result['costs']['full_ms_per_request']:.3f} ms vs cheap "
        f"{result['costs']['cheap_ms_per_request']:.4f} ms per request "
        f"({result['costs']['full_over_cheap']:.0f}x)",
        "",
        f"{'policy':<22}{'revenue':>10}{'rev/inf':>10}{'compute':>9}{'full':>7}{'p50 ms':>8}{'p99 ms':>8}",
    ]
    for name, p in result["policies"].items():
        lines.append(
            f"{name:<22}{p['revenue']:>10.2f}{p['revenue_per_inference']:>10.5f}"
            f"{p['compute_share']:>9.2f}{p['full_share']:>7.2f}{p['latency_p50_ms']:>8.2f}{p['latency_p99_ms']:>8.2f}"
        )
    lines += ["", json.dumps(result["checks"], indent=2), "", result["readme_table"]]
    return "\n".join(lines)


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares, got {text!r}") from exc
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be in (0, 1], got {text!r}")
    return values
