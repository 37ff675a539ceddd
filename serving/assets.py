"""Load what a replica serves (model artifact + retrieval index) and assemble the pipeline.

An index folder (written by ``valuerank index``) holds ``catalog.npz`` / ``catalog.json``
(see ``embeddings.catalog``), ``items.faiss`` (row i = item id i) and ``manifest.json``.
Item-side embedding rows are served in process (FBGEMM tables), or from an ``EmbeddingStore``
(the Redis tier: ``valuerank embeddings push`` first, then ``serve --item-store-config``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss

from dlrm.artifact import ModelArtifact, load_artifact
from dlrm.factored import FactoredDLRM, split_tables
from embeddings.catalog import Catalog
from embeddings.clock import Clock
from embeddings.index import log_prices
from embeddings.precision import MLP_DTYPES, choose_mlp_precision, choose_precision
from embeddings.quant import PRECISIONS, Precision, quant_tables, quantize_collection
from embeddings.store import EmbeddingStore, StoreBackedTables
from serving.decision_log import DecisionLog
from serving.domain import Path_
from serving.features import FeatureResolver
from serving.pipeline import Pipeline, PipelineConfig
from serving.ranking import RANK_BY, RankBy, item_values_for
from serving.retriever import FaissRetriever
from serving.revenue.memory import InMemoryTracker
from serving.revenue.tracker import RevenueTracker
from serving.routing.router import FixedRouter, Router
from serving.scoring import CheapScorer, FullScorer, Scorer

log = logging.getLogger(__name__)

INDEX_FILE = "items.faiss"
INDEX_MANIFEST = "manifest.json"


@dataclass
class ServingAssets:
    model: ModelArtifact
    catalog: Catalog
    index: faiss.Index
    index_manifest: dict[str, Any]

    def retriever(self, value_weight: float = 1.0) -> FaissRetriever:
        """The index's retriever, scoring ``<user, item> + value_weight x log price`` when the
        index rows carry a log-price coordinate (``embeddings.index.value_vectors``; 1: by
        expected value, 0: by click); an index without one retrieves by click."""
        if not self.index_manifest.get("value_coordinate"):
            return FaissRetriever(self.index)
        if self.catalog.item_price is None:
            raise ValueError("the index has a log-price coordinate but the catalog has no prices")
        return FaissRetriever(self.index, log_prices(self.catalog.item_price), value_weight=value_weight)

    @classmethod
    def load(cls, model_dir: Path, index_dir: Path) -> ServingAssets:
        model = load_artifact(model_dir)
        if not (index_dir / INDEX_MANIFEST).is_file():
            raise FileNotFoundError(f"no complete index in {index_dir}")
        manifest = json.loads((index_dir / INDEX_MANIFEST).read_text())
        return cls(model, Catalog.load(index_dir), faiss.read_index(str(index_dir / INDEX_FILE)), manifest)


def build_pipeline(
    assets: ServingAssets,
    *,
    router: Router | None = None,
    tracker: RevenueTracker | None = None,
    config: PipelineConfig | None = None,
    clock: Clock | None = None,
    model_threads: int = 1,
    precision: str = "fp32",
    mlp_precision: str = "fp32",
    item_store: EmbeddingStore | None = None,
    decision_log: DecisionLog | None = None,
    rank_by: RankBy = "value",
    retrieval_value_weight: float = 1.0,
) -> Pipeline:
    """The serving pipeline around ``assets.retriever(retrieval_value_weight)``,
    ``full_scorer(assets, ...)`` and the cheap path; slates ordered by ``rank_by``."""
    scorers: dict[Path_, Scorer] = {
        "full": full_scorer(
            assets,
            precision=precision,
            mlp_precision=mlp_precision,
            threads=model_threads,
            item_store=item_store,
        ),
        "cheap": CheapScorer(),
    }
    return Pipeline(
        resolver=FeatureResolver(assets.model.schema, assets.catalog),
        retriever=assets.retriever(retrieval_value_weight),
        scorers=scorers,
        router=router or FixedRouter("full"),
        tracker=tracker or InMemoryTracker(),
        model_version=assets.model.version,
        config=config or PipelineConfig(),
        clock=clock,
        decision_log=decision_log,
        item_values=item_values_for(rank_by, assets.catalog.item_price),
    )


def check_scoring_choices(
    precision: str, mlp_precision: str, rank_by: str, retrieval_value_weight: float
) -> None:
    """Validate what ``build_pipeline`` takes about the full path, retrieval and the slate order
    (``ServeConfig`` and the replay's config both carry these); ValueError names the field."""
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"{precision=} must be auto or one of {PRECISIONS}")
    if mlp_precision not in ("auto", *MLP_DTYPES):
        raise ValueError(f"{mlp_precision=} must be auto or one of {tuple(MLP_DTYPES)}")
    if rank_by not in RANK_BY:
        raise ValueError(f"{rank_by=} must be one of {RANK_BY}")
    if not 0.0 <= retrieval_value_weight <= 10.0:
        raise ValueError(f"{retrieval_value_weight=} must be in [0, 10]")


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
