"""`valuerank index`: train the two-tower retrieval model and build the serving index folder.

``<artifacts>/index/<key>/`` holds what ``serving.assets.ServingAssets`` loads::

    catalog.npz, catalog.json   item / user ids, user dense features, retrieval vectors, prices
    items.faiss                 the inner-product index over [item vector, log price] (value
                                retrieval, ``embeddings.index.value_vectors``), row i = item id i
    manifest.json               configs, recall@k against exact search, two-tower metrics

``manifest.json`` is written last and atomically: a folder with it is complete, and a later
call with the same world and configs (the key) reuses it instead of rebuilding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dlrm.artifact import config_key, write_json_atomic
from dlrm.configs import add_flags, from_flags
from dlrm.synth import ensure_world_logs
from dlrm.two_tower import TwoTowerConfig, train_world_two_tower
from dlrm.world import World, WorldConfig
from embeddings.catalog import CATALOG_FORMAT, world_catalog
from embeddings.index import IndexConfig, build_index, recall_at_k, value_queries, value_vectors

INDEX_FILE = "items.faiss"
MANIFEST = "manifest.json"
INDEX_FORMAT = 2
"""2: rows carry a log-price coordinate (``value_coordinate`` in the manifest)."""
SLATE_REQUESTS = 300
"""Requests sampled to measure how much of the ground-truth best slate retrieval reaches."""
LATENCY_QUERIES = 200
"""Single-vector searches timed for the manifest's median query latency."""


def ensure_index(
    world_config: WorldConfig,
    artifacts: Path,
    index_config: IndexConfig | None = None,
    two_tower_config: TwoTowerConfig | None = None,
    progress: bool = True,
) -> Path:
    """The index folder for these configs (default: the dataclasses' defaults), built unless a
    complete one exists."""
    index_config = index_config or IndexConfig()
    two_tower_config = two_tower_config or TwoTowerConfig()
    key = config_key(
        "index",
        INDEX_FORMAT,
        CATALOG_FORMAT,
        world_config.key(),
        asdict(index_config),
        asdict(two_tower_config),
    )
    folder = artifacts / "index" / key
    if is_complete(folder):
        if progress:
            print(f"index: reusing {folder}", file=sys.stderr)
        return folder
    started = time.perf_counter()
    world = World(world_config)
    logs = ensure_world_logs(world_config, artifacts, world=world, log=progress)
    tower = train_world_two_tower(world, logs.train, logs.test, two_tower_config, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    world_catalog(world, tower.item_vectors, tower.user_vectors).save(folder)

    index_started = time.perf_counter()
    rows = value_vectors(tower.item_vectors, world.item_price)
    index = build_index(rows, index_config)
    index_seconds = time.perf_counter() - index_started
    tmp = folder / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / INDEX_FILE)

    rng = np.random.default_rng(index_config.recall_seed)
    # Queries follow traffic (Zipf user activity), as the served recall does.
    # Queries as served: by expected value (weight 1 on the log price).
    queries = value_queries(
        tower.user_vectors[world.sample_requests(index_config.recall_queries, rng).user], 1.0
    )
    k = min(index_config.recall_k, world.n_items)
    recall = recall_at_k(index, rows, queries, k)
    manifest: dict[str, Any] = {
        "version": f"index-{key}",
        "world_key": world_config.key(),
        "schema": world.schema.name,
        "index": index_config.params(world.n_items),
        "index_config": asdict(index_config),
        "d": int(tower.item_vectors.shape[1]),
        "value_coordinate": True,
        "n_items": int(world.n_items),
        "n_users": int(world.n_users),
        "recall_at_k": {"k": k, "value": recall, "queries": len(queries), "against": "IndexFlatIP"},
        "search_us_p50": _search_us_p50(index, queries[:LATENCY_QUERIES], k),
        "ideal_slate_recall": _ideal_slate_recall(world, index, tower.user_vectors, k, rng),
        "index_build_seconds": index_seconds,
        "build_seconds": time.perf_counter() - started,
        "two_tower": {"config": asdict(two_tower_config), "metrics": tower.metrics},
        "created_unix": time.time(),
        "faiss": faiss.__version__,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    print(
        f"index: built {manifest['index']} over {world.n_items} items (d={manifest['d']}) in "
        f"{manifest['build_seconds']:.1f} s; recall@{k} vs exact = {recall:.4f}; "
        f"two-tower test AUC = {tower.metrics['test_auc']:.4f}; wrote {folder}",
        file=sys.stderr,
    )
    return folder


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (MANIFEST, INDEX_FILE, "catalog.npz", "catalog.json"))


def load_manifest(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / MANIFEST).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank index", description=__doc__)
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    add_flags(parser, IndexConfig)
    add_flags(parser, TwoTowerConfig)
    args = parser.parse_args(argv)
    try:
        index_config = from_flags(IndexConfig, args)
        two_tower_config = from_flags(TwoTowerConfig, args)
        world_config = WorldConfig.load(args.world)
    except ValueError as exc:
        parser.error(str(exc))
    progress = not args.json or sys.stderr.isatty()
    folder = ensure_index(world_config, args.artifacts, index_config, two_tower_config, progress=progress)
    summary = {"path": str(folder), **load_manifest(folder)}
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


def _search_us_p50(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median microseconds of one single-vector search (what one Recommend call does)."""
    times = []
    for row in queries:
        started = time.perf_counter()
        index.search(row[None, :], k)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e6)


def _ideal_slate_recall(
    world: World, index: faiss.Index, user_vectors: np.ndarray, k: int, rng: np.random.Generator
) -> dict[str, float | int]:
    """Share of each request's ground-truth best slate (by expected revenue) that the index's top
    ``k`` contains, retrieving by value (``value``) and by click (``value_by_click``).

    The bound on what any ranker after retrieval can show; the truth depends on the context,
    which the user tower never sees, so even a perfect user-level model stays below 1.
    """
    requests = world.sample_requests(SLATE_REQUESTS, rng)
    slate = world.config.slate_size
    ideal = world.ideal_slates(requests, slate)
    out: dict[str, float | int] = {"k": k, "slate_size": slate, "requests": len(requests)}
    for name, weight in (("value", 1.0), ("value_by_click", 0.0)):
        _, found = index.search(value_queries(user_vectors[requests.user], weight), k)
        hits = [np.intersect1d(f[f >= 0], t).size for f, t in zip(found, ideal, strict=True)]
        out[name] = float(np.mean(hits) / slate)
    return out


if __name__ == "__main__":
    sys.exit(main())
