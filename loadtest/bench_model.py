"""The reference DLRM of ``valuerank bench scoring``, its serving variants and its requests.

26 sparse features (13 request side first, then 13 item side) of ``rows`` x 64, 13 dense
features, bottom MLP 512-256-64, top MLP 512-256-1, random weights. All tables are views of
one packed ``26 rows X 64`` weight: TorchRec's baseline and valuerank's paths read the same
rows, and the 6.6 GB of the default size exist once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.factored import FactoredDLRM
from dlrm.model import table_configs
from dlrm.schema import DenseFeature, FeatureSchema, SparseFeature
from embeddings.fast_path import FastDLRM, PackedTables

BOTTOM_MLP = (512, 256, 64)
TOP_MLP = (512, 256, 1)
N_DENSE = 13
DIM = 64
SIDES = ("user",) * 8 + ("context",) * 5 + ("item",) * 13


class ReferenceModel:
    """The baseline DLRM and valuerank's paths over one shared weight.

    Args:
        rows: rows per table.
        seed: seeds the weights (MLPs and tables).
    """

    def __init__(self, rows: int, seed: int) -> None:
        self.rows = rows
        self.seed = seed
        self.schema = reference_schema(rows)
        n_req = len(self.schema.side_indices("user", "context"))
        self.weight = random_rows(len(SIDES) * rows, DIM, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.baseline = build_baseline(self.schema, self.weight)
        names = self.schema.sparse_names
        split = n_req * rows
        self.factored = FactoredDLRM(
            self.baseline,
            self.schema,
            PackedTables(self.weight[:split], names[:n_req], [rows] * n_req),
            PackedTables(self.weight[split:], names[n_req:], [rows] * (len(names) - n_req)),
        )
        # The reduced-precision paths' item rows: an fp16 copy of the item side (half the bytes).
        self.item_rows_fp16 = PackedTables(
            self.weight[split:].half(), names[n_req:], [rows] * (len(names) - n_req)
        )

    def fast(self, mlp: torch.dtype, fp16_rows: bool, compile: bool) -> FastDLRM:
        """valuerank's scorer: MLP precision, fp16 or fp32 item rows, compiled or eager."""
        return FastDLRM(self.factored, mlp, self.item_rows_fp16 if fp16_rows else None, compile)

    def make_request(self, index: int, k: int, multi_hot_ids: int = 0) -> Request:
        """Request ``index`` (deterministic): one user x ``k`` candidates with random ids.

        ``multi_hot_ids`` > 1 gives each item feature bags of ``[ids/2, 3 ids/2]`` ids.
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 97 + multi_hot_ids)
        n_req = len(self.factored.request_keys)
        n_item = len(self.factored.item_keys)
        dense = torch.randn(1, N_DENSE, generator=g)
        req_ids = torch.randint(0, self.rows, (n_req,), generator=g)
        if multi_hot_ids > 1:
            lo, hi = multi_hot_ids // 2, multi_hot_ids * 3 // 2
            item_lengths = torch.randint(lo, hi + 1, (n_item * k,), generator=g, dtype=torch.int32)
        else:
            item_lengths = torch.ones(n_item * k, dtype=torch.int32)
        item_ids = torch.randint(0, self.rows, (int(item_lengths.sum()),), generator=g)
        # The baseline sees K full rows: the request ids repeated per candidate, schema order.
        full_kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.schema.sparse_names,
            values=torch.cat([req_ids.repeat_interleave(k), item_ids]),
            lengths=torch.cat([torch.ones(n_req * k, dtype=torch.int32), item_lengths]),
        )
        return Request(
            dense=dense,
            dense_rows=dense.expand(k, -1).contiguous(),
            request_kjt=KeyedJaggedTensor.from_lengths_sync(
                keys=self.factored.request_keys, values=req_ids, lengths=torch.ones(n_req, dtype=torch.int32)
            ),
            item_kjt=KeyedJaggedTensor.from_lengths_sync(
                keys=self.factored.item_keys, values=item_ids, lengths=item_lengths
            ),
            full_kjt=full_kjt,
            k=k,
        )


@dataclass
class Request:
    dense: torch.Tensor
    """``1 X 13``."""
    dense_rows: torch.Tensor
    """``K X 13``: the dense row repeated, for the baseline."""
    request_kjt: KeyedJaggedTensor
    """The 13 request-side ids, batch 1."""
    item_kjt: KeyedJaggedTensor
    """The item-side ids of the K candidates."""
    full_kjt: KeyedJaggedTensor
    """All 26 features for the K expanded rows (the baseline's input)."""
    k: int
    """Candidates."""

    @property
    def item_lookups(self) -> int:
        return int(self.item_kjt.values().numel())


def reference_schema(rows: int) -> FeatureSchema:
    """26 sparse features: 8 user, 5 context, then 13 item; 13 dense."""
    sparse = tuple(
        SparseFeature(name=f"s{i:02d}", cardinality=rows, dim=DIM, side=side)  # type: ignore[arg-type]
        for i, side in enumerate(SIDES)
    )
    return FeatureSchema("bench", sparse, tuple(DenseFeature(f"d{i:02d}") for i in range(N_DENSE)))


def random_rows(n_rows: int, dim: int, seed: int) -> torch.Tensor:
    """``n_rows X dim`` fp32 rows uniform in [-0.25, 0.25) x a per-block scale, filled fast.

    Drawing 1.7 G random numbers takes tens of seconds on this machine; instead each block of
    rows is a rotated, rescaled copy of one random pool, so rows stay distinct within a table.
    """
    g = torch.Generator().manual_seed(seed)
    pool_rows = min(n_rows, 1 << 20)
    pool = torch.rand(pool_rows, dim, generator=g).sub_(0.5).mul_(0.5)
    out = torch.empty(n_rows, dim)
    start = 0
    while start < n_rows:
        n = min(pool_rows, n_rows - start)
        shift = int(torch.randint(0, pool_rows, (1,), generator=g))
        scale = 0.5 + float(torch.rand(1, generator=g))
        head = min(n, pool_rows - shift)
        torch.mul(pool[shift : shift + head], scale, out=out[start : start + head])
        if n > head:
            torch.mul(pool[: n - head], scale, out=out[start + head : start + n])
        start += n
    return out


def build_baseline(schema: FeatureSchema, weight: torch.Tensor) -> DLRM:
    """TorchRec's eager DLRM whose tables are views of ``weight`` (no copy, no init pass).

    The MLPs take TorchRec's default initialisation from the global seed set by the caller.
    """
    # Built on the meta device, so TorchRec allocates and initialises no table of its own.
    ebc = EmbeddingBagCollection(tables=table_configs(schema), device=torch.device("meta"))
    rows = schema.sparse[0].cardinality
    for i, f in enumerate(schema.sparse):
        bag = ebc.embedding_bags[f.table_name]
        bag.weight = nn.Parameter(weight[i * rows : (i + 1) * rows], requires_grad=False)
    ebc._device = torch.device("cpu")
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(schema.dense),
        dense_arch_layer_sizes=list(BOTTOM_MLP),
        over_arch_layer_sizes=list(TOP_MLP),
        dense_device=torch.device("cpu"),
    )
    return model.eval().requires_grad_(False)


def fast_path_work(schema: FeatureSchema, k: int, item_lookups: float) -> dict[str, int]:
    """FLOPs and fp32 embedding bytes per candidate that the factored path needs.

    Per candidate: item lookups, request x item and item x item dot products, the first top
    layer's item-dependent columns, the rest of the top MLP. Per request (shared by ``k``):
    the bottom MLP, request lookups and dot products, the first layer's constant part.
    """
    n_req = len(schema.side_indices("user", "context")) + 1  # + the bottom MLP output
    n_item = len(schema.side_indices("item"))
    d, h = DIM, TOP_MLP[0]
    n_ii = n_item * (n_item - 1) // 2
    n_rr = n_req * (n_req - 1) // 2
    per_cand = n_item * n_req * d + n_ii * d + (n_item * n_req + n_ii) * h + _mlp_macs(TOP_MLP)
    per_req = _mlp_macs((N_DENSE, *BOTTOM_MLP)) + n_rr * d + (d + n_rr) * h
    lookups = item_lookups + (n_req - 1) / k
    return {"flops": round(2 * (per_cand + per_req / k)), "bytes": round(lookups * d * 4)}


def baseline_work(schema: FeatureSchema, item_lookups: float) -> dict[str, int]:
    """FLOPs and embedding bytes per row of TorchRec's DLRM on the expanded rows."""
    n_vec = len(schema.sparse) + 1
    inter = DIM + n_vec * (n_vec - 1) // 2
    # TorchRec's interaction computes the full Gram matrix.
    macs = _mlp_macs((N_DENSE, *BOTTOM_MLP)) + n_vec * n_vec * DIM + _mlp_macs((inter, *TOP_MLP))
    lookups = item_lookups + len(schema.side_indices("user", "context"))
    return {"flops": 2 * macs, "bytes": round(lookups * DIM * 4)}


def _mlp_macs(sizes: tuple[int, ...]) -> int:
    return sum(a * b for a, b in itertools.pairwise(sizes))
