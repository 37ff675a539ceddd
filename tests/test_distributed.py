"""Sharded training: TorchRec's planner, DistributedModelParallel on 2 gloo processes, export.

2-process training equals 1-process training up to float rounding (TOLERANCE on every weight
and every held-out logit): table-wise and row-wise shards with the default optimisers against
the plain single-process ``fit``, and FBGEMM's fused row-wise Adagrad on 2 ranks against the
same on 1 rank. One spawned follower process serves all 2-process runs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlrm.artifact import ModelArtifact, load_artifact
from dlrm.data import Rows, single_hot_kjt
from dlrm.distributed import (
    ShardConfig,
    _rank_slice,
    fit_sharded,
    leading,
    make_plan,
    plan_tables,
    shard_config,
)
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import load_schema
from dlrm.synth import ensure_world_logs
from dlrm.train import evaluate, main, train_world
from dlrm.train_config import TrainConfig
from dlrm.world import WorldConfig

TOLERANCE = 1e-5
"""Max abs difference allowed between 1 and 2 processes (measured: <= 6e-7 on weights)."""
WORLD = WorldConfig.load().replace(train_rows=6000, test_rows=2000, replay_requests=100)
# An odd batch size, so that every step pads one rank's slice; two epochs, so that the best
# epoch is chosen on validation.
TRAIN = TrainConfig(epochs=2, batch_size=333)
FUSED = ShardConfig(embedding_optimizer="fused_rowwise_adagrad")
TRAIN_FUSED = TrainConfig(epochs=2, batch_size=333, embedding_weight_decay=0.0)  # FBGEMM ignores it on CPU


# -- planning -----------------------------------------------------------------------------


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
@pytest.mark.parametrize(("optimizer", "kernel"), [("adagrad", "dense"), ("fused_rowwise_adagrad", "fused")])
def test_the_planner_shards_every_table_as_asked(sharding: str, optimizer: str, kernel: str) -> None:
    schema = load_schema("world")
    plan = make_plan(schema, 2, sharding, embedding_optimizer=optimizer)  # type: ignore[arg-type]
    tables = plan_tables(plan)
    assert set(tables) == {f.table_name for f in schema.sparse}
    assert {t["sharding"] for t in tables.values()} == {sharding}
    assert {t["kernel"] for t in tables.values()} == {kernel}
    if sharding == "row_wise":
        assert all(t["ranks"] == [0, 1] for t in tables.values())
    else:  # whole tables, and both ranks hold some
        assert all(len(t["ranks"]) == 1 for t in tables.values())
        assert {t["ranks"][0] for t in tables.values()} == {0, 1}


def test_auto_lets_the_planner_choose_between_table_and_row_wise() -> None:
    tables = plan_tables(make_plan(load_schema("world"), 2, "auto"))
    assert {t["sharding"] for t in tables.values()} <= {"table_wise", "row_wise"}
    with pytest.raises(ValueError, match="sharding"):
        make_plan(load_schema("world"), 2, "column_wise")  # type: ignore[arg-type]


def test_shard_config_from_flags_and_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert shard_config(None, None) is None and shard_config(1, None) is None
    assert shard_config(2, None) == ShardConfig(2, "auto")
    assert shard_config(1, "row_wise") == ShardConfig(1, "row_wise")
    assert shard_config(None, None, "fused_rowwise_adagrad") == replace(FUSED, nproc=1)
    with pytest.raises(ValueError, match="nproc"):
        ShardConfig(0)
    with pytest.raises(ValueError, match="sharding"):
        ShardConfig(2, "column_wise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedding_optimizer"):
        ShardConfig(2, embedding_optimizer="sgd")  # type: ignore[arg-type]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert shard_config(None, None) == ShardConfig(3, "auto")
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        shard_config(2, "table_wise")


@given(st.integers(1, 50), st.integers(1, 4))
def test_rank_slices_cover_the_batch_once_and_pad_with_zero_weight(n: int, world: int) -> None:
    batch = np.arange(100, 100 + n)
    real = []
    for rank in range(world):
        idx, weight = _rank_slice(batch, rank, world)
        assert len(idx) == len(weight) == -(-n // world)  # equal slices: gloo needs them
        kept = weight.numpy() == 1.0
        assert np.all(weight.numpy()[~kept] == 0.0) and np.all(idx[~kept] == batch[0])
        real.extend(idx[kept])
    assert real == list(batch)


def test_fused_adagrad_refuses_a_weight_decay_it_would_ignore() -> None:
    rows = Rows(np.zeros((4, 4), np.float32), np.zeros((4, 9), np.int64), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="weight decay"):
        fit_sharded(load_schema("world"), ModelConfig(), TRAIN, rows, FUSED, evaluate=evaluate)


# -- 2 processes equal 1 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelArtifact]:
    root = tmp_path_factory.mktemp("sharded")
    runs = {
        "fit": train_world(WORLD, root, train_config=TRAIN, progress=False),  # unsharded, 1 process
        "fused_one": train_world(
            WORLD, root, train_config=TRAIN_FUSED, progress=False, shard=replace(FUSED, sharding="row_wise")
        ),
    }
    with leading(2):  # one follower process for all 2-process runs
        for sharding in ("table_wise", "row_wise"):
            shard = ShardConfig(2, sharding)  # type: ignore[arg-type]
            runs[sharding] = train_world(WORLD, root, train_config=TRAIN, progress=False, shard=shard)
        shard = replace(FUSED, nproc=2, sharding="row_wise")
        runs["fused_two"] = train_world(WORLD, root, train_config=TRAIN_FUSED, progress=False, shard=shard)
    return runs


def held_out_logits(art: ModelArtifact) -> np.ndarray:
    test = ensure_world_logs(WORLD, art.path.parents[1], log=False).test
    model = art.load_model()  # a plain, unsharded DLRM
    with torch.inference_mode():
        kjt = single_hot_kjt(art.schema.sparse_names, torch.from_numpy(test.sparse))
        return model(torch.from_numpy(test.dense), kjt).squeeze(1).numpy()


@pytest.mark.parametrize(
    ("one", "two", "sharding"),
    [
        ("fit", "table_wise", "table_wise"),
        ("fit", "row_wise", "row_wise"),
        ("fused_one", "fused_two", "row_wise"),
    ],
)
def test_two_processes_train_and_score_as_one(
    trained: dict[str, ModelArtifact], one: str, two: str, sharding: str
) -> None:
    assert_same_model(trained[one], trained[two])
    shards = trained[two].metrics["shards"]
    assert shards["world_size"] == 2 and shards["sharding"] == sharding
    assert {t["sharding"] for t in shards["tables"].values()} == {sharding}


def assert_same_model(one: ModelArtifact, two: ModelArtifact) -> None:
    assert two.path != one.path

    w1 = torch.load(one.path / "model.pt", weights_only=True)
    w2 = torch.load(two.path / "model.pt", weights_only=True)
    assert w1.keys() == w2.keys() == build_dlrm(one.schema, one.model_config).state_dict().keys()
    assert all(type(v) is torch.Tensor for v in w2.values())  # gathered, not ShardedTensor
    weight_diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert weight_diff < TOLERANCE

    # Training moved the weights far more than the tolerance: the comparison is not vacuous.
    initial = build_dlrm(one.schema, one.model_config, seed=0).state_dict()
    assert max(float((w1[k] - initial[k]).abs().max()) for k in w1) > 100 * TOLERANCE

    logits1, logits2 = held_out_logits(one), held_out_logits(two)
    assert np.abs(logits1 - logits2).max() < TOLERANCE
    m1, m2 = one.metrics, two.metrics
    assert m2["best_epoch"] == m1["best_epoch"]
    assert m2["test_auc"] == pytest.approx(m1["test_auc"], abs=TOLERANCE)
    assert m2["test_auc"] > 0.6  # it learnt something


def test_cli_trains_sharded_and_rejects_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    world_file = tmp_path / "world.json"
    world_file.write_text(json.dumps(WORLD.to_dict()))
    base = ["--json", "--world", str(world_file), "--artifacts", str(tmp_path), "--epochs", "1"]
    assert main([*base, "--nproc", "1", "--sharding", "table_wise"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shards"]["world_size"] == 1 and out["shards"]["sharding"] == "table_wise"
    assert load_artifact(out["artifact"]).metrics["test_auc"] == out["test_auc"]
    assert main([*base, "--nproc", "0"]) == 2
    assert "nproc" in capsys.readouterr().err
    assert main([*base, "--embedding-optimizer", "fused_rowwise_adagrad"]) == 2
    assert "weight decay" in capsys.readouterr().err
