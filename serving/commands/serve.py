"""`valuerank serve`: run the gRPC Recommender until SIGINT or SIGTERM.

Serve a model and an index folder (``--model DIR --index DIR``), or the world's artifacts
(``--artifacts DIR [--world FILE]``), which are trained and built first when missing. The
port opens at once with health NOT_SERVING; ``serving on HOST:PORT`` is printed (stdout,
flushed) once the model and index are loaded and health is SERVING. A signal stops the
server gracefully: health NOT_SERVING, in-flight calls finish within ``--grace-s``.
``--workers N`` runs N server processes on the port (``serving.edge.workers``).
``--item-store-config store.json`` serves the item-side embeddings from the Redis tier (pushed
first by ``valuerank embeddings push``); GetRoutingStats then reports the store's counters.

Every setting comes from, in rising precedence: ``--config FILE`` (JSON, or TOML by its suffix:
the nested ``ServeConfig`` tree, e.g. ``{"port": 50052, "router": {"policy": "value_aware"},
"tracker": {"type": "redis", "url": "redis://..."}}``), environment variables named after the
flags (``VALUERANK_BUDGET_SHARE=0.3``), then the flags. ``--print-config`` prints the effective
configuration as JSON and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss

from dlrm.configs import add_flags, apply_env, config_from_tree, config_to_tree, from_flags
from dlrm.train import train_world
from dlrm.world import WorldConfig
from embeddings.store_registry import load_store_config, store_config_from_dict
from serving.assets import ServingAssets
from serving.config import ServeConfig
from serving.edge.server import start_server
from serving.revenue.backends import load_tracker_config, tracker_config_from_dict

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank serve", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="model artifact folder")
    parser.add_argument("--index", type=Path, default=None, help="index folder (catalog + Faiss index)")
    parser.add_argument(
        "--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder (without --model/--index)"
    )
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    parser.add_argument(
        "--tracker-config", type=Path, default=None, help="revenue tracker config file (JSON)"
    )
    parser.add_argument(
        "--item-store-config", type=Path, default=None, help="item-side embedding store config file (JSON)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (JSON, or TOML by suffix): the ServeConfig tree",
    )
    parser.add_argument("--print-config", action="store_true", help="print the effective config (JSON), exit")
    add_flags(parser, ServeConfig)
    args = parser.parse_args(argv)
    if (args.model is None) != (args.index is None):
        parser.error("--model and --index go together (or give neither, to use --artifacts)")
    try:
        config = effective_config(parser, args, os.environ)  # a bad file fails now, not once loaded
        world = None if args.model is not None else WorldConfig.load(args.world)
    except (ValueError, FileNotFoundError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_tree(config, secret=_is_secret), indent=2))
        return 0
    # The root logger may have a handler already (torch installs one): then only our level is set.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("serving").setLevel(args.log_level.upper())

    # One OpenMP thread for Faiss: retrieval is batched on one worker thread already, and a
    # second OpenMP worker would take a core from the event loop and the model thread.
    faiss.omp_set_num_threads(1)

    if config.workers > 1:
        return _serve_workers(config, list(sys.argv[1:] if argv is None else argv), args, world)

    def load() -> ServingAssets:
        if world is None:
            return ServingAssets.load(args.model, args.index)
        return _world_assets(world, args.artifacts)

    return asyncio.run(_serve(load, config))


def effective_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> ServeConfig:
    """The config file, then the environment, then the flags (each overriding the one before);
    ``--tracker-config`` / ``--item-store-config`` files replace the config file's sections."""
    base = ServeConfig()
    if args.config is not None:
        text = args.config.read_text()
        raw = tomllib.loads(text) if args.config.suffix == ".toml" else json.loads(text)
        backends: dict[str, Callable[[Any], Any]] = {
            "tracker": tracker_config_from_dict,
            "item_store": store_config_from_dict,
        }
        base = config_from_tree(ServeConfig, raw, f"config file {args.config}", backends)
    apply_env(parser, args, environ)
    files: dict[str, Any] = {}
    if args.tracker_config is not None:
        files["tracker"] = load_tracker_config(args.tracker_config)
    if args.item_store_config is not None:
        files["item_store"] = load_store_config(args.item_store_config)
    return from_flags(ServeConfig, args, base=base, **files)


def _is_secret(name: str) -> bool:
    return "token" in name or "password" in name


async def _serve(load: Callable[[], ServingAssets], config: ServeConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = await start_server(load, config)
    except OSError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a reuse-port worker loads before it binds
        print(f"serve: error: loading failed: {exc}", file=sys.stderr)
        return 1
    ready = asyncio.ensure_future(server.wait_ready())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if ready.done():
        if ready.exception() is not None:
            print(f"serve: error: loading failed: {ready.exception()}", file=sys.stderr)
            code = 1
        else:
            if server.metrics_port is not None:
                print(f"metrics on http://{config.metrics_host}:{server.metrics_port}/metrics", flush=True)
            print(f"serving on {server.address}", flush=True)
            await stopping
    log.info("stopping (grace %.1f s)", config.grace_s)
    ready.cancel()
    stopping.cancel()
    await server.stop()
    return code


def _serve_workers(
    config: ServeConfig, argv: list[str], args: argparse.Namespace, world: WorldConfig | None
) -> int:
    from serving.edge.workers import run_workers

    if world is None:
        model, index = args.model, args.index
    else:  # trained and built once here, not by every worker
        from embeddings.index_stage import ensure_index

        model, index = train_world(world, args.artifacts).path, ensure_index(world, args.artifacts)
    try:
        # This module's own name: how a worker is started (``python -m`` of it).
        command = [sys.executable, "-m", __spec__.name if __spec__ is not None else __name__]
        return run_workers(config, command, argv, model, index, args.tracker_config)
    except (FileNotFoundError, OSError) as exc:  # no redis-server to share the tracker, a busy port
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1


def _world_assets(world: WorldConfig, artifacts: Path) -> ServingAssets:
    # Imported here: only this mode needs the index stage (and its retrieval towers).
    from embeddings.index_stage import ensure_index

    model = train_world(world, artifacts)
    index_dir = ensure_index(world, artifacts)
    return ServingAssets.load(model.path, index_dir)


if __name__ == "__main__":
    sys.exit(main())
