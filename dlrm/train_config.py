"""How a DLRM is trained: the optimiser, batching and split settings, shared by single-process
training (``dlrm.train``) and sharded training (``dlrm.distributed``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    """Passes over the training rows (the best one on validation is kept)."""
    batch_size: int = 2048
    """Rows per optimiser step."""
    lr: float = 5e-3
    """Adam learning rate for the MLPs."""
    embedding_lr: float = 5e-2
    """Adagrad learning rate for the embedding tables."""
    weight_decay: float = 0.0
    """L2 penalty on the MLP weights."""
    embedding_weight_decay: float = 1e-3
    """L2 penalty on the embedding rows (Adagrad weight decay): shrinks rarely seen ids, which
    otherwise memorise their few rows (user_id, item_id, rare Criteo values)."""
    embedding_init_std: float = 0.0
    """Std of a normal init of the embedding rows; 0 keeps TorchRec's uniform(+-1/sqrt(rows)),
    whose scale depends on the table size rather than on the data."""
    validation: float = 0.1
    """Fraction of the training rows held back to choose the best epoch."""
    seed: int = 0
    """Seed of initialisation, shuffling and splits."""
    threads: int = 1
    """torch intra-op threads while training (restored afterwards). The ops are small: a
    second thread gains little and, on a busy machine, can make steps 10x slower."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"{self.epochs=} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"{self.batch_size=} must be >= 1")
        if self.lr <= 0 or self.embedding_lr <= 0:
            raise ValueError(f"{self.lr=} and {self.embedding_lr=} must be > 0")
        if self.weight_decay < 0 or self.embedding_weight_decay < 0:
            raise ValueError(f"{self.weight_decay=} and {self.embedding_weight_decay=} must be >= 0")
        if self.embedding_init_std < 0:
            raise ValueError(f"{self.embedding_init_std=} must be >= 0")
        if not 0.0 <= self.validation < 1.0:
            raise ValueError(f"{self.validation=} must be in [0, 1)")
        if self.threads < 1:
            raise ValueError(f"{self.threads=} must be >= 1")


CRITEO_TRAIN = TrainConfig(
    epochs=12,
    batch_size=256,
    lr=1e-3,
    embedding_lr=1e-2,
    embedding_weight_decay=3e-4,
    embedding_init_std=0.01,
)
"""Criteo defaults, tuned on 80/20 splits of the 8k-row sample (seeds 0-3)."""
