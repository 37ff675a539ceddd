"""The fast scoring path equals TorchRec's DLRM, and `valuerank bench scoring` reports it.

Speed is not asserted here (the machine is shared and noisy); correctness and the report's
shape are.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.factored import FactoredDLRM
from dlrm.model import ModelConfig, build_dlrm, table_configs
from dlrm.schema import DenseFeature, FeatureSchema, SparseFeature
from embeddings.fast_path import FastDLRM, PackedTables
from loadtest import bench

# Request and item features interleaved, so the packed layouts must follow the schema order.
SIDES = ("user", "item", "context", "item", "user", "item")
ROWS = (50, 40, 7, 30, 20, 11)
DIM = 8


def tiny_schema(pooling: str = "sum") -> FeatureSchema:
    sparse = tuple(
        SparseFeature(name=f"f{i}", cardinality=rows, dim=DIM, side=side, pooling=pooling)  # type: ignore[arg-type]
        for i, (side, rows) in enumerate(zip(SIDES, ROWS, strict=True))
    )
    return FeatureSchema("tiny", sparse, (DenseFeature("d0"), DenseFeature("d1"), DenseFeature("d2")))


def tiny_models(pooling: str = "sum") -> tuple[FeatureSchema, torch.nn.Module, FactoredDLRM]:
    schema = tiny_schema(pooling)
    model = build_dlrm(schema, ModelConfig(bottom_mlp=(16, DIM), top_mlp=(32, 16, 1)), seed=3).eval()
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    # Make the embeddings large enough that every interaction term matters to the logits.
    with torch.no_grad():
        for f in schema.sparse:
            tables[f.table_name].weight.normal_(0.0, 0.5)
    packed = []
    for sides in (("user", "context"), ("item",)):
        features = [schema.sparse[i] for i in schema.side_indices(*sides)]
        packed.append(
            PackedTables.from_weights(
                [tables[f.table_name].weight for f in features], [f.name for f in features], pooling
            )
        )
    return schema, model, FactoredDLRM(model, schema, packed[0], packed[1])


def random_batch(schema: FeatureSchema, counts: list[int], max_ids: int, seed: int):
    """Inputs for ``len(counts)`` requests, and TorchRec's input for the expanded rows."""
    g = torch.Generator().manual_seed(seed)
    req_idx = schema.side_indices("user", "context")
    item_idx = schema.side_indices("item")
    n_req, n_cand = len(counts), sum(counts)
    dense = torch.randn(n_req, len(schema.dense), generator=g)
    # Per feature (KJT order): lengths and ids of each bag.
    req_ids = torch.stack(
        [torch.randint(0, schema.sparse[i].cardinality, (n_req,), generator=g) for i in req_idx]
    )
    item_len = torch.randint(1, max_ids + 1, (len(item_idx), n_cand), generator=g, dtype=torch.int32)
    item_vals = [
        torch.randint(0, schema.sparse[i].cardinality, (int(item_len[j].sum()),), generator=g)
        for j, i in enumerate(item_idx)
    ]
    owner = torch.repeat_interleave(torch.arange(n_req), torch.tensor(counts))
    full_vals, full_len = [], []
    for i in range(len(schema.sparse)):
        if i in req_idx:
            full_vals.append(req_ids[req_idx.index(i)][owner])
            full_len.append(torch.ones(n_cand, dtype=torch.int32))
        else:
            full_vals.append(item_vals[item_idx.index(i)])
            full_len.append(item_len[item_idx.index(i)])
    names = schema.sparse_names
    request_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[names[i] for i in req_idx],
        values=req_ids.reshape(-1),
        lengths=torch.ones(len(req_idx) * n_req, dtype=torch.int32),
    )
    item_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[names[i] for i in item_idx], values=torch.cat(item_vals), lengths=item_len.reshape(-1)
    )
    full_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=names, values=torch.cat(full_vals), lengths=torch.cat(full_len)
    )
    return dense, request_kjt, item_kjt, dense[owner], full_kjt


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("max_ids", [1, 4])
@pytest.mark.parametrize("counts", [[9], [3, 5, 1]])
def test_fast_dlrm_equals_torchrec_dlrm(pooling: str, max_ids: int, counts: list[int]) -> None:
    schema, model, factored = tiny_models(pooling)
    dense, request_kjt, item_kjt, dense_rows, full_kjt = random_batch(schema, counts, max_ids, seed=11)
    with torch.inference_mode():
        expected = model(dense_rows, full_kjt).squeeze(1)
        got = FastDLRM(factored)(dense, request_kjt, item_kjt, counts)
    assert got.shape == (sum(counts),)
    assert expected.abs().max() > 0.1  # the comparison is not between near-zeros
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bf16_path_is_close_but_not_identical() -> None:
    schema, model, factored = tiny_models()
    dense, request_kjt, item_kjt, dense_rows, full_kjt = random_batch(schema, [12], 1, seed=5)
    with torch.inference_mode():
        expected = model(dense_rows, full_kjt).squeeze(1)
        got = FastDLRM(factored, torch.bfloat16)(dense, request_kjt, item_kjt, [12])
    assert got.dtype == torch.float32
    diff = (got - expected).abs().max()
    assert 0 < diff < 0.05 * expected.abs().max()


def test_compiled_fast_path_equals_eager() -> None:
    """Under torch.compile the item x item products take another form; same scores."""
    schema, _, factored = tiny_models()
    dense, request_kjt, item_kjt, _, _ = random_batch(schema, [10], 1, seed=2)
    eager = FastDLRM(factored)(dense, request_kjt, item_kjt, [10])
    compiled = FastDLRM(factored, compile=True)(dense, request_kjt, item_kjt, [10])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_fp16_rows_stay_close_to_fp32_rows() -> None:
    weight = torch.randn(30, DIM)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([0, 5, 9, 1, 2, 3, 19]), lengths=torch.tensor([2, 1, 3, 1])
    )
    exact = PackedTables(weight, ["a", "b"], [10, 20])(kjt).values()
    half = PackedTables(weight.half(), ["a", "b"], [10, 20])(kjt).values()
    assert half.dtype == torch.float32
    assert 0 < (half - exact).abs().max() < 1e-2


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_packed_tables_equal_an_embedding_bag_collection(pooling: str) -> None:
    schema = tiny_schema(pooling)
    ebc = EmbeddingBagCollection(tables=table_configs(schema), device=torch.device("cpu"))
    packed = PackedTables.from_weights(
        [ebc.embedding_bags[f.table_name].weight for f in schema.sparse], schema.sparse_names, pooling
    )
    for max_ids in (1, 5):
        *_, full_kjt = random_batch(schema, [4, 3], max_ids, seed=max_ids)
        with torch.inference_mode():
            expected = ebc(full_kjt)
            got = packed(full_kjt)
        assert got.keys() == expected.keys()
        torch.testing.assert_close(got.values(), expected.values(), rtol=0, atol=1e-6)


def test_packed_tables_share_the_weight_and_check_keys() -> None:
    weight = torch.randn(10, DIM)
    packed = PackedTables(weight, ["a", "b"], [6, 4])
    assert packed.weight.data_ptr() == weight.data_ptr()
    wrong = KeyedJaggedTensor.from_lengths_sync(
        keys=["b", "a"], values=torch.tensor([0, 1]), lengths=torch.ones(2, dtype=torch.int32)
    )
    with pytest.raises(ValueError, match="differ"):
        packed(wrong)
    with pytest.raises(ValueError, match="must be"):
        PackedTables(weight, ["a", "b"], [6, 5])
    with pytest.raises(ValueError, match="pooling"):
        PackedTables(weight, ["a", "b"], [6, 4], pooling="max")


def test_bench_scoring_reports_json() -> None:
    argv = ["--rows-per-table", "64", "--candidates", "16", "--requests", "2"]
    argv += ["--repeats", "2", "--no-compile", "--json"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert bench.main(argv) == 0
    report = json.loads(out.getvalue())
    for section in (report, report["multi_hot"]):
        for key in ("ratio", "max_abs_score_diff", "flops_per_candidate", "bytes_per_candidate"):
            assert section[key] > 0 or key == "max_abs_score_diff"
        for who in ("baseline", "valuerank"):
            assert section[who]["candidates_per_s"] > 0
        assert set(section["valuerank"]["request_ms"]) == {"p50", "p99", "min"}
        assert section["binding"] in ("compute", "gather")
        assert section["roofline_fraction"] > 0
        assert len(section["ratio_by_repeat"]) == 2
        assert section["max_abs_score_diff"] <= 1e-4
        assert set(section["precisions"]) == {"fp32", "reduced"}
        assert section["precisions"]["fp32"]["variant"].startswith("fast_fp32")
        assert 0 < section["precisions"]["reduced"]["max_abs_score_diff"] < 0.1
        assert section["variants"]["factored"]["max_abs_score_diff"] <= 1e-4
    assert report["ids_per_item_bag"] == 1
    assert report["multi_hot"]["ids_per_item_bag"] > 4
    assert report["multi_hot"]["lookups_per_candidate"] > 4 * report["lookups_per_candidate"]
    for key in ("matmul_gflops", "gather_gbps"):
        assert report["machine"][key] > 0


def test_bench_rejects_bad_flags() -> None:
    with pytest.raises(ValueError, match="candidates"):
        bench.BenchConfig(candidates=0)
    with pytest.raises(SystemExit):
        bench.main(["--requests", "0"])
    with pytest.raises(SystemExit):
        bench.main(["training"])
