"""The full ranking model: TorchRec's DLRM built from a feature schema.

Shapes follow TorchRec: ``B`` rows, ``F`` sparse features, ``D`` embedding dim. The
interaction input is ``[dense_out, emb_0 .. emb_{F-1}]`` (``B X (F+1) X D``); the over arch
sees ``dense_out`` and the upper triangle of their pairwise dot products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dlrm.schema import FeatureSchema


@dataclass(frozen=True)
class ModelConfig:
    bottom_mlp: tuple[int, ...] = (64, 16)
    """Bottom (dense) MLP layer sizes; the last must equal the schema's embedding dim."""
    top_mlp: tuple[int, ...] = (128, 64, 1)
    """Top (over) MLP layer sizes; the last must be 1 (the click logit)."""

    def __post_init__(self) -> None:
        if not self.bottom_mlp or not self.top_mlp:
            raise ValueError("bottom_mlp and top_mlp need at least one layer each")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"{self.top_mlp=} must end in 1 (one logit)")
        if len(self.top_mlp) < 2:
            raise ValueError(f"{self.top_mlp=} needs at least two layers (TorchRec OverArch)")
        if any(s < 1 for s in self.bottom_mlp + self.top_mlp):
            raise ValueError("layer sizes must be >= 1")

    def check(self, schema: FeatureSchema) -> None:
        if self.bottom_mlp[-1] != schema.embedding_dim:
            raise ValueError(
                f"bottom_mlp[-1]={self.bottom_mlp[-1]} must equal the embedding dim "
                f"{schema.embedding_dim} of schema {schema.name}"
            )


_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_configs(schema: FeatureSchema, features: list[int] | None = None) -> list[EmbeddingBagConfig]:
    """One TorchRec table per sparse feature (optionally only those at ``features``)."""
    chosen = range(len(schema.sparse)) if features is None else features
    return [
        EmbeddingBagConfig(
            name=schema.sparse[i].table_name,
            embedding_dim=schema.sparse[i].dim,
            num_embeddings=schema.sparse[i].cardinality,
            feature_names=[schema.sparse[i].name],
            pooling=_POOLING[schema.sparse[i].pooling],
        )
        for i in chosen
    ]


def build_dlrm(schema: FeatureSchema, config: ModelConfig, *, seed: int = 0, device: str = "cpu") -> DLRM:
    """A freshly initialised TorchRec DLRM for ``schema`` (deterministic for ``seed``)."""
    config.check(schema)
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=table_configs(schema), device=torch.device(device))
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=max(1, len(schema.dense)),
        dense_arch_layer_sizes=list(config.bottom_mlp),
        over_arch_layer_sizes=list(config.top_mlp),
        dense_device=torch.device(device),
    )
