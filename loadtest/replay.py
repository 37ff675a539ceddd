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
from loadtest.depth_sim import (
    DepthCurves,
    DepthRun,
    depth_curves,
    fixed_column,
    group_table,
    oracle_columns,
    run_columns,
    run_depth_router,
    summarise_depth,
    table_columns,
)
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
from serving.routing.config import DepthConfig, RouterConfig, ValueAwareConfig
from serving.routing.policies import make_router
from serving.routing.router import Router

DEFAULT_BUDGETS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)


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
        "--write-log", type=Path, default=None, help="write value_aware_binary@0.5's decisions as a JSONL log"
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
    log, warmup, curves, warm_curves = build_scored_logs(
        world_config, args.artifacts, args.index, config, progress=progress
    )
    router = from_flags(RouterConfig, args, policy="value_aware", seed=config.seed)
    result = replay(log, load, router, config, args.budgets, warmup)
    result.update(replay_depths(log, curves, load, router, config, args.budgets, result, warm_curves, warmup))
    result["world"] = {"key": world_config.key(), "file": str(args.world) if args.world else "bundled"}
    if args.plot is not None:
        from loadtest.plot import plot_curves

        plot_curves(result, args.plot)
        result["plot"] = str(args.plot)
    if args.write_log is not None:
        from loadtest.offpolicy import write_replay_log

        runs = result["_runs"]
        nearest = min(args.budgets, key=lambda b: abs(b - 0.5))
        write_replay_log(log, runs[f"value_aware_binary@{nearest:g}"], args.write_log)
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
) -> tuple[ScoredLog, ScoredLog | None, DepthCurves, DepthCurves | None]:
    """Train (or reuse) the model and index of ``world_config``; score its replay log and, when
    ``config.warmup_requests``, a warm-up day drawn from the world with another seed; price every
    cascade depth on each (``loadtest.depth_sim``)."""
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
    from serving.assembly import full_scorer

    scorer = full_scorer(
        assets, precision=config.scoring.precision, mlp_precision=config.scoring.mlp_precision, threads=1
    )
    curves = depth_curves(log, world, scorer.score_batch, seed=config.seed, batch=config.batch)
    warm_curves = None
    if warmup is not None:
        warm_curves = depth_curves(
            warmup, world, scorer.score_batch, seed=config.seed + 1, batch=config.batch
        )
    if progress:
        costs = ", ".join(f"{int(m)}: {c:.3f}" for m, c in zip(curves.depths, curves.cost_ms, strict=True))
        print(f"replay: CPU ms per request by depth {{{costs}}}", file=sys.stderr, flush=True)
    return log, warmup, curves, warm_curves


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
        runs[f"binary_oracle@{b:g}"] = run_mask(log, f"binary_oracle@{b:g}", oracle_mask(log, b), times, load)
        runs[f"binary_oracle_segment@{b:g}"] = run_mask(
            log, f"binary_oracle_segment@{b:g}", segment_oracle_mask(log, b), times, load
        )
        make = _value_aware_factory(log, router, value_aware, b)
        runs[f"value_aware_binary@{b:g}"] = run_router(
            log, f"value_aware_binary@{b:g}", make, times, load, warm
        )
    if warm is not None and budgets:
        # The same router from a cold start on the replayed day, for the record.
        b = min(budgets, key=lambda x: abs(x - 0.5))
        make = _value_aware_factory(log, router, value_aware, b)
        runs[f"value_aware_binary_cold@{b:g}"] = run_router(
            log, f"value_aware_binary_cold@{b:g}", make, times, load
        )
    policies = {name: summarise(log, r, load) for name, r in runs.items()}
    for name, r in runs.items():
        if r.router_stats:
            policies[name]["router"] = _router_summary(r.router_stats)
    full_rev = policies["always_full"]["revenue"]
    # Today's binary router against the binary baselines (the depth router's checks are
    # ``replay_depths``'s).
    checks: dict[str, Any] = {"over_always_full": {}, "over_static": {}, "over_oracle_segment": {}}
    for b in budgets:
        va = policies[f"value_aware_binary@{b:g}"]["revenue"]
        checks["over_always_full"][f"{b:g}"] = va / full_rev if full_rev else float("nan")
        st = policies[f"static_tiers@{b:g}"]["revenue"]
        checks["over_static"][f"{b:g}"] = va / st if st else float("nan")
        seg = policies[f"binary_oracle_segment@{b:g}"]["revenue"]
        checks["over_oracle_segment"][f"{b:g}"] = va / seg if seg else float("nan")
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
        "binary_checks": checks,
        "_runs": runs,
    }


def replay_depths(
    log: ScoredLog,
    curves: DepthCurves,
    load: LoadModel,
    router: RouterConfig,
    config: ReplayConfig,
    budgets: tuple[float, ...],
    result: dict[str, Any],
    warm_curves: DepthCurves | None = None,
    warmup: ScoredLog | None = None,
) -> dict[str, Any]:
    """The depth policies over ``log`` (``loadtest.depth_sim``), added to ``result``'s policies,
    with the checks of value-aware depth routing against them and the README table."""
    times = arrival_times(log, load)
    warm = None
    if warmup is not None and warm_curves is not None:
        warm = (warmup, warm_curves, arrival_times(warmup, load))
    depth_cfg = router.depth
    if config.window_requests and len(log) > 1:
        window_s = config.window_requests * float(times[-1] - times[0]) / len(log)
        depth_cfg = dataclasses.replace(
            depth_cfg, controller=dataclasses.replace(depth_cfg.controller, window_s=max(window_s, 1e-6))
        )
    surfaces, segments = log.surface_names, log.segments
    runs: dict[str, DepthRun] = {}
    tables: dict[str, dict[str, int]] = {}
    for b in budgets:
        tag = f"{b:g}"
        fixed = np.full(len(log), fixed_column(curves, b))
        runs[f"fixed_depth@{tag}"] = run_columns(curves, f"fixed_depth@{tag}", fixed, times, load, log)
        tables[tag] = group_table(curves, surfaces, b)
        columns = table_columns(surfaces, tables[tag])
        runs[f"depth_table@{tag}"] = run_columns(curves, f"depth_table@{tag}", columns, times, load, log)
        columns = table_columns(segments, group_table(curves, segments, b))
        runs[f"oracle_segment@{tag}"] = run_columns(
            curves, f"oracle_segment@{tag}", columns, times, load, log
        )
        runs[f"oracle@{tag}"] = run_columns(
            curves, f"oracle@{tag}", oracle_columns(curves, b), times, load, log
        )
        make = _depth_factory(log, router, depth_cfg, b)
        runs[f"value_aware@{tag}"] = run_depth_router(
            log, curves, f"value_aware@{tag}", make, times, load, warm
        )
    policies = result["policies"]
    for name, r in runs.items():
        policies[name] = summarise_depth(log, curves, r, load)
        if r.router_stats:
            policies[name]["router"] = _router_summary(r.router_stats)
    for name in ("always_full", "always_cheap"):  # the same runs, in the depth summaries' terms
        column = np.full(len(log), len(curves.depths) - 1 if name == "always_full" else 0)
        policies[name]["depth_mix"] = summarise_depth(
            log, curves, DepthRun(name, column, column * 0.0), load
        )["depth_mix"]
    full_rev = policies["always_full"]["revenue"]
    names = ("always_full", "fixed_depth", "depth_table", "oracle_segment", "oracle")
    checks: dict[str, Any] = {f"value_aware_over_{n}": {} for n in names}
    for b in budgets:
        tag = f"{b:g}"
        va = policies[f"value_aware@{tag}"]["revenue"]
        for n in names:
            other = full_rev if n == "always_full" else policies[f"{n}@{tag}"]["revenue"]
            checks[f"value_aware_over_{n}"][tag] = va / other if other else float("nan")
    return {
        "depths": {
            "evaluated": [int(m) for m in curves.depths],
            "router_grid": list(router.depth.depths),
            "cpu_ms_per_request": {
                str(int(m)): float(c) for m, c in zip(curves.depths, curves.cost_ms, strict=True)
            },
            "tables": {tag: {s: int(curves.depths[j]) for s, j in t.items()} for tag, t in tables.items()},
        },
        "checks": checks,
        "readme_table": readme_table(policies, budgets),
    }


def _depth_factory(
    log: ScoredLog, router: RouterConfig, depth: DepthConfig, budget: float
) -> Callable[[ManualClock], Router]:
    controller = dataclasses.replace(depth.controller, budget_share=budget)
    cfg = dataclasses.replace(
        router, policy="value_aware", depth=dataclasses.replace(depth, controller=controller)
    )

    def make(clock: ManualClock) -> Router:
        return make_router(cfg, clock, schema=log.schema, item_values=log.item_values)

    return make


def _value_aware_factory(
    log: ScoredLog, router: RouterConfig, value_aware: ValueAwareConfig, budget: float
) -> Callable[[ManualClock], Router]:
    controller = dataclasses.replace(value_aware.controller, budget_share=budget)
    cfg = dataclasses.replace(
        router,
        policy="value_aware_binary",
        value_aware=dataclasses.replace(value_aware, controller=controller),
    )

    def make(clock: ManualClock) -> Router:
        return make_router(cfg, clock, schema=log.schema, item_values=log.item_values)

    return make


def readme_table(policies: dict[str, Any], budgets: tuple[float, ...]) -> str:
    """The seed's comparison as a markdown table: one model for all, a static cascade (by surface,
    and by depth), today's binary router and value-aware depth, at two budgets."""
    rows = [("One model for all (always_full)", "always_full"), ("Static tiers by surface", "static_tiers")]
    for b in budgets:
        tag = f"{b:g}"
        if tag not in ("0.2", "0.4"):
            continue
        rows += [
            (f"One depth for all, {b:.0%} budget", f"fixed_depth@{tag}"),
            (f"Depth per surface (hindsight), {b:.0%}", f"depth_table@{tag}"),
            (f"Binary value-aware (full or cheap), {b:.0%}", f"value_aware_binary@{tag}"),
            (f"**Value-aware depth**, {b:.0%} budget", f"value_aware@{tag}"),
            (f"Oracle per segment, {b:.0%}", f"oracle_segment@{tag}"),
        ]
    rows.append(("Cheap path for all (always_cheap)", "always_cheap"))
    full = policies["always_full"]["revenue"] or 1.0
    lines = [
        "| policy | compute vs full | revenue vs full | revenue per inference | mean depth |",
        "|---|---|---|---|---|",
    ]
    for label, name in rows:
        if name not in policies:
            continue
        p = policies[name]
        depth = p.get("mean_depth")
        lines.append(
            f"| {label} | {p['compute_share']:.0%} | {p['revenue'] / full:.3f} | "
            f"${p['revenue_per_inference']:.4f} | {'-' if depth is None else f'{depth:.0f}'} |"
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
        "explored": sum(s.get("explored", 0.0) for s in stats.get("segments", {}).values()),
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
        f"{'policy':<26}{'revenue':>10}{'rev/inf':>10}{'compute':>9}{'full':>7}{'p50 ms':>8}{'p99 ms':>8}",
    ]
    for name, p in result["policies"].items():
        full_share = p.get("full_share", float("nan"))
        lines.append(
            f"{name:<26}{p['revenue']:>10.2f}{p['revenue_per_inference']:>10.5f}"
            f"{p['compute_share']:>9.2f}{full_share:>7.2f}{p.get('latency_p50_ms', float('nan')):>8.2f}"
            f"{p['latency_p99_ms']:>8.2f}"
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
