"""Load what a replica serves (model artifact + retrieval index) and assemble the pipeline.

An index folder (written by ``valuerank index``) holds ``catalog.npz`` / ``catalog.json``
(see ``embeddings.catalog``), ``items.faiss`` (row i = item id i) and ``manifest.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss

from dlrm.artifact import ModelArtifact, load_artifact
from dlrm.factored import FactoredDLRM
from embeddings.catalog import Catalog
from serving.clock import Clock
from serving.domain import Path_
from serving.features import FeatureResolver
from serving.pipeline import Pipeline, PipelineConfig
from serving.retriever import FaissRetriever
from serving.revenue import InMemoryTracker, RevenueTracker
from serving.router import FixedRouter, Router
from serving.scoring import CheapScorer, FullScorer, Scorer

INDEX_FILE = "items.faiss"
INDEX_MANIFEST = "manifest.json"


@dataclass
class ServingAssets:
    model: ModelArtifact
    catalog: Catalog
    index: faiss.Index
    index_manifest: dict[str, Any]

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
    config: PipelineConfig = PipelineConfig(),
    clock: Clock | None = None,
    model_threads: int = 1,
) -> Pipeline:
    schema = assets.model.schema
    factored = FactoredDLRM(assets.model.load_model(), schema)
    scorers: dict[Path_, Scorer] = {
        "full": FullScorer(factored, assets.catalog, threads=model_threads),
        "cheap": CheapScorer(assets.catalog),
    }
    return Pipeline(
        resolver=FeatureResolver(schema, assets.catalog),
        retriever=FaissRetriever(assets.index),
        scorers=scorers,
        router=router or FixedRouter("full"),
        tracker=tracker or InMemoryTracker(),
        model_version=assets.model.version,
        config=config,
        clock=clock,
    )
