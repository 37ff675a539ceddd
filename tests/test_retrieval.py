"""The retrieval stage: two-tower vectors, Faiss indexes and recall, the `valuerank index` folder."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm import metrics
from dlrm.synth import WorldLogs, ensure_world_logs
from dlrm.two_tower import TwoTowerConfig, TwoTowerVectors, dot_logits, train_world_two_tower
from dlrm.world import World, WorldConfig
from embeddings.catalog import Catalog
from embeddings.index import IndexConfig, build_index, recall_at_k
from embeddings.index_stage import MANIFEST, ensure_index, main
from serving.assets import INDEX_FILE, INDEX_MANIFEST
from serving.retriever import FaissRetriever

TINY = WorldConfig.load().replace(train_rows=20_000, test_rows=5_000, replay_requests=200)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def world() -> World:
    return World(TINY)


@pytest.fixture(scope="module")
def logs(world: World, artifacts: Path) -> WorldLogs:
    return ensure_world_logs(TINY, artifacts, world=world, log=False)


@pytest.fixture(scope="module")
def tower(world: World, logs: WorldLogs) -> TwoTowerVectors:
    return train_world_two_tower(world, logs.train, logs.test, TwoTowerConfig(), progress=False)


@pytest.fixture(scope="module")
def queries(world: World, tower: TwoTowerVectors) -> np.ndarray:
    return tower.user_vectors[world.sample_requests(300, np.random.default_rng(0)).user]


@pytest.fixture(scope="module")
def index_dir(artifacts: Path) -> Path:
    return ensure_index(TINY, artifacts, progress=False)


# -- two-tower ---------------------------------------------------------------------------------


def test_two_tower_vectors_cover_every_user_and_item(world: World, tower: TwoTowerVectors) -> None:
    d = TwoTowerConfig().dim
    assert tower.user_vectors.shape == (world.n_users, d)
    assert tower.item_vectors.shape == (world.n_items, d)
    assert tower.user_vectors.dtype == tower.item_vectors.dtype == np.float32
    # The folded biases: users carry a constant 1 where items carry theirs, and vice versa.
    assert np.all(tower.user_vectors[:, -1] == 1.0)
    assert np.all(tower.item_vectors[:, -2] == 1.0)


def test_two_tower_is_deterministic_for_a_seed(world: World, logs: WorldLogs, tower: TwoTowerVectors) -> None:
    again = train_world_two_tower(world, logs.train, logs.test, TwoTowerConfig(), progress=False)
    np.testing.assert_array_equal(again.user_vectors, tower.user_vectors)
    np.testing.assert_array_equal(again.item_vectors, tower.item_vectors)
    other = train_world_two_tower(world, logs.train, logs.test, TwoTowerConfig(seed=1), progress=False)
    assert not np.array_equal(other.item_vectors, tower.item_vectors)


def test_dot_product_ranks_clicks_above_non_clicks(
    world: World, logs: WorldLogs, tower: TwoTowerVectors
) -> None:
    test = logs.test
    auc = metrics.auc(test.labels, dot_logits(world.schema, tower.user_vectors, tower.item_vectors, test))
    assert auc > 0.55
    assert tower.metrics["test_auc"] == pytest.approx(auc)


def test_two_tower_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="dim"):
        TwoTowerConfig(dim=2)
    with pytest.raises(ValueError, match="lr"):
        TwoTowerConfig(lr=0.0)


# -- indexes and recall ------------------------------------------------------------------------


def test_flat_index_is_exact(tower: TwoTowerVectors, queries: np.ndarray) -> None:
    index = build_index(tower.item_vectors, IndexConfig(kind="flat"))
    assert recall_at_k(index, tower.item_vectors, queries, 500) == 1.0


@pytest.mark.parametrize(("kind", "threshold"), [("ivf", 0.9), ("hnsw", 0.5)])
def test_approximate_index_recall_against_exact(
    tower: TwoTowerVectors, queries: np.ndarray, kind: str, threshold: float
) -> None:
    index = build_index(tower.item_vectors, IndexConfig(kind=kind))  # type: ignore[arg-type]
    assert index.ntotal == len(tower.item_vectors)
    assert threshold <= recall_at_k(index, tower.item_vectors, queries, 500) <= 1.0


def test_recall_drops_when_ivf_probes_few_lists(tower: TwoTowerVectors, queries: np.ndarray) -> None:
    narrow = build_index(tower.item_vectors, IndexConfig(kind="ivf", nprobe=1))
    wide = build_index(tower.item_vectors, IndexConfig(kind="ivf", nprobe=96))
    assert recall_at_k(narrow, tower.item_vectors, queries, 500) < 0.5
    assert recall_at_k(wide, tower.item_vectors, queries, 500) > 0.9


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 8),
    k=st.integers(1, 80),
    kind=st.sampled_from(["flat", "ivf", "hnsw"]),
    seed=st.integers(0, 2**16),
)
def test_recall_is_a_fraction_and_exact_for_flat(n: int, d: int, k: int, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    queries = rng.normal(size=(5, d)).astype(np.float32)
    index = build_index(vectors, IndexConfig(kind=kind, nprobe=2))  # type: ignore[arg-type]
    recall = recall_at_k(index, vectors, queries, k)
    assert 0.0 <= recall <= 1.0
    if kind == "flat":
        assert recall == 1.0


def test_index_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)
    assert IndexConfig().resolved_nlist(5000) == 283
    assert IndexConfig(nlist=50).resolved_nlist(10) == 10


# -- the index folder --------------------------------------------------------------------------


def test_index_folder_serves_distinct_valid_candidates(index_dir: Path) -> None:
    manifest = json.loads((index_dir / INDEX_MANIFEST).read_text())
    catalog = Catalog.load(index_dir)
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    assert manifest["world_key"] == TINY.key()
    assert manifest["n_items"] == catalog.n_items == index.ntotal
    assert manifest["d"] == catalog.item_vectors.shape[1] == index.d - 1  # + the log-price coordinate
    assert manifest["value_coordinate"] is True
    assert manifest["recall_at_k"]["k"] == 500
    assert manifest["recall_at_k"]["value"] >= 0.9
    assert manifest["two_tower"]["metrics"]["test_auc"] > 0.55
    slate_recall = manifest["ideal_slate_recall"]
    assert slate_recall["value"] > slate_recall["value_by_click"]  # the ideal slate is by value

    k = 50
    users = np.arange(8)
    assert catalog.item_price is not None
    log_price = np.log(catalog.item_price.astype(np.float64))
    logits_all = catalog.user_vectors[users] @ catalog.item_vectors.T
    for weight in (0.0, 1.0):
        ids, scores = FaissRetriever(index, log_price, value_weight=weight).retrieve(
            catalog.user_vectors[users], k
        )
        assert ids.shape == (len(users), k)
        for row in ids:
            assert len(set(row.tolist())) == k
            assert ((row >= 0) & (row < catalog.n_items)).all()
        # Row i of the index is item id i; the scores are those items' two-tower inner products
        # whatever the weight, and the hits are ranked by inner product + weight x log price.
        expected = np.einsum("bkd,bd->bk", catalog.item_vectors[ids], catalog.user_vectors[users])
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
        keys = np.take_along_axis(logits_all + weight * log_price, ids, axis=1)
        assert (np.diff(keys, axis=1) <= 1e-4).all()
    with pytest.raises(ValueError, match="log-price"):
        FaissRetriever(index, None, value_weight=1.0)


def test_ensure_index_reuses_a_complete_folder(
    index_dir: Path, artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (index_dir / MANIFEST).stat().st_mtime_ns
    again = ensure_index(TINY, artifacts, progress=True)
    assert again == index_dir
    assert (index_dir / MANIFEST).stat().st_mtime_ns == before
    assert "reusing" in capsys.readouterr().err


def test_main_prints_the_manifest(
    index_dir: Path, artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world_file = tmp_path / "tiny.json"
    world_file.write_text(json.dumps(TINY.to_dict()))
    # Same world and default configs as the fixture: main reuses the folder, so this is quick.
    assert main(["--world", str(world_file), "--artifacts", str(artifacts), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(index_dir)
    assert out["index"]["kind"] == "ivf"


def test_main_rejects_invalid_flags(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--artifacts", str(tmp_path), "--nprobe", "0"])
    assert exc.value.code == 2
    assert not (tmp_path / "index").exists()
