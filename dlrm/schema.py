"""The feature schema: one small JSON file that drives data, training, export and serving.

Every sparse feature names its table size (``cardinality``), embedding ``dim``, ``pooling``
and ``side``. The side decides where serving computes it: ``user`` and ``context`` features
are shared by all candidates of a request and computed once; ``item`` features are computed
once per candidate. Dense features are request-side only, so the DLRM's bottom MLP runs once
per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Side = Literal["user", "context", "item"]
Pooling = Literal["sum", "mean"]
SIDES: tuple[Side, ...] = ("user", "context", "item")
POOLINGS: tuple[Pooling, ...] = ("sum", "mean")


@dataclass(frozen=True)
class SparseFeature:
    name: str
    """Feature key, also the name of its embedding table (``t_<name>``)."""
    cardinality: int
    """Rows in the embedding table; raw ids are taken modulo this (hashing trick)."""
    dim: int
    """Embedding dimension."""
    side: Side
    """``user`` | ``context`` (request side) or ``item`` (candidate side)."""
    pooling: Pooling = "sum"
    """How a bag of several ids is pooled into one vector."""
    ids_per_row: int = 1
    """Typical number of ids in one bag (1 = single-hot); informs benchmarks and planning."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"{self.name=} must be a non-empty identifier")
        if self.cardinality < 1:
            raise ValueError(f"{self.cardinality=} must be >= 1 (feature {self.name})")
        if self.dim < 1:
            raise ValueError(f"{self.dim=} must be >= 1 (feature {self.name})")
        if self.side not in SIDES:
            raise ValueError(f"{self.side=} must be one of {SIDES} (feature {self.name})")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.pooling=} must be one of {POOLINGS} (feature {self.name})")
        if self.ids_per_row < 1:
            raise ValueError(f"{self.ids_per_row=} must be >= 1 (feature {self.name})")

    @property
    def table_name(self) -> str:
        return f"t_{self.name}"

    @property
    def request_side(self) -> bool:
        return self.side != "item"


@dataclass(frozen=True)
class DenseFeature:
    name: str
    """Feature name."""
    side: Side = "context"
    """Dense features must be request-side (``user`` or ``context``)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("dense feature name must be non-empty")
        if self.side not in ("user", "context"):
            raise ValueError(
                f"{self.side=} of dense feature {self.name} must be 'user' or 'context': "
                "the bottom MLP runs once per request"
            )


@dataclass(frozen=True)
class FeatureSchema:
    name: str
    """Schema name, recorded in artifacts."""
    sparse: tuple[SparseFeature, ...]
    """Sparse features in model order (the order of the DLRM's interaction inputs)."""
    dense: tuple[DenseFeature, ...] = field(default=())
    """Dense features in column order."""

    def __post_init__(self) -> None:
        if not self.sparse:
            raise ValueError("schema needs at least one sparse feature")
        names = [f.name for f in self.sparse] + [f.name for f in self.dense]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names in schema {self.name}: {dupes}")
        dims = {f.dim for f in self.sparse}
        if len(dims) != 1:
            raise ValueError(f"DLRM needs one embedding dim for every table, got {sorted(dims)}")

    @property
    def embedding_dim(self) -> int:
        return self.sparse[0].dim

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    def side_indices(self, *sides: Side) -> list[int]:
        """Positions (in ``sparse`` order) of the sparse features on the given sides."""
        return [i for i, f in enumerate(self.sparse) if f.side in sides]

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sparse": [vars(f).copy() for f in self.sparse],
            "dense": [vars(f).copy() for f in self.dense],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FeatureSchema:
        if not isinstance(raw, dict):
            raise ValueError("schema must be a JSON object")
        try:
            sparse = tuple(SparseFeature(**f) for f in raw["sparse"])
            dense = tuple(DenseFeature(**f) for f in raw.get("dense", []))
        except TypeError as exc:  # unknown or missing keys
            raise ValueError(f"bad feature entry in schema: {exc}") from exc
        except KeyError as exc:
            raise ValueError(f"schema is missing {exc}") from exc
        return cls(name=str(raw.get("name", "unnamed")), sparse=sparse, dense=dense)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_schema(path: str | Path) -> FeatureSchema:
    """Load a schema file; a bare name (``world``, ``criteo``) loads a bundled schema."""
    p = Path(path)
    if p.suffix != ".json" and not p.exists():
        text = resources.files("dlrm.schemas").joinpath(f"{path}.json").read_text()
    else:
        text = p.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"schema {path} is not valid JSON: {exc}") from exc
    return FeatureSchema.from_dict(raw)
