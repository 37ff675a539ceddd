"""Feature schema: validation names the field at fault, JSON round trips, bundled files load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm.schema import POOLINGS, SIDES, DenseFeature, FeatureSchema, SparseFeature, load_schema
from dlrm.world import DENSE_COLUMNS, SPARSE_COLUMNS


def sparse(name: str = "f", **changes: Any) -> SparseFeature:
    return SparseFeature(**{"name": name, "cardinality": 10, "dim": 4, "side": "user", **changes})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "bad-name"}, "name"),
        ({"cardinality": 0}, "cardinality"),
        ({"dim": 0}, "dim"),
        ({"side": "server"}, "side"),
        ({"pooling": "max"}, "pooling"),
        ({"ids_per_row": 0}, "ids_per_row"),
    ],
)
def test_sparse_feature_validation_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        sparse(**changes)


def test_dense_features_must_be_request_side() -> None:
    with pytest.raises(ValueError, match="side"):
        DenseFeature("price", side="item")
    with pytest.raises(ValueError, match="name"):
        DenseFeature("")


def test_schema_level_validation() -> None:
    with pytest.raises(ValueError, match="at least one sparse"):
        FeatureSchema("s", ())
    with pytest.raises(ValueError, match=r"duplicate.*\['a'\]"):
        FeatureSchema("s", (sparse("a"), sparse("a")))
    with pytest.raises(ValueError, match=r"duplicate.*\['a'\]"):
        FeatureSchema("s", (sparse("a"),), (DenseFeature("a"),))
    with pytest.raises(ValueError, match="one embedding dim"):
        FeatureSchema("s", (sparse("a", dim=4), sparse("b", dim=8)))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "JSON object"),
        ({"name": "s"}, "missing"),
        ({"sparse": [{"name": "a", "cardinality": 3, "dim": 2, "side": "user", "colour": 1}]}, "colour"),
        ({"sparse": [{"name": "a", "dim": 2, "side": "user"}]}, "cardinality"),
        ({"sparse": [{"name": "a", "cardinality": -1, "dim": 2, "side": "user"}]}, "cardinality"),
    ],
)
def test_from_dict_rejects_bad_documents(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureSchema.from_dict(raw)


def test_load_schema_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schema(path)


names = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


@st.composite
def schemas(draw: st.DrawFn) -> FeatureSchema:
    feature_names = draw(st.lists(names, min_size=1, max_size=12, unique=True))
    n_sparse = draw(st.integers(1, len(feature_names)))
    dim = draw(st.integers(1, 64))
    sparse_features = tuple(
        SparseFeature(
            name=n,
            cardinality=draw(st.integers(1, 10**9)),
            dim=dim,
            side=draw(st.sampled_from(SIDES)),
            pooling=draw(st.sampled_from(POOLINGS)),
            ids_per_row=draw(st.integers(1, 100)),
        )
        for n in feature_names[:n_sparse]
    )
    dense = tuple(
        DenseFeature(n, side=draw(st.sampled_from(("user", "context")))) for n in feature_names[n_sparse:]
    )
    return FeatureSchema(draw(names), sparse_features, dense)


@settings(max_examples=100, deadline=None)
@given(schemas())
def test_json_round_trip(schema: FeatureSchema) -> None:
    again = FeatureSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert again == schema
    assert again.side_indices("item") == [i for i, f in enumerate(schema.sparse) if f.side == "item"]


def test_save_and_load_by_path(tmp_path: Path) -> None:
    schema = FeatureSchema("tiny", (sparse("u"), sparse("i", side="item")), (DenseFeature("d"),))
    schema.save(tmp_path / "tiny.json")
    assert load_schema(tmp_path / "tiny.json") == schema


def test_bundled_schemas_load() -> None:
    world = load_schema("world")
    assert world.sparse_names == list(SPARSE_COLUMNS)
    assert world.dense_names == list(DENSE_COLUMNS)
    criteo = load_schema("criteo")
    assert criteo.sparse_names == [f"C{i}" for i in range(1, 27)]
    assert criteo.dense_names == [f"I{i}" for i in range(1, 14)]
    # Every table keeps row 0 for rare values plus at least the feature's own values.
    assert all(f.cardinality >= 3 for f in criteo.sparse)
    assert {f.side for f in criteo.sparse} == {"context", "item"}
