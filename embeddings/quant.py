"""Quantized serving tables: TorchRec's quantized EmbeddingBagCollection on FBGEMM TBE.

``quant_tables`` turns a trained DLRM's tables into the request-side and item-side
collections that ``FactoredDLRM`` takes. Each side is one TorchRec quantized
``EmbeddingBagCollection`` (``QuantEBC.from_float`` on a float copy that carries a qconfig),
which holds all of that side's tables in one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``:
one kernel call per side, whatever the number of tables. Rows are stored as

* ``fp32``: the float rows, bit for bit (lookups equal the float tables');
* ``fp16``: half-precision rows;
* ``int8``: row-wise uint8 with a per-row fp16 scale and bias (4 bytes), ``D + 4`` bytes a row.

Lookups always return float32. Rows are padded to ``row_alignment`` bytes; TorchRec's default
(16, for GPUs) would pad a 16-dim int8 row (20 bytes) to 32, the size of an fp16 row, so the
default here is FBGEMM's own CPU alignment, 1.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
from torch.ao.quantization import PlaceholderObserver
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from dlrm.factored import split_tables
from dlrm.schema import FeatureSchema

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

WEIGHT_DTYPES: dict[Precision, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.quint8,  # TorchRec maps it to FBGEMM's row-wise INT8 (uint8 + fp16 scale/bias)
}

CPU_ROW_ALIGNMENT = 1
"""FBGEMM's default row alignment on CPU (bytes)."""


def quant_tables(
    model: DLRM, schema: FeatureSchema, precision: Precision, *, row_alignment: int = CPU_ROW_ALIGNMENT
) -> tuple[QuantEmbeddingBagCollection, QuantEmbeddingBagCollection]:
    """Request-side and item-side quantized collections of ``model``'s tables, for ``FactoredDLRM``."""
    request, item = split_tables(model, schema)
    return (
        quantize_collection(request, precision, row_alignment=row_alignment),
        quantize_collection(item, precision, row_alignment=row_alignment),
    )


def quantize_collection(
    ebc: EmbeddingBagCollection, precision: Precision, *, row_alignment: int = CPU_ROW_ALIGNMENT
) -> QuantEmbeddingBagCollection:
    """A quantized copy of a float ``EmbeddingBagCollection`` (float32 output); ``ebc`` is unchanged."""
    if precision not in WEIGHT_DTYPES:
        raise ValueError(f"{precision=} must be one of {PRECISIONS}")
    if row_alignment < 1:
        raise ValueError(f"{row_alignment=} must be >= 1")
    # from_float reads the weight dtype, output dtype and row alignment from attributes of
    # the float module; they are set only for the conversion.
    ebc.qconfig = QuantConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float32),
        weight=PlaceholderObserver.with_args(dtype=WEIGHT_DTYPES[precision]),
    )
    quant_prep_customize_row_alignment(ebc, [EmbeddingBagCollection], row_alignment)
    try:
        quantized = QuantEmbeddingBagCollection.from_float(ebc)
    finally:
        del ebc.qconfig
    return quantized.eval()


def table_bytes(tables: nn.Module) -> int:
    """Bytes of table storage: the rows (with any scale/bias and padding) of every table."""
    # A quantized collection's state_dict holds each table's packed rows (uint8, padded, with
    # scale/bias for int8); a float collection's holds its float weights.
    return sum(t.numel() * t.element_size() for t in tables.state_dict().values())
