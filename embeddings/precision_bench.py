"""`valuerank bench precision`: what each table precision costs in quality, bytes and speed.

For one trained model, the held-out rows are scored through ``FactoredDLRM`` (the serving
path) with quantized tables in fp32, fp16 and int8 row-wise (``embeddings.quant``), and with
TorchRec's float ``EmbeddingBagCollection`` as the reference. Per precision: AUC, logloss,
``auc_delta`` (AUC minus fp32's), table bytes, the largest logit difference from the float
tables, and lookup throughput of the tables alone (all variants timed interleaved on the same
batch, medians). ``chosen`` is the smallest precision whose AUC loss against fp32 is below
``max_auc_loss`` (fp32 itself always qualifies). ``bf16_mlp`` repeats the AUC with the
per-candidate MLP on bf16 weights, as ``FastDLRM(dtype=torch.bfloat16)`` runs it.

The result is written as ``precision.json`` in the model artifact folder, where the server
(``--precision auto``) reads the choice at start-up (``embeddings.precision``); it never
measures there itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlrm import metrics
from dlrm.artifact import ModelArtifact, load_artifact, write_json_atomic
from dlrm.configs import add_flags, from_flags
from dlrm.data import Rows, single_hot_kjt
from dlrm.factored import FactoredDLRM, split_tables
from dlrm.schema import FeatureSchema
from embeddings.fast_path import FastDLRM, native_bf16
from embeddings.precision import FALLBACK, MAX_AUC_LOSS, PRECISION_FILE
from embeddings.quant import PRECISIONS, Precision, quant_tables, table_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionConfig:
    rows: int = 100_000
    """Held-out rows scored (a seeded subsample when the log holds more; 0 = all)."""
    max_auc_loss: float = MAX_AUC_LOSS
    """A precision qualifies when its AUC is less than this below fp32's."""
    batch_size: int = 4096
    """Rows per scoring call."""
    lookup_batch: int = 4096
    """Rows per timed lookup call (each row looks up every sparse feature once)."""
    lookup_repeats: int = 31
    """Timed lookup calls per variant (interleaved; the median is reported)."""
    bf16: bool = True
    """Also measure the per-candidate MLP on bf16 weights: its AUC and, on a CPU with native
    bf16, its full-path speed against fp32."""
    mlp_requests: int = 16
    """Requests per timed full-path call (the server's micro-batch)."""
    mlp_candidates: int = 200
    """Candidates per request in the timed full-path calls."""
    mlp_repeats: int = 101
    """Timed full-path calls per MLP precision (interleaved; the median is reported)."""
    seed: int = 0
    """Seed of the row subsample."""
    threads: int = 1
    """torch intra-op threads while measuring (FBGEMM's CPU lookup kernel uses one)."""

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError(f"{self.rows=} must be >= 0")
        if not 0.0 < self.max_auc_loss < 1.0:
            raise ValueError(f"{self.max_auc_loss=} must be in (0, 1)")
        if self.batch_size < 1 or self.lookup_batch < 1:
            raise ValueError(f"{self.batch_size=} and {self.lookup_batch=} must be >= 1")
        if min(self.mlp_requests, self.mlp_candidates, self.mlp_repeats) < 1:
            raise ValueError(
                f"{self.mlp_requests=}, {self.mlp_candidates=} and {self.mlp_repeats=} must be >= 1"
            )
        if self.lookup_repeats < 1:
            raise ValueError(f"{self.lookup_repeats=} must be >= 1")
        if self.threads < 1:
            raise ValueError(f"{self.threads=} must be >= 1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank bench precision", description=__doc__)
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument(
        "--model", type=Path, default=None, help="measure this model artifact (default: train the world's)"
    )
    parser.add_argument("--refresh", action="store_true", help="measure again even if precision.json exists")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_flags(parser, PrecisionConfig)
    ns = parser.parse_args(argv)
    try:
        config = from_flags(PrecisionConfig, ns)
        if ns.model is not None:
            artifact = load_artifact(ns.model)
            rows = held_out_rows(artifact)
            if rows is None:
                raise FileNotFoundError(f"no held-out rows of the world next to {ns.model}")
        else:
            # Imported here: only this mode may train.
            from dlrm.synth import ensure_world_logs
            from dlrm.train import train_world
            from dlrm.world import WorldConfig

            world = WorldConfig.load(ns.world)
            artifact = train_world(world, ns.artifacts, progress=not ns.json)
            rows = ensure_world_logs(world, ns.artifacts, log=not ns.json).test
        result = load_or_measure(artifact, rows, config, refresh=ns.refresh)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bench precision: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if ns.json else format_report(result))
    return 0


def ensure_measured(artifact: ModelArtifact) -> None:
    """Measure and write ``precision.json`` when the model folder has none (offline tools that
    serve ``auto`` do this first; a server only reads the file)."""
    if (artifact.path / PRECISION_FILE).is_file():
        return
    rows = held_out_rows(artifact)
    if rows is None:
        log.warning("no held-out rows for %s: precisions not measured", artifact.path)
        return
    result = measure_precisions(artifact, rows)
    log.info("precision %s chosen for %s: %s", result["chosen"], artifact.path, result["precisions"])
    write_json_atomic(artifact.path / PRECISION_FILE, result)


def load_or_measure(
    artifact: ModelArtifact, rows: Rows, config: PrecisionConfig = PrecisionConfig(), *, refresh: bool = False
) -> dict[str, Any]:
    """The cached ``precision.json`` when it was measured with ``config``; else measure and cache."""
    path = artifact.path / PRECISION_FILE
    if not refresh and path.is_file():
        cached: dict[str, Any] = json.loads(path.read_text())
        if cached.get("config") == asdict(config):
            return cached
    result = measure_precisions(artifact, rows, config)
    write_json_atomic(path, result)
    return result


def held_out_rows(artifact: ModelArtifact) -> Rows | None:
    """The world's held-out rows for a world-trained artifact in ``<artifacts>/model/<key>``."""
    world_key = artifact.manifest.get("world_key")
    if not world_key:
        return None
    # dlrm.synth writes the world's logs to <artifacts>/world/<world key>/.
    test = artifact.path.parent.parent / "world" / str(world_key) / "test.npz"
    return Rows.load(test) if test.is_file() else None


def measure_precisions(
    artifact: ModelArtifact, rows: Rows, config: PrecisionConfig = PrecisionConfig()
) -> dict[str, Any]:
    """AUC, logloss, bytes and lookup speed per precision, and the chosen one (see module doc)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _measure(artifact, _subsample(rows, config), len(rows), config)
    finally:
        torch.set_num_threads(threads)


def _measure(artifact: ModelArtifact, rows: Rows, available: int, config: PrecisionConfig) -> dict[str, Any]:
    model = artifact.load_model()
    schema = artifact.schema
    tables: dict[str, tuple[nn.Module, nn.Module]] = {"float": split_tables(model, schema)}
    for precision in PRECISIONS:
        tables[precision] = quant_tables(model, schema, precision)
    inputs = _Inputs(schema, rows)
    logits = {
        name: inputs.logits(FactoredDLRM(model, schema, *pair), config.batch_size)
        for name, pair in tables.items()
    }
    quality = {name: _quality(rows.labels, out) for name, out in logits.items()}
    speed = _lookup_speed(tables, inputs, config)
    base_auc = quality["fp32"]["auc"]
    result: dict[str, Any] = {"precisions": {}}
    for name in ("float", *PRECISIONS):
        entry = {
            **quality[name],
            "auc_delta": quality[name]["auc"] - base_auc,
            "max_abs_logit_diff": float((logits[name] - logits["float"]).abs().max()),
            "table_bytes": sum(table_bytes(t) for t in tables[name]),
            **speed[name],
        }
        if name == "float":
            result["float_tables"] = entry  # TorchRec's float EBC: the reference, not a choice
        else:
            result["precisions"][name] = entry
    chosen = cheapest_within(result["precisions"], config.max_auc_loss)
    if config.bf16:
        result["bf16_mlp"] = {
            name: _bf16_quality(model, schema, tables[name], inputs, rows, config, base_auc)
            for name in dict.fromkeys(["fp32", chosen])
        }
        if native_bf16():  # emulated bf16 is ~100x slower: nothing worth timing
            result["bf16_mlp"][chosen].update(
                _mlp_speed(FactoredDLRM(model, schema, *tables[chosen]), inputs, config)
            )
    return {
        "model_version": artifact.version,
        "artifact": str(artifact.path),
        "rows": len(rows),
        "rows_available": available,
        "lookups_per_row": len(schema.sparse),
        "chosen": chosen,
        "max_auc_loss": config.max_auc_loss,
        **result,
        "config": asdict(config),
        "created_unix": time.time(),
    }


def cheapest_within(precisions: dict[str, dict[str, Any]], max_auc_loss: float) -> Precision:
    """The precision with the fewest table bytes whose AUC is less than ``max_auc_loss`` below fp32."""
    ok = [p for p in PRECISIONS if p in precisions and -precisions[p]["auc_delta"] < max_auc_loss]
    if not ok:
        return FALLBACK
    return min(ok, key=lambda p: (precisions[p]["table_bytes"], PRECISIONS.index(p)))


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model_version']}: {result['rows']} held-out rows "
        f"(of {result['rows_available']}), AUC loss limit {result['max_auc_loss']}",
        f"{'tables':<8} {'auc':>8} {'delta':>10} {'logloss':>8} {'bytes':>11} {'Mlookups/s':>11}",
    ]
    entries = {"float": result["float_tables"], **result["precisions"]}
    for name, e in entries.items():
        lines.append(
            f"{name:<8} {e['auc']:8.5f} {e['auc_delta']:+10.6f} {e['logloss']:8.5f} "
            f"{e['table_bytes']:11d} {e['lookups_per_s'] / 1e6:11.2f}"
        )
    for name, e in result.get("bf16_mlp", {}).items():
        speed = f", full path {e['speedup']:.2f}x fp32's speed" if "speedup" in e else ""
        lines.append(
            f"bf16 MLP, {name} tables: auc {e['auc']:.5f} (delta vs fp32 {e['auc_delta']:+.6f}){speed}"
        )
    lines.append(f"chosen: {result['chosen']}")
    return "\n".join(lines)


# -- helpers -----------------------------------------------------------------------------


class _Inputs:
    """The rows as serving inputs: one request and one candidate per row."""

    def __init__(self, schema: FeatureSchema, rows: Rows) -> None:
        self.request_keys = [schema.sparse[i].name for i in schema.side_indices("user", "context")]
        self.item_keys = [schema.sparse[i].name for i in schema.side_indices("item")]
        sparse = torch.from_numpy(rows.sparse)
        self.request_ids = sparse[:, schema.side_indices("user", "context")].contiguous()
        self.item_ids = sparse[:, schema.side_indices("item")].contiguous()
        dense = torch.from_numpy(rows.dense)
        # As in training: a schema without dense features feeds the bottom MLP one zero column.
        self.dense = dense if dense.shape[1] else torch.zeros(len(rows), 1)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, Any, Any]:
        return (
            self.dense[start:stop],
            single_hot_kjt(self.request_keys, self.request_ids[start:stop]),
            single_hot_kjt(self.item_keys, self.item_ids[start:stop]),
        )

    def logits(self, model: Callable[..., torch.Tensor], batch_size: int) -> torch.Tensor:
        n = len(self.dense)
        out = []
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                dense, request, item = self.batch(start, min(n, start + batch_size))
                out.append(model(dense, request, item, [1] * len(dense)))
        return torch.cat(out)


def _mlp_speed(factored: FactoredDLRM, inputs: _Inputs, config: PrecisionConfig) -> dict[str, float]:
    """Milliseconds per full-path call (``FastDLRM``, ``mlp_requests`` requests x
    ``mlp_candidates`` candidates from the held-out rows) with the per-candidate MLP in fp32 and
    in bf16, interleaved, medians; ``speedup`` = fp32 / bf16."""
    n_req, k = config.mlp_requests, config.mlp_candidates
    n = len(inputs.dense)
    req = torch.arange(n_req) % n
    items = torch.arange(n_req * k) % n
    args = (
        inputs.dense[req],
        single_hot_kjt(inputs.request_keys, inputs.request_ids[req].contiguous()),
        single_hot_kjt(inputs.item_keys, inputs.item_ids[items].contiguous()),
        [k] * n_req,
    )
    models = {"fp32": FastDLRM(factored), "bf16": FastDLRM(factored, dtype=torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        model(*args)
    for rep in range(config.mlp_repeats):
        for name in list(models)[rep % 2 :] + list(models)[: rep % 2]:
            started = time.perf_counter()
            models[name](*args)
            times[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(t) * 1000.0 for name, t in times.items()}
    return {"fp32_call_ms": ms["fp32"], "bf16_call_ms": ms["bf16"], "speedup": ms["fp32"] / ms["bf16"]}


def _subsample(rows: Rows, config: PrecisionConfig) -> Rows:
    if config.rows == 0 or len(rows) <= config.rows:
        return rows
    idx = np.sort(np.random.default_rng(config.seed).choice(len(rows), config.rows, replace=False))
    return rows.take(idx)


def _quality(labels: np.ndarray, logits: torch.Tensor) -> dict[str, float]:
    p = torch.sigmoid(logits).numpy()
    return {"auc": metrics.auc(labels, p), "logloss": metrics.logloss(labels, p)}


def _lookup_speed(
    tables: dict[str, tuple[nn.Module, nn.Module]], inputs: _Inputs, config: PrecisionConfig
) -> dict[str, dict[str, float]]:
    """Lookups per second of both sides' tables on one batch; variants interleaved, order rotated."""
    _, request, item = inputs.batch(0, config.lookup_batch)
    lookups = (len(inputs.request_keys) + len(inputs.item_keys)) * request.stride()
    names = list(tables)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            tables[name][0](request), tables[name][1](item)
        for rep in range(config.lookup_repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                started = time.perf_counter()
                tables[name][0](request)
                tables[name][1](item)
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["fp32"])
    return {
        name: {
            "lookups_per_s": lookups / statistics.median(t),
            "lookup_speedup_vs_fp32": base / statistics.median(t),
        }
        for name, t in times.items()
    }


def _bf16_quality(
    model: nn.Module,
    schema: FeatureSchema,
    tables: tuple[nn.Module, nn.Module],
    inputs: _Inputs,
    rows: Rows,
    config: PrecisionConfig,
    base_auc: float,
) -> dict[str, float]:
    scorer = _Bf16Top(FactoredDLRM(model, schema, *tables))
    quality = _quality(rows.labels, inputs.logits(scorer, config.batch_size))
    return {**quality, "auc_delta": quality["auc"] - base_auc}


class _Bf16Top(nn.Module):
    """``FactoredDLRM`` with the per-candidate part of the top MLP on bf16 weights.

    The numerics of ``FastDLRM(dtype=torch.bfloat16)``: the request side (bottom MLP, request
    dot products, first-layer constant) and the dot products stay fp32; the first layer's
    inputs, its constant and every later layer run in bf16; the logit returns as fp32.
    """

    def __init__(self, factored: FactoredDLRM) -> None:
        super().__init__()
        self.factored = factored
        bf16 = torch.bfloat16
        self.w_first = torch.cat([factored.w_ri_t, factored.w_ii_t]).to(bf16)
        self.top = copy.deepcopy(factored.top_rest).to(bf16)

    def forward(self, dense: torch.Tensor, request: Any, item_kjt: Any, counts: list[int]) -> torch.Tensor:
        f = self.factored
        if any(c != 1 for c in counts):
            raise ValueError("_Bf16Top scores one candidate per request")
        vecs, const = f.request_state(dense, request)
        item = f.item_tables(item_kjt).values().view(-1, f.n_item, f.D)
        parts = [torch.bmm(item, vecs.transpose(1, 2)).reshape(item.shape[0], -1)]
        if f.n_item > 1:
            parts.append((item[:, f.ii_a, :] * item[:, f.ii_b, :]).sum(-1))
        x = torch.cat(parts, dim=1).to(torch.bfloat16)
        h = torch.addmm(const.to(torch.bfloat16), x, self.w_first).relu()
        return self.top(h).float().squeeze(1)
