"""The retrieval model: a two-tower dot product trained on the logged impressions.

The user tower sees only user-side sparse features (``user_id``, ``user_segment``, ``user_tier``)
and the item tower only item-side ones. It deliberately sees no context (surface, hour,
device): retrieval runs once per user, and the context x item crosses it cannot learn are
exactly the full DLRM's uplift over the cheap path.

Each tower is the sum of one embedding row per feature (``B X F`` ids -> ``B X (d - 2)``) plus
a scalar bias per feature. The biases are folded into two extra coordinates, so that one inner
product gives the whole logit and Faiss can search it::

    user vector = [ sum_f E[u_f],  sum_f b[u_f],  1          ]      (d = latent + 2)
    item vector = [ sum_f E[i_f],  1,             sum_f b[i_f] ]
    <user, item> = <latent_u, latent_i> + bias_u + bias_i   = the click logit

Loss: logistic loss of that logit on every logged impression (clicked or not). Measured on
the default world (4 epochs, 1 thread, a few CPU seconds) it beat an in-batch sampled softmax
on clicked rows with a log-Q correction on every figure we track: held-out AUC of the dot
product 0.79 vs 0.70, and the ground-truth click probability of the dot product's top 10
reached 78% of the ideal slate's vs 56%. The softmax learns P(item | user, click), which
inherits the logging policy's exposure bias; the logistic loss learns P(click | user, item)
(averaged over contexts), which is what retrieval and the cheap path rank by, and
``sigmoid(<user, item>)`` stays a usable click probability. An MLP on top of the concatenated
embeddings was slower and no better (AUC 0.77): the world's user x item terms are bilinear.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dlrm import metrics
from dlrm.data import Rows
from dlrm.schema import FeatureSchema
from dlrm.world import World


@dataclass(frozen=True)
class TwoTowerConfig:
    dim: int = 32
    """Length of the user and item vectors (latent dimension + 2 bias coordinates)."""
    epochs: int = 4
    """Passes over the training impressions."""
    batch_size: int = 2048
    """Impressions per optimiser step."""
    lr: float = 3e-3
    """Adam learning rate."""
    weight_decay: float = 3e-5
    """L2 penalty on embedding rows; keeps the long tail of rarely seen users near their segment."""
    init_std: float = 0.05
    """Standard deviation of the initial embedding rows (biases start at zero)."""
    seed: int = 0
    """Seed of initialisation and shuffling: equal seeds give equal vectors."""
    threads: int = 1
    """torch intra-op threads; one is fastest for this small model on a shared machine."""

    def __post_init__(self) -> None:
        if self.dim < 3:
            raise ValueError(f"{self.dim=} must be >= 3 (2 coordinates hold the biases)")
        if self.epochs < 1:
            raise ValueError(f"{self.epochs=} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"{self.batch_size=} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"{self.lr=} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"{self.weight_decay=} must be >= 0")
        if self.init_std <= 0:
            raise ValueError(f"{self.init_std=} must be > 0")
        if self.threads < 1:
            raise ValueError(f"{self.threads=} must be >= 1")


@dataclass
class TwoTowerVectors:
    """What retrieval serves: one vector per user and per item (row = id)."""

    user_vectors: np.ndarray
    """float32 ``U X d``."""
    item_vectors: np.ndarray
    """float32 ``I X d``."""
    metrics: dict[str, Any]
    """Training record and held-out metrics (JSON-able)."""


def train_world_two_tower(
    world: World, train: Rows, test: Rows, config: TwoTowerConfig = TwoTowerConfig(), *, progress: bool = True
) -> TwoTowerVectors:
    """Train on the world's training log; vectors for all its users and items, AUC on ``test``."""
    started = time.perf_counter()
    model, record = fit_two_tower(world.schema, config, train, progress=progress)
    users, items = world_entity_ids(world)
    user_vectors, item_vectors = model.user_vectors(users), model.item_vectors(items)
    logits = dot_logits(world.schema, user_vectors, item_vectors, test)
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    result = {
        "train_rows": len(train),
        "test_rows": len(test),
        "test_auc": metrics.auc(test.labels, logits),
        "test_logloss": metrics.logloss(test.labels, probs),
        "train_seconds": time.perf_counter() - started,
        **record,
    }
    return TwoTowerVectors(user_vectors, item_vectors, result)


class TwoTower(torch.nn.Module):
    """User and item towers, each one embedding table over its side's features (offset ids).

    A table row holds ``d - 2`` latent values and one bias; a tower sums its features' rows.
    """

    user_offsets: torch.Tensor
    """``1 X F_u``: where each user-side feature's rows start in ``user_table``."""
    item_offsets: torch.Tensor
    """``1 X F_i``: where each item-side feature's rows start in ``item_table``."""

    def __init__(self, user_cards: list[int], item_cards: list[int], config: TwoTowerConfig) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(config.seed)
        self.user_table = _table(user_cards, config, gen)
        self.item_table = _table(item_cards, config, gen)
        self.register_buffer("user_offsets", _offsets(user_cards), persistent=False)
        self.register_buffer("item_offsets", _offsets(item_cards), persistent=False)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Click logits ``B`` for ``B X F_u`` user ids and ``B X F_i`` item ids."""
        u = self.user_table(user_ids + self.user_offsets).sum(dim=1)
        i = self.item_table(item_ids + self.item_offsets).sum(dim=1)
        return (u[:, :-1] * i[:, :-1]).sum(dim=1) + u[:, -1] + i[:, -1]

    def user_vectors(self, user_ids: np.ndarray) -> np.ndarray:
        """float32 ``U X d``: ``[latent, bias, 1]`` for ``U X F_u`` ids."""
        rows = self._pooled(self.user_table, self.user_offsets, user_ids)
        ones = np.ones((len(rows), 1), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate([rows, ones], axis=1))

    def item_vectors(self, item_ids: np.ndarray) -> np.ndarray:
        """float32 ``I X d``: ``[latent, 1, bias]`` for ``I X F_i`` ids."""
        rows = self._pooled(self.item_table, self.item_offsets, item_ids)
        ones = np.ones((len(rows), 1), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate([rows[:, :-1], ones, rows[:, -1:]], axis=1))

    @staticmethod
    def _pooled(table: torch.nn.Embedding, offsets: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            pooled = table(torch.from_numpy(np.asarray(ids, dtype=np.int64)) + offsets).sum(dim=1)
        return pooled.numpy().astype(np.float32)


def fit_two_tower(
    schema: FeatureSchema, config: TwoTowerConfig, train: Rows, *, progress: bool = True
) -> tuple[TwoTower, dict[str, Any]]:
    """Logistic loss on every impression of ``train``; returns the model and a training record."""
    user_cols, item_cols = schema.side_indices("user"), schema.side_indices("item")
    if not user_cols or not item_cols:
        raise ValueError(f"schema {schema.name} needs user-side and item-side sparse features")
    model = TwoTower(
        [schema.sparse[c].cardinality for c in user_cols],
        [schema.sparse[c].cardinality for c in item_cols],
        config,
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    users = torch.from_numpy(np.ascontiguousarray(train.sparse[:, user_cols]))
    items = torch.from_numpy(np.ascontiguousarray(train.sparse[:, item_cols]))
    labels = torch.from_numpy(train.labels)
    rng = np.random.default_rng(config.seed)
    history = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        model.train()
        for epoch in range(config.epochs):
            order = torch.from_numpy(rng.permutation(len(train)))
            total = 0.0
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    model(users[idx], items[idx]), labels[idx]
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            history.append({"epoch": epoch + 1, "train_logloss": total / max(1, len(order))})
            if progress:
                loss_text = f"{history[-1]['train_logloss']:.4f}"
                print(f"two-tower: epoch {epoch + 1}/{config.epochs} logloss {loss_text}", file=sys.stderr)
        model.eval()
    finally:
        torch.set_num_threads(previous_threads)
    return model, {"history": history}


def dot_logits(
    schema: FeatureSchema, user_vectors: np.ndarray, item_vectors: np.ndarray, rows: Rows
) -> np.ndarray:
    """The dot-product logit of each row's (user id, item id) pair."""
    user = rows.sparse[:, schema.sparse_names.index("user_id")]
    item = rows.sparse[:, schema.sparse_names.index("item_id")]
    return np.einsum("nd,nd->n", user_vectors[user], item_vectors[item])


def world_entity_ids(world: World) -> tuple[np.ndarray, np.ndarray]:
    """The user-side ids of every user (``U X F_u``) and item-side ids of every item (``I X F_i``).

    Columns follow the schema order of each side; row = user id / item id.
    """
    schema = world.schema
    users = np.arange(world.n_users)
    user_cols = {"user_id": users, "user_segment": world.user_segment, "user_tier": world.user_tier}
    item_cols = world.item_sparse(np.arange(world.n_items))
    user_names = [schema.sparse[c].name for c in schema.side_indices("user")]
    item_names = [schema.sparse[c].name for c in schema.side_indices("item")]
    return (
        np.stack([user_cols[n] for n in user_names], axis=1).astype(np.int64),
        np.stack([item_cols[n] for n in item_names], axis=1).astype(np.int64),
    )


def _table(cards: list[int], config: TwoTowerConfig, gen: torch.Generator) -> torch.nn.Embedding:
    table = torch.nn.Embedding(sum(cards), config.dim - 1)
    with torch.no_grad():
        torch.nn.init.normal_(table.weight, 0.0, config.init_std, generator=gen)
        table.weight[:, -1] = 0.0  # the bias column starts neutral
    return table


def _offsets(cards: list[int]) -> torch.Tensor:
    """Row offset of each feature in its tower's shared table (``1 X F``)."""
    return torch.tensor([0, *np.cumsum(cards)[:-1].tolist()], dtype=torch.int64)[None, :]
