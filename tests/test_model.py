"""The TorchRec DLRM built from a schema, and its per-request factorisation used in serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm.data import single_hot_kjt
from dlrm.factored import FactoredDLRM
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import DenseFeature, FeatureSchema, SparseFeature, load_schema

DIM = 8
SMALL = FeatureSchema(
    "small",
    (
        SparseFeature("user", 50, DIM, "user"),
        SparseFeature("item", 40, DIM, "item"),
        SparseFeature("surface", 6, DIM, "context"),
        SparseFeature("category", 7, DIM, "item"),
        SparseFeature("tier", 3, DIM, "user", pooling="mean"),
        SparseFeature("brand", 11, DIM, "item"),
    ),
    (DenseFeature("activity", "user"), DenseFeature("hour_sin"), DenseFeature("depth")),
)
SMALL_CONFIG = ModelConfig(bottom_mlp=(16, DIM), top_mlp=(32, 16, 1))


def random_ids(schema: FeatureSchema, n: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(np.stack([rng.integers(0, f.cardinality, n) for f in schema.sparse], axis=1))


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_world_dlrm_forward_gives_one_logit_per_row(batch: int) -> None:
    schema = load_schema("world")
    model = build_dlrm(schema, ModelConfig()).eval()
    rng = np.random.default_rng(batch)
    dense = torch.randn(batch, len(schema.dense))
    with torch.inference_mode():
        out = model(dense, single_hot_kjt(schema.sparse_names, random_ids(schema, batch, rng)))
    assert out.shape == (batch, 1) and torch.isfinite(out).all()


def test_build_is_deterministic_per_seed_and_checks_the_config() -> None:
    a, b, c = (build_dlrm(SMALL, SMALL_CONFIG, seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="embedding dim"):
        build_dlrm(SMALL, ModelConfig(bottom_mlp=(16, DIM + 1)))
    with pytest.raises(ValueError, match="end in 1"):
        ModelConfig(top_mlp=(8, 2))
    with pytest.raises(ValueError, match="two layers"):
        ModelConfig(top_mlp=(1,))


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, FactoredDLRM]:
    model = build_dlrm(SMALL, SMALL_CONFIG, seed=1)
    with torch.no_grad():  # trained-like scales: TorchRec's init leaves the dot products tiny
        for p in model.sparse_arch.parameters():
            p.normal_(0.0, 0.5)
    model.eval()
    return model, FactoredDLRM(model, SMALL).eval()


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
    seed=st.integers(0, 2**16),
)
def test_factored_equals_dlrm_on_expanded_rows(
    models: tuple[torch.nn.Module, FactoredDLRM], counts: list[int], seed: int
) -> None:
    model, factored = models
    rng = np.random.default_rng(seed)
    n_req, n_cand = len(counts), sum(counts)
    req_idx = SMALL.side_indices("user", "context")
    item_idx = SMALL.side_indices("item")
    dense = torch.randn(n_req, len(SMALL.dense), generator=torch.Generator().manual_seed(seed))
    request_ids = random_ids(SMALL, n_req, rng)[:, req_idx]
    item_ids = random_ids(SMALL, n_cand, rng)[:, item_idx]

    owner = torch.repeat_interleave(torch.arange(n_req), torch.tensor(counts))
    full_ids = torch.empty(n_cand, len(SMALL.sparse), dtype=torch.long)
    full_ids[:, req_idx] = request_ids[owner]
    full_ids[:, item_idx] = item_ids
    with torch.inference_mode():
        expected = model(dense[owner], single_hot_kjt(SMALL.sparse_names, full_ids)).squeeze(1)
        got = factored(
            dense,
            single_hot_kjt([SMALL.sparse_names[i] for i in req_idx], request_ids),
            single_hot_kjt([SMALL.sparse_names[i] for i in item_idx], item_ids),
            counts,
        )
    assert got.shape == (n_cand,)
    assert expected.abs().max() > 1e-3  # the comparison is not between two near-zero vectors
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
