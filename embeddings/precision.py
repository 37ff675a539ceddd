"""The full path's precisions at start-up: what ``valuerank bench precision`` measured and wrote to
the model folder's ``precision.json`` (``embeddings.precision_bench``). Choosing only reads that
file: without it (or with one that names nothing known) the server serves fp32 and says why in
a log line; it never benchmarks at start-up."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import torch

from dlrm.artifact import ModelArtifact
from embeddings.fast_path import native_bf16
from embeddings.quant import PRECISIONS, Precision

log = logging.getLogger(__name__)

PRECISION_FILE = "precision.json"
FALLBACK: Precision = "fp32"
MAX_AUC_LOSS = 0.001
"""A precision qualifies when its AUC is less than this below fp32's."""

MlpPrecision = Literal["fp32", "bf16"]
MLP_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIN_BF16_SPEEDUP = 1.05
"""bf16 must beat fp32 by more than timing noise to be worth its rounding."""


def measured(artifact: ModelArtifact) -> dict[str, Any]:
    """The model folder's ``precision.json``, or ``{}`` when it has none."""
    path = artifact.path / PRECISION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def choose_precision(artifact: ModelArtifact) -> Precision:
    """The measured choice of table precision; fp32 (logged) when nothing was measured."""
    chosen = measured(artifact).get("chosen")
    if chosen in PRECISIONS:
        return chosen
    log.warning(
        "no measured precision in %s (%r): serving %s tables; run `valuerank bench precision` to measure",
        artifact.path / PRECISION_FILE,
        chosen,
        FALLBACK,
    )
    return FALLBACK


def choose_mlp_precision(artifact: ModelArtifact, tables: Precision) -> MlpPrecision:
    """The per-candidate MLP's precision with ``tables``: bf16 where it is fast and measured
    harmless (``precision.json``), else fp32."""
    result = measured(artifact)
    if mlp_precision_for(result, tables, native=True) == "fp32":
        return "fp32"  # decided without the CPU probe, which costs a few timed products at start-up
    return mlp_precision_for(result, tables, native=native_bf16())


def mlp_precision_for(result: dict[str, Any], tables: str, *, native: bool) -> MlpPrecision:
    """bf16 when the CPU has native bf16 and, measured with ``tables`` (``result``, a
    ``precision.json``), the bf16 MLP made the full path at least ``MIN_BF16_SPEEDUP`` faster and
    lost less than ``max_auc_loss`` AUC; fp32 otherwise, unmeasured included."""
    entry = result.get("bf16_mlp", {}).get(tables)
    if not native or entry is None or entry.get("speedup", 0.0) < MIN_BF16_SPEEDUP:
        return "fp32"
    max_loss = result.get("max_auc_loss", MAX_AUC_LOSS)
    return "bf16" if -entry["auc_delta"] < max_loss else "fp32"
