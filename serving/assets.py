"""Load what a replica serves: the model artifact and the retrieval index (``serving.assembly``
builds a pipeline around them).

An index folder (written by ``valuerank index``) holds ``catalog.npz`` / ``catalog.json``
(see ``embeddings.catalog``), ``items.faiss`` (row i = item id i) and ``manifest.json``.
Item-side embedding rows are served in process (FBGEMM tables), or from an ``EmbeddingStore``
(the Redis tier: ``valuerank embeddings push`` first, then ``serve --item-store-config``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss

from dlrm.artifact import ModelArtifact, load_artifact
from embeddings.catalog import Catalog
from embeddings.index import log_prices
from serving.retriever import FaissRetriever

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
