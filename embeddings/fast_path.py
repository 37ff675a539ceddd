"""The full scoring path at the hardware limit: packed tables and the factored DLRM as big GEMMs.

``FactoredDLRM`` already runs the request side once per request. What remains per candidate
is memory traffic (item lookups) and three matrix products; this module makes each of them one
large, cache-friendly operation:

* ``PackedTables``: all tables of one side stacked into one ``rows X D`` weight, so a side's
  lookups are one ``embedding`` (single-hot) or one ``embedding_bag`` (multi-hot) call over
  all features instead of one call per table. The weight may be a view of storage shared with
  other modules (the benchmark's TorchRec baseline reads the same rows).
* ``FastDLRM``: the request x item dot products of one request are one ``(K * F_i) X D`` by
  ``D X R`` GEMM (``FactoredDLRM`` repeats the request vectors per candidate and runs ``K``
  tiny batched products); the item x item dot products are one batched product; both feed the
  top MLP's first layer as one ``K X (F_i R + F_i (F_i - 1) / 2)`` GEMM. ``compile=True``
  runs a request's tensor work under ``torch.compile``, which also fuses the item x item
  products into one loop.

Reduced precision, where measured quality allows: ``dtype`` bf16 runs the per-candidate MLP on
bf16 weights (fast only with native bf16, e.g. AVX-512 BF16; the request side stays fp32), and
``PackedTables`` over fp16 rows halves the bytes of each lookup. In fp32, outputs equal
``FactoredDLRM`` (and so TorchRec's ``DLRM``) up to float rounding.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.mlp import Perceptron
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.factored import FactoredDLRM

_POOLING_MODES = ("sum", "mean")


def matmul_gflops(n: int, dtype: torch.dtype, reps: int = 3) -> float:
    """Best of ``reps`` timed ``n^3`` products after a warm-up one."""
    a = torch.randn(n, n).to(dtype)
    torch.mm(a, a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16, AMX): oneDNN's own check, then a
    small timed probe, since emulated bf16 is ~100x slower than fp32: bf16 must keep up with
    half of fp32's rate."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return matmul_gflops(256, torch.bfloat16) > matmul_gflops(256, torch.float32) / 2


class FastDLRM(nn.Module):
    """Scores ``R`` requests x their candidates like ``FactoredDLRM``, with fewer, larger kernels.

    Args:
        factored: the factored model; its tables, bottom MLP and first-layer split are shared.
        dtype: ``torch.float32`` (equal to the reference up to rounding) or ``torch.bfloat16``
            (the per-candidate MLP on bf16 weights; fast only on CPUs with native bf16).
        item_tables: a KJT -> KeyedTensor module replacing ``factored.item_tables`` (e.g.
            ``PackedTables`` of fp16 rows: half the bytes per lookup).
        compile: run a single request's tensor work (everything after the two lookups) under
            ``torch.compile``; the first call of each new shape compiles (seconds).
    """

    ii_a: torch.Tensor
    ii_b: torch.Tensor
    ii_flat: torch.Tensor
    w_first: torch.Tensor

    def __init__(
        self,
        factored: FactoredDLRM,
        dtype: torch.dtype = torch.float32,
        item_tables: nn.Module | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{dtype=} must be torch.float32 or torch.bfloat16")
        self.factored = factored
        self.item_tables = factored.item_tables if item_tables is None else item_tables
        self.dtype = dtype
        self.request_keys = factored.request_keys
        self.item_keys = factored.item_keys
        self.n_req = factored.n_req
        self.n_item = factored.n_item
        self.D = factored.D
        n = factored.n_item
        # Flat positions of the upper triangle in an item x item Gram matrix.
        self.register_buffer("ii_a", factored.ii_a.clone())
        self.register_buffer("ii_b", factored.ii_b.clone())
        self.register_buffer("ii_flat", factored.ii_a * n + factored.ii_b)
        # One first-layer weight for [ri | ii], ``(F_i R + F_i (F_i-1)/2) X H``.
        self.register_buffer("w_first", torch.cat([factored.w_ri_t, factored.w_ii_t]).to(dtype))
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor] = []
        for linear in _top_linears(factored.top_rest):
            weights.append(linear.weight.detach().t().contiguous().to(dtype))
            biases.append(linear.bias.detach().to(dtype))
        self.top_weights = weights
        self.top_biases = biases
        self.score_one: Callable[..., torch.Tensor] = (
            torch.compile(self.score_request) if compile else self.score_request
        )

    @torch.inference_mode()
    def forward(
        self,
        dense: torch.Tensor,
        request_kjt: KeyedJaggedTensor,
        item_kjt: KeyedJaggedTensor,
        counts: Sequence[int],
    ) -> torch.Tensor:
        """Float32 logits of all candidates, concatenated in request order (as ``FactoredDLRM``)."""
        req = self.factored.request_tables(request_kjt).values().view(-1, self.n_req - 1, self.D)
        item = self.item_embeddings(item_kjt)
        if sum(counts) != item.shape[0] or len(counts) != req.shape[0]:
            raise ValueError(
                f"counts {list(counts)} do not match {req.shape[0]} requests x {item.shape[0]} rows"
            )
        if len(counts) == 1:
            return self.score_one(dense, req, item)
        vecs, const = self.factored.request_state_from(dense, req)
        sizes = torch.tensor(list(counts))
        base = torch.repeat_interleave(const, sizes, dim=0)
        return self._top(self._first_input(item, self._batch_request_item(item, vecs, sizes)), base)

    def item_embeddings(self, item_kjt: KeyedJaggedTensor) -> torch.Tensor:
        """``N X F_i X D`` pooled item embeddings (float32)."""
        return self.item_tables(item_kjt).values().view(-1, self.n_item, self.D)

    def score_request(self, dense: torch.Tensor, req: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """One request's logits from looked-up embeddings: tensors only, what ``compile`` wraps.

        Args:
            dense: ``1 X n_dense``.
            req: ``1 X F_r X D`` request-side embeddings.
            item: ``K X F_i X D`` item embeddings.
        """
        vecs, const = self.factored.request_state_from(dense, req)
        return self._top(self._first_input(item, self._request_item(item, vecs[0])), const[0])

    def _request_item(self, item: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """``K X (F_i R)`` dot products of one request's vectors with its items, flat order ``(i, r)``."""
        # One (K F_i) X D by D X R GEMM; padding R to a multiple of 8 keeps it on the BLAS fast
        # path (2x faster than R = 14 here).
        n_pad = -(-self.n_req // 8) * 8
        padded = F.pad(vecs, (0, 0, 0, n_pad - self.n_req))
        dots = torch.mm(item.reshape(-1, self.D), padded.t()).view(item.shape[0], self.n_item, n_pad)
        return dots[:, :, : self.n_req].reshape(item.shape[0], -1)

    def _batch_request_item(
        self, item: torch.Tensor, vecs: torch.Tensor, sizes: torch.Tensor
    ) -> torch.Tensor:
        """``_request_item`` of every request of a batch. Requests of one candidate count (a
        batch of one cascade depth) share one batched GEMM: a Python loop costs ~10 us a request,
        a fixed cost that makes shallow cascades dear (``valuerank replay``'s depth costs: 20-30%
        cheaper at depth 10-50, batch 16-32). Mixed counts loop (padding them measured slower)."""
        kmax = int(sizes.max())
        if not bool((sizes == kmax).all()):
            segments = torch.split(item, sizes.tolist())
            return torch.cat([self._request_item(seg, v) for seg, v in zip(segments, vecs, strict=True)])
        n_req = len(sizes)
        n_pad = -(-self.n_req // 8) * 8
        padded = F.pad(vecs, (0, 0, 0, n_pad - self.n_req))  # B X n_pad X D
        grid = item.reshape(n_req, kmax * self.n_item, self.D)
        dots = torch.bmm(grid, padded.transpose(1, 2)).view(n_req * kmax, self.n_item, n_pad)
        return dots[:, :, : self.n_req].reshape(n_req * kmax, -1)

    def _first_input(self, item: torch.Tensor, ri: torch.Tensor) -> torch.Tensor:
        """``[ri | ii]``, the first layer's item-dependent inputs: ``K X (F_i R + F_i (F_i-1)/2)``."""
        if self.n_item == 1:
            return ri
        if torch.compiler.is_compiling():
            # Inductor fuses gather, product and sum into one loop: 2x faster than the bmm.
            ii = (item[:, self.ii_a, :] * item[:, self.ii_b, :]).sum(-1)
        else:
            # Eagerly the pairwise form materialises two K X 78 X D gathers; a Gram bmm is 10x faster.
            gram = torch.bmm(item, item.transpose(1, 2)).view(item.shape[0], -1)
            ii = gram.index_select(1, self.ii_flat)
        return torch.cat([ri, ii], dim=1)

    def _top(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The top MLP from its first layer on; ``base`` (``H`` or ``N X H``) holds the constants."""
        h = torch.addmm(base.to(self.dtype), x.to(self.dtype), self.w_first).relu_()
        last = len(self.top_weights) - 1
        for i, (w, b) in enumerate(zip(self.top_weights, self.top_biases, strict=True)):
            h = torch.addmm(b, h, w)
            if i < last:
                h = h.relu_()
        return h.float().squeeze(1)


def _top_linears(top_rest: nn.Module) -> list[nn.Linear]:
    """The Linear layers after the over arch's first layer, checking each hidden one is Linear+ReLU."""
    linears: list[nn.Linear] = []
    for module in top_rest.modules():
        if isinstance(module, Perceptron):
            if module._activation_fn is not torch.relu:
                raise ValueError(f"FastDLRM supports ReLU perceptrons only, got {module._activation_fn}")
        elif isinstance(module, nn.Linear):
            linears.append(module)
    if not linears:
        raise ValueError("over arch has no layers after the first")
    return linears


class PackedTables(nn.Module):
    """Several tables of one dim stacked in one weight; KJT -> KeyedTensor with one gather.

    Args:
        weight: ``sum(rows) X D`` in fp32, fp16 or bf16 (lookups return fp32); table ``t`` owns
            rows ``[offset_t, offset_t + rows[t])`` in ``keys`` order. Not copied: a view of
            shared storage stays shared.
        keys: the feature names, in the order the input KJT lists them.
        rows: rows per table.
        pooling: ``sum`` or ``mean`` for bags of several ids.
    """

    row_start: torch.Tensor

    def __init__(self, weight: torch.Tensor, keys: Sequence[str], rows: Sequence[int], pooling: str = "sum"):
        super().__init__()
        if len(keys) != len(rows) or not keys:
            raise ValueError(f"{len(keys)} keys but {len(rows)} row counts (need >= 1 of each)")
        if weight.dim() != 2 or weight.shape[0] != sum(rows):
            raise ValueError(f"weight {tuple(weight.shape)} must be {sum(rows)} X D")
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"weight dtype {weight.dtype} must be float32, float16 or bfloat16")
        if pooling not in _POOLING_MODES:
            raise ValueError(f"{pooling=} must be one of {_POOLING_MODES}")
        self.weight = weight
        self.keys = list(keys)
        self.pooling = pooling
        starts = [0]
        for r in rows[:-1]:
            starts.append(starts[-1] + r)
        self.register_buffer("row_start", torch.tensor(starts, dtype=torch.long))

    @classmethod
    def from_weights(cls, weights: Sequence[torch.Tensor], keys: Sequence[str], pooling: str = "sum"):
        """Pack separate ``rows_t X D`` tables by copying them into one new weight."""
        return cls(torch.cat([w.detach() for w in weights]), keys, [w.shape[0] for w in weights], pooling)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        if kjt.keys() != self.keys:
            raise ValueError(f"KJT keys {kjt.keys()} differ from the packed tables' {self.keys}")
        n_feat = len(self.keys)
        batch = kjt.stride()
        values = kjt.values()
        dim = self.weight.shape[1]
        if values.numel() == n_feat * batch and bool((kjt.lengths() == 1).all()):
            # Single-hot: gather rows in candidate-major order, so no transpose of the output.
            ids = (values.view(n_feat, batch) + self.row_start.unsqueeze(1)).t().reshape(-1)
            out = F.embedding(ids, self.weight).view(batch, n_feat * dim)
        else:
            per_key = torch.tensor(kjt.length_per_key(), dtype=torch.long)
            ids = values + torch.repeat_interleave(self.row_start, per_key)
            pooled = F.embedding_bag(
                ids, self.weight, kjt.offsets(), mode=self.pooling, include_last_offset=True
            )
            out = pooled.view(n_feat, batch, dim).transpose(0, 1).reshape(batch, n_feat * dim)
        return KeyedTensor(keys=self.keys, length_per_key=[dim] * n_feat, values=out.float())
