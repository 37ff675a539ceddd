"""The DLRM refactored for serving one user against K candidates, with exact algebra.

In a Recommend call all K candidates share one user and one context. TorchRec's DLRM
recomputes everything per row; here the request-side work runs once per request:

* the bottom MLP and the request-side embedding lookups (``R`` = 1 + F_r vectors: the dense
  output and the user/context embeddings);
* the request x request dot products;
* the top MLP's first layer on those columns: ``W1 = [W_const | W_ri | W_ii]`` split by which
  interaction columns it reads, so ``h1 = relu(c + W_ri . ri + W_ii . ii)`` with
  ``c = W_const . const + b1`` computed once per request.

Per candidate remain the item lookups (``F_i`` vectors), the request x item dot products
(``F_i X R``), the item x item dot products and the rest of the top MLP. The result equals
``DLRM.forward`` on the expanded rows up to float rounding (tested).

Embedding tables are passed in as modules mapping a KeyedJaggedTensor to a KeyedTensor, so the
float ``EmbeddingBagCollection`` and TorchRec's quantized (FBGEMM TBE) collection both fit.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.model import table_configs
from dlrm.schema import FeatureSchema


def split_tables(model: DLRM, schema: FeatureSchema) -> tuple[EmbeddingBagCollection, EmbeddingBagCollection]:
    """Copy the DLRM's tables into a request-side and an item-side collection."""
    source = model.sparse_arch.embedding_bag_collection.embedding_bags
    out = []
    for sides in (("user", "context"), ("item",)):
        idx = schema.side_indices(*sides)
        ebc = EmbeddingBagCollection(tables=table_configs(schema, idx), device=torch.device("cpu"))
        with torch.no_grad():
            for i in idx:
                name = schema.sparse[i].table_name
                ebc.embedding_bags[name].weight.copy_(source[name].weight)
        ebc.eval()
        out.append(ebc)
    return out[0], out[1]


class FactoredDLRM(nn.Module):
    """Scores ``R`` requests x their candidates; see the module docstring for the algebra.

    Args:
        model: a trained TorchRec ``DLRM`` (its MLP weights are shared, not copied).
        schema: the feature schema it was trained on.
        request_tables / item_tables: KJT -> KeyedTensor modules holding the request-side and
            item-side tables (default: float copies made by ``split_tables``).
    """

    # Buffers, declared for type checkers (nn.Module.__getattr__ is typed Tensor | Module).
    w_const: torch.Tensor
    w_ri_t: torch.Tensor
    w_ii_t: torch.Tensor
    b1: torch.Tensor
    rr_a: torch.Tensor
    rr_b: torch.Tensor
    ii_a: torch.Tensor
    ii_b: torch.Tensor

    def __init__(
        self,
        model: DLRM,
        schema: FeatureSchema,
        request_tables: nn.Module | None = None,
        item_tables: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if request_tables is None or item_tables is None:
            request_tables, item_tables = split_tables(model, schema)
        self.request_tables = request_tables
        self.item_tables = item_tables
        self.request_keys = [schema.sparse[i].name for i in schema.side_indices("user", "context")]
        self.item_keys = [schema.sparse[i].name for i in schema.side_indices("item")]
        self.bottom_mlp = model.dense_arch.model
        D = schema.embedding_dim
        F = len(schema.sparse)

        # Position of each vector in the DLRM's interaction input: 0 = dense, 1 + j = feature j.
        req_pos = [0] + [1 + i for i in schema.side_indices("user", "context")]
        item_pos = [1 + i for i in schema.side_indices("item")]
        rows, cols = torch.triu_indices(F + 1, F + 1, offset=1)
        column = {(int(a), int(b)): D + n for n, (a, b) in enumerate(zip(rows, cols, strict=True))}

        def col(a: int, b: int) -> int:
            return column[(min(a, b), max(a, b))]

        req_set = set(req_pos)
        const_cols = list(range(D)) + [c for (a, b), c in column.items() if a in req_set and b in req_set]
        # ri[n, i, r] = <item_i, req_r>; its flat order is (i, r).
        ri_cols = [col(i, r) for i in item_pos for r in req_pos]
        ii_pairs = torch.triu_indices(len(item_pos), len(item_pos), offset=1)
        ii_cols = [col(item_pos[int(a)], item_pos[int(b)]) for a, b in zip(*ii_pairs, strict=True)]
        rr_pairs = [
            (req_pos.index(a), req_pos.index(b)) for (a, b) in column if a in req_set and b in req_set
        ]

        over = model.over_arch.model
        first: nn.Linear = over[0]._mlp[0]._linear  # MLP -> Perceptron -> Linear
        W = first.weight.detach()
        self.register_buffer("w_const", W[:, const_cols].contiguous())
        self.register_buffer("w_ri_t", W[:, ri_cols].t().contiguous())
        self.register_buffer("w_ii_t", W[:, ii_cols].t().contiguous())
        self.register_buffer("b1", first.bias.detach().clone())
        self.register_buffer("rr_a", torch.tensor([a for a, _ in rr_pairs], dtype=torch.long))
        self.register_buffer("rr_b", torch.tensor([b for _, b in rr_pairs], dtype=torch.long))
        self.register_buffer("ii_a", ii_pairs[0].clone())
        self.register_buffer("ii_b", ii_pairs[1].clone())
        # The rest of the over arch after the first Linear+ReLU.
        self.top_rest = nn.Sequential(*list(over[0]._mlp)[1:], over[1])
        self.n_req = len(req_pos)
        self.n_item = len(item_pos)
        self.D = D

    @torch.inference_mode()
    def request_state(
        self, dense: torch.Tensor, request_kjt: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per request: ``R X n_req X D`` vectors and ``R X H`` first-layer constants."""
        emb = self.request_tables(request_kjt).values().view(-1, self.n_req - 1, self.D)
        return self.request_state_from(dense, emb)

    def request_state_from(self, dense: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``request_state`` from looked-up request embeddings ``R X (n_req - 1) X D`` (no KJT)."""
        dense_out = self.bottom_mlp(dense)
        vecs = torch.cat([dense_out.unsqueeze(1), emb], dim=1)
        gram = torch.bmm(vecs, vecs.transpose(1, 2))
        rr = gram[:, self.rr_a, self.rr_b]
        const = torch.cat([dense_out, rr], dim=1)
        return vecs, torch.addmm(self.b1, const, self.w_const.t())

    @torch.inference_mode()
    def forward(
        self,
        dense: torch.Tensor,
        request_kjt: KeyedJaggedTensor,
        item_kjt: KeyedJaggedTensor,
        counts: list[int],
    ) -> torch.Tensor:
        """Logits of all candidates, concatenated in request order.

        Args:
            dense: ``R X n_dense`` request dense features.
            request_kjt: request-side ids, batch size ``R``.
            item_kjt: item-side ids, batch size ``N = sum(counts)``.
            counts: candidates per request.
        """
        vecs, const = self.request_state(dense, request_kjt)
        item = self.item_tables(item_kjt).values().view(-1, self.n_item, self.D)
        counts_t = torch.tensor(counts, dtype=torch.long)
        req_vecs = torch.repeat_interleave(vecs, counts_t, dim=0)
        ri = torch.bmm(item, req_vecs.transpose(1, 2)).reshape(item.shape[0], -1)
        h = torch.repeat_interleave(const, counts_t, dim=0)
        h = torch.addmm(h, ri, self.w_ri_t)
        if self.n_item > 1:
            ii = (item[:, self.ii_a, :] * item[:, self.ii_b, :]).sum(-1)
            h = torch.addmm(h, ii, self.w_ii_t)
        return self.top_rest(torch.relu(h)).squeeze(1)
