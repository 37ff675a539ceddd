"""`valuerank loadtest`: one open-loop run (``loadtest.live.loadgen``), a capacity search or the
overload scenario (``loadtest.live.capacity``), or the fault table (``--faults``:
``loadtest.live.faults``). ``--json`` prints one JSON object; ``--plot FILE.png``
draws latency, goodput and path mix over the run (for ``--overload``: goodput, p99 and revenue
per second against the offered load)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlrm.configs import add_flags, from_flags
from loadtest.live import capacity
from loadtest.live.loadgen import LoadConfig, run_load
from loadtest.live.report import format_report, plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank loadtest", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the run over time")
    parser.add_argument(
        "--faults",
        action="store_true",
        help="serve --workers on a Redis tracker; under load: kill its Redis, a worker; reload; drain",
    )
    capacity.add_search_flags(parser)
    add_flags(parser, LoadConfig)
    args = parser.parse_args(argv)
    try:
        config = from_flags(LoadConfig, args)
    except ValueError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    if args.faults:
        from loadtest.live.faults import format_faults, run_faults

        model_dir, index_dir = capacity.artifact_dirs(args.artifacts, None)
        result = run_faults(config, model_dir, index_dir, args.workers)
        print(json.dumps(result) if args.json else format_faults(result))
        failed = [r["fault"] for r in result["faults"] if r["lost"] or r["duplicated"]]
        return 1 if failed else 0
    if args.overload or args.find_capacity:
        return capacity.run_search(args, config)
    report = run_load(config, progress=True)
    if args.plot is not None:
        plot_run(report, args.plot)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
