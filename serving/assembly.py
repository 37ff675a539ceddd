"""Assemble a replica's pipeline from its config: ``build_pipeline(assets, ServeConfig)`` is the one
place that turns configuration into running parts (the server and the benchmarks call it).

Item-side embedding rows are served in process (FBGEMM tables), or from an ``EmbeddingStore``
(the Redis tier: ``valuerank embeddings push`` first, then ``serve --item-store-config``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from dlrm.factored import FactoredDLRM, split_tables
from embeddings.clock import Clock
from embeddings.precision import MLP_DTYPES, choose_mlp_precision, choose_precision
from embeddings.quant import PRECISIONS, Precision, quant_tables, quantize_collection
from embeddings.store import EmbeddingStore, MemoryStoreConfig, StoreBackedTables
from embeddings.store_registry import open_store
from serving.assets import ServingAssets
from serving.config import ServeConfig
from serving.decision_log import DecisionLog
from serving.domain import Path_
from serving.features import FeatureResolver
from serving.pipeline import Pipeline
from serving.ranking import item_values_for
from serving.revenue.backends import make_tracker
from serving.revenue.config import RedisTrackerConfig
from serving.revenue.tracker import RevenueTracker
from serving.routing.depth import DepthRouter
from serving.routing.policies import make_router
from serving.routing.router import Router
from serving.routing.shared import RedisLearning
from serving.scoring import CheapScorer, FullScorer, Scorer

log = logging.getLogger(__name__)


def build_pipeline(
    assets: ServingAssets,
    config: ServeConfig = ServeConfig(),
    *,
    clock: Clock | None = None,
    router: Router | None = None,
    tracker: RevenueTracker | None = None,
    item_store: EmbeddingStore | None = None,
) -> Pipeline:
    """The serving pipeline ``config`` describes around ``assets``: the retriever, the full path
    (``full_scorer``) and the cheap one, the router, the revenue tracker, the item store and the
    decision log. ``router``, ``tracker`` and ``item_store`` replace what the config would build
    (tests, benchmarks); an item store passed in is the caller's to close, one built here the
    pipeline's."""
    scoring = config.scoring
    owned: list[Callable[[], None]] = []
    if item_store is None and config.item_store is not None:
        store_config = config.item_store
        if isinstance(store_config, MemoryStoreConfig) and not store_config.artifact:
            store_config = dataclasses.replace(store_config, artifact=str(assets.model.path))
        item_store = open_store(store_config)  # monotonic: the pipeline's clock
        owned.append(item_store.close)
    item_values = item_values_for(scoring.rank_by, assets.catalog.item_price)
    scorers: dict[Path_, Scorer] = {
        "full": full_scorer(
            assets,
            precision=scoring.precision,
            mlp_precision=scoring.mlp_precision,
            threads=scoring.model_threads,
            item_store=item_store,
        ),
        "cheap": CheapScorer(),
    }
    if router is None:
        router = make_router(config.router, schema=assets.model.schema, item_values=item_values)
        share_learning(router, config)
    return Pipeline(
        resolver=FeatureResolver(assets.model.schema, assets.catalog),
        retriever=assets.retriever(scoring.retrieval_value_weight),
        scorers=scorers,
        router=router,
        tracker=tracker or make_tracker(config.tracker),
        model_version=assets.model.version,
        config=config.pipeline,
        clock=clock,
        decision_log=DecisionLog(Path(config.decision_log)) if config.decision_log else None,
        item_values=item_values,
        on_close=owned,
    )


def share_learning(router: Router, config: ServeConfig) -> None:
    """With a Redis tracker (every ``serve --workers`` group has one), the depth router's gain
    models learn from all replicas: their statistics are exchanged through that Redis."""
    tracker = config.tracker
    if not (isinstance(router, DepthRouter) and isinstance(tracker, RedisTrackerConfig)):
        return
    if config.router.depth.share_learning:
        prefix = tracker.key_prefix + "router:"
        router.share_through(RedisLearning(tracker.url, prefix, socket_timeout_s=tracker.socket_timeout_s))


def full_scorer(
    assets: ServingAssets,
    *,
    precision: str = "fp32",
    mlp_precision: str = "fp32",
    threads: int = 1,
    item_store: EmbeddingStore | None = None,
) -> FullScorer:
    """The full path as the server runs it: FBGEMM tables in ``precision`` (fp32 | fp16 | int8,
    or auto: the model's measured choice) and the per-candidate MLP in ``mlp_precision`` (fp32 |
    bf16, or auto: bf16 where the CPU has it natively and it measured harmless), both from
    ``embeddings.precision``.

    With ``item_store``, the item-side rows come from that store instead (as pushed: fp32 or
    fp16 rows), read through its hot-row cache within each request's deadline; the store must
    run on the pipeline's clock, and the caller closes it after the pipeline.
    """
    schema = assets.model.schema
    tables_precision = choose_precision(assets.model) if precision == "auto" else precision
    if tables_precision not in PRECISIONS:
        raise ValueError(f"{precision=} must be auto or one of {PRECISIONS}")
    resolved = cast(Precision, tables_precision)
    mlp = choose_mlp_precision(assets.model, resolved) if mlp_precision == "auto" else mlp_precision
    if mlp not in MLP_DTYPES:
        raise ValueError(f"{mlp_precision=} must be auto or one of {tuple(MLP_DTYPES)}")
    model = assets.model.load_model()
    tables: tuple[Any, Any]
    if item_store is None:
        tables = quant_tables(model, schema, resolved)
    else:
        request, _ = split_tables(model, schema)
        tables = (quantize_collection(request, resolved), store_tables(item_store, assets))
    log.info("full path: %s tables, %s per-candidate MLP", resolved, mlp)
    return FullScorer(FactoredDLRM(model, schema, *tables), assets.catalog, threads, MLP_DTYPES[mlp])


def store_tables(store: EmbeddingStore, assets: ServingAssets) -> StoreBackedTables:
    """The model's item-side tables read from ``store``; refuses rows of another model version."""
    schema = assets.model.schema
    tables = StoreBackedTables.for_schema(store, schema, "item")
    if tables.dim != schema.embedding_dim:
        raise ValueError(f"store rows have dim {tables.dim}, the model {schema.embedding_dim}")
    for meta in getattr(store, "meta", []):  # remote stores record the version that was pushed
        if meta.version != assets.model.version:
            raise ValueError(
                f"table {meta.name} in the store was pushed from model {meta.version}, "
                f"serving {assets.model.version}: push this model (under its own key prefix)"
            )
    return tables
