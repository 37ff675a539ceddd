"""Quantized serving tables (FBGEMM TBE via TorchRec's quant EBC) and the precision choice."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.artifact import ModelArtifact, load_artifact
from dlrm.data import Rows, single_hot_kjt
from dlrm.factored import FactoredDLRM, split_tables
from embeddings.fast_path import native_bf16
from embeddings.precision import PRECISION_FILE, choose_precision, mlp_precision_for
from embeddings.precision_bench import (
    PrecisionConfig,
    cheapest_within,
    held_out_rows,
    load_or_measure,
)
from embeddings.quant import PRECISIONS, quant_tables, quantize_collection, table_bytes
from loadtest import cli
from serving.assembly import build_pipeline, full_scorer
from serving.assets import ServingAssets
from serving.config import ScoringConfig, ServeConfig
from serving.domain import Candidates, Query
from serving.features import FeatureResolver

if TYPE_CHECKING:
    from conftest import ServingFolder

FAST = PrecisionConfig(rows=2000, lookup_batch=512, lookup_repeats=3)


@pytest.fixture(scope="module")
def trained(serving_assets: ServingFolder) -> ModelArtifact:
    return load_artifact(serving_assets.model_dir)


@pytest.fixture
def artifact_copy(serving_assets: ServingFolder, tmp_path: Path) -> ModelArtifact:
    """The tiny model in a fresh ``<artifacts>/model/<key>`` with its world's held-out rows beside it."""
    model_dir = tmp_path / "model" / serving_assets.model_dir.name
    shutil.copytree(serving_assets.model_dir, model_dir)
    (model_dir / PRECISION_FILE).unlink(missing_ok=True)  # a server in this session may have written one
    world_key = serving_assets.world_config.key()
    world = tmp_path / "world" / world_key
    world.mkdir(parents=True)
    shutil.copy(serving_assets.model_dir.parent.parent / "world" / world_key / "test.npz", world)
    return load_artifact(model_dir)


def _inputs(art: ModelArtifact, n: int) -> tuple[torch.Tensor, KeyedJaggedTensor, KeyedJaggedTensor]:
    rows = held_out_rows(art)
    assert rows is not None
    schema = art.schema
    req, item = schema.side_indices("user", "context"), schema.side_indices("item")
    sparse = torch.from_numpy(rows.sparse[:n])
    return (
        torch.from_numpy(rows.dense[:n]),
        single_hot_kjt([schema.sparse[i].name for i in req], sparse[:, req].contiguous()),
        single_hot_kjt([schema.sparse[i].name for i in item], sparse[:, item].contiguous()),
    )


def _logits(art: ModelArtifact, precision: str | None, n: int = 1000) -> torch.Tensor:
    model, schema = art.load_model(), art.schema
    tables = split_tables(model, schema) if precision is None else quant_tables(model, schema, precision)  # type: ignore[arg-type]
    dense, req, item = _inputs(art, n)
    return FactoredDLRM(model, schema, *tables)(dense, req, item, [1] * n)


def test_fp32_tbe_tables_score_like_float_tables(trained: ModelArtifact) -> None:
    reference = _logits(trained, None)
    quantized = _logits(trained, "fp32")
    torch.testing.assert_close(quantized, reference, rtol=0, atol=1e-5)
    assert reference.std() > 0.1  # the rows really differ: equality is not trivial


@pytest.mark.parametrize(("precision", "atol"), [("fp16", 0.01), ("int8", 0.1)])
def test_reduced_precision_scores_close_to_float(trained: ModelArtifact, precision: str, atol: float) -> None:
    reference = _logits(trained, None)
    diff = (_logits(trained, precision) - reference).abs()
    assert float(diff.max()) < atol
    assert float(diff.max()) > 0  # it is really quantized


def test_lookups_within_quantization_error_of_every_row(trained: ModelArtifact) -> None:
    request_float, _ = split_tables(trained.load_model(), trained.schema)
    configs = request_float.embedding_bag_configs()
    n = max(c.num_embeddings for c in configs)
    ids = torch.stack([torch.arange(n) % c.num_embeddings for c in configs], dim=1)
    kjt = single_hot_kjt([c.feature_names[0] for c in configs], ids)
    with torch.inference_mode():
        exact = request_float(kjt).values().view(n, len(configs), -1)
        fp16 = quantize_collection(request_float, "fp16")(kjt).values().view_as(exact)
        int8 = quantize_collection(request_float, "int8")(kjt).values().view_as(exact)
    assert fp16.dtype == int8.dtype == torch.float32
    assert bool(((fp16 - exact).abs() <= exact.abs() * 2**-11 + 1e-7).all())
    # Row-wise int8: each row's step is its range / 255; rounding errs by at most half a step
    # plus the fp16 rounding of the row's scale (2**-11 relative, times up to 255 steps: 0.125
    # step) and bias (2**-11 of the row's largest magnitude), plus 255 * 2**-24 for rows that
    # weight decay shrank towards zero: their scale is an fp16 subnormal (spacing 2**-24).
    step = (exact.amax(-1, keepdim=True) - exact.amin(-1, keepdim=True)) / 255
    err = (int8 - exact).abs()
    bound = 0.625 * step + 2**-11 * exact.abs().amax(-1, keepdim=True) + 255 * 2**-24
    assert bool((err <= bound).all())
    assert float(err.max()) > 0


def test_table_bytes_per_precision(trained: ModelArtifact) -> None:
    schema = trained.schema
    model = trained.load_model()
    rows = sum(f.cardinality for f in schema.sparse)
    d = schema.embedding_dim
    size = {p: sum(table_bytes(t) for t in quant_tables(model, schema, p)) for p in PRECISIONS}
    assert size == {"fp32": rows * d * 4, "fp16": rows * d * 2, "int8": rows * (d + 4)}
    assert size["int8"] < size["fp16"] < size["fp32"]
    assert size["fp32"] == sum(table_bytes(t) for t in split_tables(model, schema))


def test_measure_precisions_chooses_cheapest_within_limit_and_caches(artifact_copy: ModelArtifact) -> None:
    rows = held_out_rows(artifact_copy)
    assert rows is not None
    result = load_or_measure(artifact_copy, rows, FAST)
    assert set(result["precisions"]) == set(PRECISIONS)
    assert result["rows"] == 2000 and result["rows_available"] == len(rows)
    fp32 = result["precisions"]["fp32"]
    assert fp32["auc_delta"] == 0.0 and fp32["max_abs_logit_diff"] <= 1e-5
    assert fp32["auc"] == pytest.approx(result["float_tables"]["auc"], abs=1e-6)
    chosen = result["chosen"]
    loss = -result["precisions"][chosen]["auc_delta"]
    assert loss < 0.001 or chosen == "fp32"
    cheaper = [
        p
        for p, e in result["precisions"].items()
        if e["table_bytes"] < result["precisions"][chosen]["table_bytes"]
    ]
    assert all(-result["precisions"][p]["auc_delta"] >= 0.001 for p in cheaper)
    assert all(e["lookups_per_s"] > 0 for e in result["precisions"].values())
    assert set(result["bf16_mlp"]) == {"fp32", chosen}
    assert abs(result["bf16_mlp"]["fp32"]["auc_delta"]) < 0.01
    # On a CPU with native bf16 the full path is timed both ways (else nothing to gain).
    speed = result["bf16_mlp"][chosen]
    if native_bf16():
        assert speed["fp32_call_ms"] > 0 and speed["bf16_call_ms"] > 0
        assert speed["speedup"] == pytest.approx(speed["fp32_call_ms"] / speed["bf16_call_ms"])
    else:
        assert "speedup" not in speed

    cached = artifact_copy.path / PRECISION_FILE
    assert json.loads(cached.read_text()) == result
    # The cache answers without measuring again (empty rows would fail a measurement).
    empty = Rows(
        np.zeros((0, rows.dense.shape[1]), np.float32), np.zeros((0, 9), np.int64), np.zeros(0, np.float32)
    )
    assert load_or_measure(artifact_copy, empty, FAST) == result
    assert choose_precision(artifact_copy) == chosen


def test_cheapest_within_limit() -> None:
    entries = {
        "fp32": {"auc_delta": 0.0, "table_bytes": 400},
        "fp16": {"auc_delta": -0.0004, "table_bytes": 200},
        "int8": {"auc_delta": -0.002, "table_bytes": 120},
    }
    assert cheapest_within(entries, 0.001) == "fp16"
    assert cheapest_within(entries, 0.01) == "int8"
    assert cheapest_within(entries, 0.0001) == "fp32"
    assert cheapest_within({"int8": entries["int8"]}, 0.001) == "fp32"


def test_choose_precision_without_held_out_rows_is_fp32(artifact_copy: ModelArtifact, tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "world")
    assert held_out_rows(artifact_copy) is None
    assert choose_precision(artifact_copy) == "fp32"
    assert not (artifact_copy.path / PRECISION_FILE).exists()


def test_start_up_reads_the_measured_choice_and_never_measures(
    artifact_copy: ModelArtifact, caplog: pytest.LogCaptureFixture
) -> None:
    assert held_out_rows(artifact_copy) is not None  # it could measure, and must not
    with caplog.at_level("WARNING", logger="embeddings.precision"):
        assert choose_precision(artifact_copy) == "fp32"
    assert not (artifact_copy.path / PRECISION_FILE).exists()
    assert "valuerank bench precision" in caplog.text


def test_bench_precision_command_prints_json(
    artifact_copy: ModelArtifact, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "precision", "--model", str(artifact_copy.path), "--json", "--rows", "1000"]
    assert cli.main([*argv, "--lookup-batch", "256", "--lookup-repeats", "2", "--no-bf16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 1000 and out["chosen"] in PRECISIONS and "bf16_mlp" not in out
    assert json.loads((artifact_copy.path / PRECISION_FILE).read_text()) == out


def test_build_pipeline_serves_the_chosen_precision(
    artifact_copy: ModelArtifact, serving_assets: ServingFolder
) -> None:
    loaded = serving_assets.load()
    assets = ServingAssets(artifact_copy, loaded.catalog, loaded.index, loaded.index_manifest)
    (artifact_copy.path / PRECISION_FILE).write_text(json.dumps({"chosen": "fp16"}))
    for precision, data_type in (("auto", DataType.FP16), ("int8", DataType.INT8), ("fp32", DataType.FP32)):
        pipeline = build_pipeline(assets, ServeConfig(scoring=ScoringConfig(precision=precision)))
        try:
            full = pipeline.scorers["full"].model.factored  # type: ignore[attr-defined]
            for tables in (full.request_tables, full.item_tables):
                assert isinstance(tables, QuantEBC)
                assert {c.data_type for c in tables.embedding_bag_configs()} == {data_type}
        finally:
            asyncio.run(pipeline.close())
    with pytest.raises(ValueError, match="precision"):
        build_pipeline(assets, ServeConfig(scoring=ScoringConfig(precision="int4")))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        ScoringConfig(precision="int4")  # type: ignore[arg-type]


def test_mlp_precision_is_bf16_only_natively_and_within_the_auc_limit() -> None:
    bf16_mlp = {
        "int8": {"auc_delta": -0.0002, "speedup": 1.3},
        "fp32": {"auc_delta": -0.01, "speedup": 1.3},
        "fp16": {"auc_delta": 0.0, "speedup": 1.01},
    }
    measured = {"max_auc_loss": 0.001, "bf16_mlp": bf16_mlp}
    assert mlp_precision_for(measured, "int8", native=True) == "bf16"
    assert mlp_precision_for(measured, "int8", native=False) == "fp32"  # emulated bf16 is slow
    assert mlp_precision_for(measured, "fp32", native=True) == "fp32"  # loses too much AUC
    assert mlp_precision_for(measured, "fp16", native=True) == "fp32"  # not faster than noise
    bf16_mlp["int8"].pop("speedup")
    assert mlp_precision_for(measured, "int8", native=True) == "fp32"  # speed not measured
    assert mlp_precision_for({}, "int8", native=True) == "fp32"


def test_full_scorer_runs_the_mlp_in_the_asked_precision(
    artifact_copy: ModelArtifact, serving_assets: ServingFolder
) -> None:
    loaded = serving_assets.load()
    assets = ServingAssets(artifact_copy, loaded.catalog, loaded.index, loaded.index_manifest)
    features = FeatureResolver(artifact_copy.schema, assets.catalog).resolve(
        Query("r", user_id=3, surface=assets.catalog.surfaces[0], sparse={}, dense={}, k=5)
    )
    candidates = Candidates(np.arange(50), np.zeros(50, dtype=np.float32))
    probs = {}
    for mlp in ("fp32", "bf16"):
        scorer = full_scorer(assets, precision="fp32", mlp_precision=mlp)
        assert scorer.model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[mlp]
        probs[mlp] = scorer.score_batch([features], [candidates])[0]
    diff = np.abs(probs["bf16"] - probs["fp32"])
    assert 0 < diff.max() < 0.02
    # auto follows the measured choice and this CPU: bf16 only with native bf16.
    (artifact_copy.path / PRECISION_FILE).write_text(
        json.dumps({"chosen": "fp32", "bf16_mlp": {"fp32": {"auc_delta": 0.0, "speedup": 1.2}}})
    )
    auto = full_scorer(assets, precision="auto", mlp_precision="auto")
    assert auto.model.dtype == (torch.bfloat16 if native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="mlp_precision"):
        full_scorer(assets, mlp_precision="fp8")
    with pytest.raises(ValueError, match="mlp_precision"):
        ScoringConfig(mlp_precision="fp8")  # type: ignore[arg-type]
