"""Columnar training rows and their conversion to TorchRec inputs.

Rows are single-hot: one id per sparse feature per row (both the synthetic world and Criteo
are). Multi-hot bags exist only at serving time and in benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Rows:
    """``N`` labelled rows in schema column order."""

    dense: np.ndarray
    """float32 ``N x n_dense``."""
    sparse: np.ndarray
    """int64 ``N x n_sparse``: one id per feature, already reduced modulo the cardinality."""
    labels: np.ndarray
    """float32 ``N``: 1.0 for a click."""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.dense.shape[0] != n or self.sparse.shape[0] != n:
            raise ValueError(
                f"row counts differ: dense {self.dense.shape[0]}, sparse {self.sparse.shape[0]}, labels {n}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Rows:
        return Rows(self.dense[idx], self.sparse[idx], self.labels[idx])

    def split(self, holdout: float, seed: int) -> tuple[Rows, Rows]:
        """Random train / held-out split; ``holdout`` is the held-out fraction."""
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"{holdout=} must be in (0, 1)")
        perm = np.random.default_rng(seed).permutation(len(self))
        n_test = max(1, round(len(self) * holdout))
        return self.take(perm[n_test:]), self.take(perm[:n_test])

    def save(self, path: Path) -> None:
        np.savez(path, dense=self.dense, sparse=self.sparse, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> Rows:
        with np.load(path) as z:
            return cls(z["dense"], z["sparse"], z["labels"])


def single_hot_kjt(keys: list[str], sparse: torch.Tensor) -> KeyedJaggedTensor:
    """KJT for a ``B x F`` id matrix, one id per (row, feature).

    KJT values are feature-major: all rows of feature 0, then feature 1, ...
    """
    batch, n_features = sparse.shape
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=sparse.t().reshape(-1),
        lengths=torch.ones(batch * n_features, dtype=torch.int32),
    )


def dense_input(dense: torch.Tensor) -> torch.Tensor:
    """The bottom MLP's input: a schema without dense features still feeds it one zero column."""
    return dense if dense.shape[1] else torch.zeros(dense.shape[0], 1)
