"""Capacity searches on live servers: ``--find-capacity``, ``--overload`` and ``valuerank bench capacity``.

A rate *passes* when the answered requests' p99 is within the SLO, under 0.1% of requests fail
and the generator kept up with its schedule. The search raises the rate by 1.6x until a rate
fails, then bisects between the last pass and the first failure (after a short warm-up that is
not counted); the capacity is the achieved goodput at the highest rate that passed. The load
generator's worker processes start once and run every step (``LoadWorkers``). A search that
stops because the *generator* could not keep up says so (``limited_by_generator``): the
server's capacity is then at least that.

``--overload`` is the seed's scenario, live: it starts ``valuerank serve`` itself (always_full
without degradation, to find its capacity C), then value_aware and always_full with the
default admission, each warmed up with outcomes, and drives 1.0x, 1.67x, 3x and 10x C.

``valuerank bench capacity --json`` measures in one run the capacity of the bare transport (a
``grpc.aio`` server with a canned response of the real size, ``serving.edge.canned``) and of
valuerank under always_full and always_cheap (K = 500, k = 10, p99 <= 30 ms, no degradation,
no outcomes; ``--workers N``: valuerank as ``serve --workers N``, the transport one process as
the issue defines it), each beside the transport as a ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.live.loadgen import LoadConfig, LoadWorkers
from loadtest.live.servers import ServerProcess, start_canned, start_serve

MAX_ERROR_SHARE = 0.001
MIN_RPS = 10.0
"""A search that fails even here reports capacity 0."""
OVERLOAD_FACTORS = (1.0, 1.67, 3.0, 10.0)
SEARCH_PROCESSES = 2
"""Load-generator processes of a search: enough for the rates one 2-core machine can offer."""


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--find-capacity", action="store_true", help="search the highest rate within the SLO")
    parser.add_argument(
        "--overload", action="store_true", help="start servers, find always_full's capacity C, drive 1-10x C"
    )
    parser.add_argument("--slo-ms", type=float, default=50.0, help="p99 a passing rate must keep (ms)")
    parser.add_argument("--step-duration", type=float, default=5.0, help="seconds per search step")
    parser.add_argument("--start-rps", type=float, default=100.0, help="first rate of a search")
    parser.add_argument("--refine", type=int, default=3, help="bisection steps after the first failure")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts (--overload)")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers (--overload)")


def run_search(args: argparse.Namespace, config: LoadConfig) -> int:
    if args.find_capacity and not args.overload:
        with LoadWorkers(_search_config(config)) as workers:
            result = find_capacity(
                workers, config, args.slo_ms, args.step_duration, args.start_rps, args.refine
            )
        print(json.dumps(result) if args.json else _format_capacity("capacity", result))
        return 0
    result = overload(config, args)
    if args.plot is not None:
        plot_overload(result, args.plot)
    print(json.dumps(result) if args.json else format_overload(result))
    return 0


def _search_config(config: LoadConfig) -> LoadConfig:
    return replace(config, processes=config.processes or SEARCH_PROCESSES)


def passes(report: dict[str, Any], slo_ms: float) -> bool:
    return (
        report["ok"] > 0
        and report["latency_ms"]["p99"] <= slo_ms
        and report["error_share"] < MAX_ERROR_SHARE
        and report["generator"]["kept_up"]
    )


def find_capacity(
    workers: LoadWorkers,
    base: LoadConfig,
    slo_ms: float,
    step_s: float,
    start_rps: float,
    refine: int = 3,
    label: str = "",
) -> dict[str, Any]:
    """The highest steady rate that passes (see the module docstring), with every step's figures."""
    steps: list[dict[str, Any]] = []

    def step(rps: float) -> dict[str, Any]:
        report = workers.run(replace(base, rps=rps, duration=step_s, profile="steady"), label=label)
        ok = passes(report, slo_ms)
        steps.append(_step_row(rps, report, ok))
        print(
            f"capacity{label}: {rps:7.1f} req/s -> ok {report['achieved_rps']:7.1f}, "
            f"p99 {report['latency_ms']['p99']:7.2f} ms, errors {report['error_share']:.2%}"
            f"{'' if report['generator']['kept_up'] else ', generator behind'}: {'pass' if ok else 'fail'}",
            file=sys.stderr,
            flush=True,
        )
        return report

    # Warm-up, not counted: first calls pay for lazy set-up (threads, allocator, the batcher's
    # first estimates) that a serving fleet has long paid.
    workers.run(replace(base, rps=start_rps, duration=max(step_s, 3.0), profile="steady"), label=label)
    best: tuple[float, dict[str, Any]] | None = None
    failed_at: float | None = None
    generator_limited = False
    rps = start_rps
    while rps <= 100_000.0:
        report = step(rps)
        if passes(report, slo_ms):
            best = (rps, report)
            rps *= 1.6
            continue
        failed_at = rps
        generator_limited = not report["generator"]["kept_up"] and report["error_share"] < MAX_ERROR_SHARE
        break
    while best is None and rps / 1.6 >= MIN_RPS:  # the first rate already failed: come down
        high, rps = rps, rps / 1.6
        report = step(rps)
        if passes(report, slo_ms):
            best, failed_at = (rps, report), high
    low = best[0] if best else 0.0
    high = failed_at if failed_at is not None else rps
    for _ in range(refine if best is not None and failed_at is not None else 0):
        mid = (low + high) / 2.0
        report = step(mid)
        if passes(report, slo_ms):
            low, best = mid, (mid, report)
        else:
            high = mid
    return {
        "capacity_rps": best[1]["achieved_rps"] if best else 0.0,
        "offered_rps": low,
        "p99_ms": best[1]["latency_ms"]["p99"] if best else None,
        "cpu_ms_per_request": best[1]["server_cpu_ms_per_request"] if best else None,
        "first_failing_rps": high,
        "limited_by_generator": generator_limited,
        "slo_ms": slo_ms,
        "steps": steps,
    }


def _step_row(rps: float, report: dict[str, Any], ok: bool) -> dict[str, Any]:
    return {
        "rps": rps,
        "achieved_rps": report["achieved_rps"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "error_share": report["error_share"],
        "kept_up": report["generator"]["kept_up"],
        "server_cpu_ms_per_request": report["server_cpu_ms_per_request"],
        "passed": ok,
    }


# -- the overload scenario -------------------------------------------------------------------


@contextmanager
def _serving(args: argparse.Namespace, flags: list[str]) -> Iterator[ServerProcess]:
    model_dir, index_dir = artifact_dirs(args.artifacts, None)
    server = start_serve(model_dir, index_dir, [*flags, "--workers", str(args.workers)])
    try:
        yield server
    finally:
        server.stop()


def artifact_dirs(artifacts: Path, world: str | None) -> tuple[Path, Path]:
    """The world's model and index folders (trained and built first when missing, as ``make demo``)."""
    from dlrm.train import train_world
    from dlrm.world import WorldConfig
    from embeddings.index_stage import ensure_index
    from embeddings.precision_bench import ensure_measured

    config = WorldConfig.load(Path(world) if world else None)
    model = train_world(config, artifacts)
    index_dir = ensure_index(config, artifacts)
    ensure_measured(model)
    return model.path, index_dir


def overload(config: LoadConfig, args: argparse.Namespace) -> dict[str, Any]:
    """always_full's capacity C, then value_aware and always_full at each factor of C."""
    search = _search_config(replace(config, outcomes=False))
    full_only = ["--policy", "always_full", "--no-degrade"]
    with _serving(args, full_only) as server, LoadWorkers(replace(search, target=server.target)) as workers:
        cap = find_capacity(
            workers, search, args.slo_ms, args.step_duration, args.start_rps, args.refine, " C"
        )
    c = max(cap["offered_rps"], 1.0)
    rows: list[dict[str, Any]] = []
    for policy in ("value_aware", "always_full"):
        with _serving(args, ["--policy", policy]) as server:
            stage = replace(_search_config(config), target=server.target, outcomes=True)
            with LoadWorkers(stage) as workers:
                warm = workers.run(
                    replace(stage, rps=0.6 * c, duration=max(3 * args.step_duration, 15.0)), label=" warm-up"
                )
                print(f"overload {policy}: warm-up ok {warm['achieved_rps']:.0f} req/s", file=sys.stderr)
                for factor in OVERLOAD_FACTORS:
                    report = workers.run(
                        replace(stage, rps=factor * c, duration=2 * args.step_duration),
                        label=f" {policy} {factor}x",
                    )
                    rows.append(_overload_row(policy, factor, report))
                    print(format_overload_row(rows[-1]), file=sys.stderr, flush=True)
    return {"capacity": cap, "C_rps": c, "slo_ms": args.slo_ms, "workers": args.workers, "rows": rows}


def _overload_row(policy: str, factor: float, report: dict[str, Any]) -> dict[str, Any]:
    ok = max(report["ok"], 1)
    return {
        "policy": policy,
        "load": factor,
        "offered_rps": report["offered_rps"],
        "achieved_rps": report["achieved_rps"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "errors": report["errors"],
        "error_share": report["error_share"],
        "refused_p99_ms": report["refused_latency_ms"]["p99"],
        "paths": {path: n / ok for path, n in sorted(report["paths"].items())},
        "revenue_per_inference": report["revenue_per_inference"],
        "realised_revenue_per_inference": report["realised_revenue_per_inference"],
        "revenue_per_s": report["revenue_per_s"],
        "server_cpu_ms_per_request": report["server_cpu_ms_per_request"],
        "generator_kept_up": report["generator"]["kept_up"],
        "outcomes": report["outcomes"],
    }


def format_overload_row(row: dict[str, Any]) -> str:
    paths = " ".join(f"{p} {s:.0%}" for p, s in row["paths"].items())
    errors = f"{row['error_share']:.1%}" if row["errors"] else "0"
    return (
        f"| {row['policy']} | {row['load']:.2f}x | {row['offered_rps']:.0f} | {row['achieved_rps']:.0f} | "
        f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {errors} | {paths} | "
        f"{row['revenue_per_inference']:.4f} ({row['realised_revenue_per_inference']:.4f}) | "
        f"{row['revenue_per_s']:.1f} |" + ("" if row["generator_kept_up"] else " generator behind")
    )


def format_overload(result: dict[str, Any]) -> str:
    head = [
        f"always_full capacity C = {result['C_rps']:.0f} req/s "
        f"(p99 <= {result['slo_ms']:g} ms, errors < 0.1%)",
        "",
        "| policy | load | offered/s | ok/s | p50 ms | p99 ms | errors | paths "
        "| $/inference expected (realised) | $/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [format_overload_row(r) for r in result["rows"]])


def plot_overload(result: dict[str, Any], path: Path) -> None:
    """Goodput, p99 and revenue per second against offered load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for policy in sorted({r["policy"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["policy"] == policy]
        x = [r["load"] for r in rows]
        axes[0].plot(x, [r["achieved_rps"] for r in rows], "o-", label=policy)
        axes[1].plot(x, [r["p99_ms"] for r in rows], "o-", label=policy)
        axes[2].plot(x, [r["revenue_per_s"] for r in rows], "o-", label=policy)
    for ax, title in zip(
        axes, ("goodput (ok req/s)", "p99 of answered (ms)", "expected revenue $/s"), strict=True
    ):
        ax.set_xscale("log")
        ax.set_xlabel("offered load / always_full capacity C")
        ax.set_title(title)
        ax.legend()
    axes[1].axhline(result["slo_ms"], color="gray", ls=":")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- valuerank bench capacity ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank bench capacity", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--slo-ms", type=float, default=30.0, help="p99 a passing rate must keep (ms)")
    parser.add_argument("--step-duration", type=float, default=4.0, help="seconds per search step")
    parser.add_argument("--refine", type=int, default=3, help="bisection steps after the first failure")
    parser.add_argument("--candidates", type=int, default=500, help="K: candidates retrieved")
    parser.add_argument("--k", type=int, default=10, help="items per slate")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the search steps")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers of valuerank (transport: 1)")
    args = parser.parse_args(argv)
    model_dir, index_dir = artifact_dirs(args.artifacts, None)
    base = LoadConfig(
        k=args.k, candidates=args.candidates, outcomes=False, processes=SEARCH_PROCESSES, arrivals="poisson"
    )
    no_degrade = ["--no-degrade", "--workers", str(args.workers)]
    targets: list[tuple[str, Callable[[], ServerProcess], float]] = [
        ("transport", lambda: start_canned(args.k), 400.0),
        (
            "always_full",
            lambda: start_serve(model_dir, index_dir, ["--policy", "always_full", *no_degrade]),
            100.0,
        ),
        (
            "always_cheap",
            lambda: start_serve(model_dir, index_dir, ["--policy", "always_cheap", *no_degrade]),
            200.0,
        ),
    ]
    result: dict[str, Any] = {"slo_ms": args.slo_ms, "K": args.candidates, "k": args.k}
    result["workers"] = args.workers
    for name, start, first in targets:
        with start() as server, LoadWorkers(replace(base, target=server.target)) as workers:
            result[name] = find_capacity(
                workers, base, args.slo_ms, args.step_duration, first, args.refine, f" {name}"
            )
    transport = max(result["transport"]["capacity_rps"], 1e-9)
    for name in ("always_full", "always_cheap"):
        result[name]["over_transport"] = result[name]["capacity_rps"] / transport
    result["cpu_ms_per_request"] = {name: result[name]["cpu_ms_per_request"] for name, _, _ in targets}
    if args.plot is not None:
        _plot_bench(result, args.plot)
    print(json.dumps(result) if args.json else _format_bench(result))
    return 0


def _format_capacity(name: str, cap: dict[str, Any]) -> str:
    cpu = cap["cpu_ms_per_request"]
    return (
        f"{name}: {cap['capacity_rps']:.0f} req/s at p99 {cap['p99_ms'] or 0:.1f} ms "
        f"(<= {cap['slo_ms']:g} ms), server CPU {'?' if cpu is None else f'{cpu:.2f}'} ms/request"
        + ("  (the generator could not offer more)" if cap["limited_by_generator"] else "")
    )


def _format_bench(result: dict[str, Any]) -> str:
    lines = [_format_capacity(name, result[name]) for name in ("transport", "always_full", "always_cheap")]
    lines += [
        f"{name} / transport: {result[name]['over_transport']:.2f}"
        for name in ("always_full", "always_cheap")
    ]
    return "\n".join(lines)


def _plot_bench(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("transport", "always_full", "always_cheap"):
        steps = sorted(result[name]["steps"], key=lambda s: s["rps"])
        ax.plot([s["rps"] for s in steps], [s["p99_ms"] for s in steps], "o-", label=name)
    ax.axhline(result["slo_ms"], color="gray", ls=":")
    ax.set_xlabel("offered req/s")
    ax.set_ylabel("p99 ms")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
