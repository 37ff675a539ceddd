"""`valuerank bench scoring`: the full scoring path against TorchRec's DLRM, in one process.

One request is one user x K candidates of the reference model (``loadtest.bench_model``).
Variants, all on the same weights (tables are shared):

* ``baseline``: TorchRec eager fp32 ``DLRM`` on the K expanded rows (request features repeated);
* ``factored``: ``FactoredDLRM`` (request side once per request), fp32;
* ``fast[_fp16rows]_{fp32|bf16}[_compiled]``: ``FastDLRM`` (packed tables, a few large GEMMs)
  with fp32 or fp16 item rows, the per-candidate MLP in fp32 or bf16, eager or with its tensor
  work under ``torch.compile`` (the first call's compile time is reported, not timed).

This machine is noisy, so variants are timed interleaved (rotating order) in one process and
figures are medians. Every call scores a fresh request, so table rows come from memory as in
production; each timed call follows an untimed one of the same variant (``time_interleaved``).
``ratio`` = valuerank's fp32 path / baseline candidates per second; ``max_abs_score_diff``
is on logits, over the first ``DIFF_REQUESTS`` requests. The ``multi_hot`` section repeats it
with item features pooling ~``multi_hot_ids`` ids each (memory-bound).

Roofline: ``flops_per_candidate`` / ``bytes_per_candidate`` are the work the factored path needs
(request side divided by K); ``machine`` holds the best of the matmul and random-gather probes
run between timed calls (noise only slows a probe). The limit is the lower of compute and
gather (``binding`` says which); ``roofline_fraction`` compares the path's best call with it,
``roofline_fraction_p50`` its median call. ``precisions`` has valuerank's fp32 path and its
reduced-precision one (fp16 item rows, plus a bf16 MLP where the CPU has native bf16), each
with its ratio and score diff; ``variants`` has every variant.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

# isort: off
from embeddings import omp as _omp  # before torch: sets the OpenMP wait policy torch starts with

# isort: on
import numpy as np
import torch
import torch.nn.functional as F

from dlrm.configs import add_flags, from_flags
from embeddings.fast_path import FastDLRM, matmul_gflops, native_bf16
from loadtest.bench_model import ReferenceModel, Request, baseline_work, fast_path_work

log = logging.getLogger(__name__)

DIFF_REQUESTS = 8
"""Requests on which every variant's scores are compared with the baseline's."""
SLOW_CALLS = 2
"""Calls given to a variant without hardware support (bf16 on AVX2-only CPUs: ~100x slower)."""


@dataclass(frozen=True)
class BenchConfig:
    rows_per_table: int = 1_000_000
    """Rows in each of the 26 embedding tables (64 dims, fp32)."""
    candidates: int = 500
    """Candidates scored per request (K)."""
    requests: int = 32
    """Timed requests per variant in each repeat; every call draws a fresh request."""
    threads: int = 2
    """torch intra-op threads."""
    repeats: int = 3
    """Independent interleaved measurements; the report gives the ratio of each."""
    multi_hot_ids: int = 8
    """Mean ids per item feature in the multi_hot section (bags of ids/2 .. 3 ids/2)."""
    compile: bool = True
    """Also time torch.compile'd fast paths (first-call compile time is reported, not timed)."""
    seed: int = 0
    """Seed for weights and requests."""

    def __post_init__(self) -> None:
        if self.rows_per_table < 2:
            raise ValueError(f"{self.rows_per_table=} must be >= 2")
        if not 1 <= self.candidates <= 100_000:
            raise ValueError(f"{self.candidates=} must be in 1..100000")
        if self.requests < 1 or self.repeats < 1:
            raise ValueError(f"{self.requests=} and {self.repeats=} must be >= 1")
        if not 1 <= self.threads <= 256:
            raise ValueError(f"{self.threads=} must be in 1..256")
        if self.multi_hot_ids < 2:
            raise ValueError(f"{self.multi_hot_ids=} must be >= 2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank bench scoring", description=__doc__)
    add_flags(parser, BenchConfig)
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    args = parser.parse_args(argv)
    try:
        config = from_flags(BenchConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.json:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = bench_scoring(config)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0


def bench_scoring(config: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark; the JSON report (see the module docstring)."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    model = ReferenceModel(config.rows_per_table, config.seed)
    build_s = time.perf_counter() - started
    log.info("built the reference model (%d rows per table) in %.1f s", config.rows_per_table, build_s)
    probes = MachineProbes(model.weight)
    log.info("machine (first probes): %s", probes.summary())
    variants, compile_s = make_variants(model, config, native_bf16=probes.native_bf16)
    single = time_section(model, variants, config, probes, multi_hot_ids=0)
    multi = time_section(model, variants, config, probes, multi_hot_ids=config.multi_hot_ids)
    machine = {"threads": config.threads, "omp_wait_policy": _omp.effective_policy(), **probes.summary()}
    report: dict[str, Any] = {
        "config": asdict(config),
        "machine": machine,
        "score_kind": "logit",
        "build_s": round(build_s, 1),
        "compile_s": compile_s,
    }
    report.update(section_report(model, single, machine))
    report["multi_hot"] = section_report(model, multi, machine)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


@dataclass
class Variant:
    score: Callable[[Request], torch.Tensor]
    """Logits of one request's candidates."""
    slow: bool = False
    """No hardware support here: checked and timed on ``SLOW_CALLS`` calls only."""


def make_variants(
    model: ReferenceModel, config: BenchConfig, *, native_bf16: bool
) -> tuple[dict[str, Variant], dict[str, float]]:
    """The variants to time, and the compile time (first call) of each compiled one."""
    variants = {
        "baseline": Variant(lambda r: model.baseline(r.dense_rows, r.full_kjt).squeeze(1)),
        "factored": Variant(lambda r: model.factored(r.dense, r.request_kjt, r.item_kjt, [r.k])),
    }
    # (MLP dtype, fp16 item rows, compiled); bf16 compiled only where the CPU has bf16 matmuls.
    specs = [(torch.float32, False, False), (torch.bfloat16, False, False)]
    if config.compile:
        specs += [(torch.float32, False, True), (torch.float32, True, True)]
        if native_bf16:
            specs += [(torch.bfloat16, False, True), (torch.bfloat16, True, True)]
    else:
        specs += [(torch.float32, True, False)]
        if native_bf16:  # the reduced serving configuration below: fp16 rows and a bf16 MLP
            specs += [(torch.bfloat16, True, False)]
    compile_s: dict[str, float] = {}
    probe = model.make_request(0, config.candidates)
    for mlp, fp16_rows, compiled in specs:
        name = variant_name(mlp, fp16_rows, compiled)
        fast = model.fast(mlp, fp16_rows, compiled)
        slow = mlp == torch.bfloat16 and not native_bf16
        variants[name] = Variant(functools.partial(fast_call, fast), slow=slow)
        if compiled:
            t0 = time.perf_counter()
            variants[name].score(probe)
            compile_s[name] = round(time.perf_counter() - t0, 2)
            log.info("compiled %s in %.1f s", name, compile_s[name])
    return variants, compile_s


def variant_name(mlp: torch.dtype, fp16_rows: bool, compiled: bool) -> str:
    """``fast[_fp16rows]_{fp32|bf16}[_compiled]``."""
    rows = "_fp16rows" if fp16_rows else ""
    return f"fast{rows}_{'bf16' if mlp == torch.bfloat16 else 'fp32'}{'_compiled' if compiled else ''}"


def fast_call(fast: FastDLRM, r: Request) -> torch.Tensor:
    return fast(r.dense, r.request_kjt, r.item_kjt, [r.k])


@dataclass
class SectionTimes:
    multi_hot_ids: int
    """Mean ids per item bag (0: single-hot)."""
    k: int
    """Candidates per request."""
    item_lookups: float
    """Mean item lookups per candidate."""
    diffs: dict[str, float]
    """Max |logit - baseline logit| per variant."""
    times: dict[str, list[list[float]]]
    """Milliseconds per call, per variant and repeat."""
    compiled: bool
    """Whether the compiled variants ran."""


def time_section(
    model: ReferenceModel,
    variants: dict[str, Variant],
    config: BenchConfig,
    probes: MachineProbes,
    *,
    multi_hot_ids: int,
) -> SectionTimes:
    """Check and time every variant on requests of one kind (0: single-hot)."""
    k = config.candidates
    requests = [model.make_request(i, k, multi_hot_ids) for i in range(DIFF_REQUESTS)]
    diffs = max_abs_diffs(variants, requests)
    fresh = (model.make_request(DIFF_REQUESTS + i, k, multi_hot_ids) for i in itertools.count())
    times = time_interleaved(variants, fresh, config.requests, config.repeats, probes.sample)
    log.info("timed the section with multi_hot_ids=%d", multi_hot_ids)
    lookups = statistics.fmean(r.item_lookups for r in requests) / k
    return SectionTimes(multi_hot_ids, k, lookups, diffs, times, config.compile)


def section_report(model: ReferenceModel, section: SectionTimes, machine: dict[str, Any]) -> dict[str, Any]:
    """One section of the JSON report."""
    k, item_lookups, diffs, times = section.k, section.item_lookups, section.diffs, section.times
    work = fast_path_work(model.schema, k, item_lookups)
    base_work = baseline_work(model.schema, item_lookups)
    all_times = {n: [t for rep in reps for t in rep] for n, reps in times.items()}
    base_ms = statistics.median(all_times["baseline"])
    table = {
        name: {
            "candidates_per_s": round(k / statistics.median(samples) * 1e3, 1),
            "request_ms": percentiles(samples),
            "ratio": round(base_ms / statistics.median(samples), 3),
            # Median over rounds of the baseline's time / this variant's in the same round.
            "ratio_paired": paired_ratio(times["baseline"], times[name]),
            "ratio_by_repeat": [
                round(statistics.median(b) / statistics.median(v), 3)
                for b, v in zip(times["baseline"], times[name], strict=False)
            ],
            "max_abs_score_diff": diffs[name],
            "timed_calls": len(samples),
        }
        for name, samples in all_times.items()
    }
    # The serving configurations, fixed in advance (picking the faster of two noisy measurements
    # would bias the ratio up): compiled when compiling, bf16 MLPs only with native bf16.
    compiled = section.compiled
    mlp = torch.bfloat16 if machine["native_bf16"] else torch.float32
    precisions = {
        "fp32": precision_report(k, variant_name(torch.float32, False, compiled), table, work, machine),
        "reduced": precision_report(k, variant_name(mlp, True, compiled), table, work, machine),
    }
    head = precisions["fp32"]
    return {
        "ids_per_item_bag": round(item_lookups / len(model.factored.item_keys), 2),
        "lookups_per_candidate": round(item_lookups + len(model.factored.request_keys) / k, 2),
        "baseline": {
            **table["baseline"],
            "flops_per_candidate": base_work["flops"],
            "bytes_per_candidate": base_work["bytes"],
        },
        "valuerank": {key: head[key] for key in ("variant", "candidates_per_s", "request_ms")},
        **{key: head[key] for key in ("ratio", "ratio_paired", "ratio_by_repeat", "max_abs_score_diff")},
        "flops_per_candidate": work["flops"],
        "bytes_per_candidate": work["bytes"],
        **{
            key: head[key]
            for key in ("binding", "roofline_candidates_per_s", "roofline_fraction", "roofline_fraction_p50")
        },
        "precisions": precisions,
        "variants": table,
    }


def paired_ratio(base: list[list[float]], other: list[list[float]]) -> float:
    pairs = [b / o for rb, ro in zip(base, other, strict=False) for b, o in zip(rb, ro, strict=False)]
    return round(statistics.median(pairs), 3)


def precision_report(
    k: int, name: str, table: dict[str, dict[str, Any]], work: dict[str, int], machine: dict[str, Any]
) -> dict[str, Any]:
    """Variant ``name``'s figures with its roofline."""
    # fp16 rows halve the gathered bytes; the MLP precision sets the compute rate.
    bytes_ = work["bytes"] // 2 if "fp16rows" in name else work["bytes"]
    gflops = machine["matmul_gflops_bf16" if "bf16" in name else "matmul_gflops"]
    compute = gflops * 1e9 / work["flops"]
    gather = machine["gather_gbps"] * 1e9 / bytes_
    roof = min(compute, gather)
    out = {
        "variant": name,
        **table[name],
        "bytes_per_candidate": bytes_,
        "compute_limit_candidates_per_s": round(compute),
        "gather_limit_candidates_per_s": round(gather),
        "binding": "compute" if compute <= gather else "gather",
        "roofline_candidates_per_s": round(roof),
        # Like the probes (best sample), the path at its best call; the median-based one too.
        "roofline_fraction": round(k / table[name]["request_ms"]["min"] * 1e3 / roof, 3),
        "roofline_fraction_p50": round(table[name]["candidates_per_s"] / roof, 3),
    }
    if not name.startswith("fast_fp32"):
        mlp = "bf16" if "bf16" in name else "fp32"
        out["what"] = f"{'fp16' if 'fp16rows' in name else 'fp32'} item rows, {mlp} per-candidate MLP"
        out["quality"] = (
            "random weights: only max_abs_score_diff here; AUC per precision on a trained model "
            "comes from `valuerank bench precision`"
        )
        if not machine["native_bf16"]:
            out["bf16"] = f"no native bf16 matmul on this CPU; bf16 MLPs timed on {SLOW_CALLS} calls only"
    return out


def max_abs_diffs(variants: dict[str, Variant], requests: list[Request]) -> dict[str, float]:
    """Largest |logit - baseline logit| of each variant over ``requests``."""
    out = dict.fromkeys(variants, 0.0)
    with torch.inference_mode():
        for i, r in enumerate(requests):
            ref = variants["baseline"].score(r).float()
            for name, v in variants.items():
                if v.slow and i >= SLOW_CALLS:
                    continue
                out[name] = max(out[name], float((v.score(r).float() - ref).abs().max()))
    return {n: float(f"{d:.3g}") for n, d in out.items()}


def time_interleaved(
    variants: dict[str, Variant],
    fresh: Iterator[Request],
    requests: int,
    repeats: int,
    probe: Callable[[], None],
) -> dict[str, list[list[float]]]:
    """Milliseconds per call of each variant, one list per repeat.

    Each round ``probe`` samples the machine's rates, then every variant, in an order rotated
    each round, scores two fresh requests back to back and the second call is timed. The
    untimed call puts the variant in the steady state of a server that scores request after
    request (its weights and code in cache; the rows of a fresh request still come from
    memory) instead of timing the cache misses caused by the variant or probe run before it.
    """
    names = list(variants)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    step = 0
    with torch.inference_mode():
        for rep in range(repeats):
            for n in names:
                times[n].append([])
            for _ in range(requests):
                probe()
                order = names[step % len(names) :] + names[: step % len(names)]
                step += 1
                for name in order:
                    v = variants[name]
                    if v.slow and (rep > 0 or len(times[name][0]) >= SLOW_CALLS):
                        continue
                    if not v.slow:
                        v.score(next(fresh))
                    r = next(fresh)
                    t0 = time.perf_counter()
                    v.score(r)
                    times[name][-1].append((time.perf_counter() - t0) * 1e3)
    return {n: [rep for rep in reps if rep] for n, reps in times.items()}


class MachineProbes:
    """The machine's matmul and random-gather rates, sampled between timed calls.

    Noise here only ever slows a probe down, so the best sample is the machine's capability.
    The gather probe reads fresh random rows each time (a repeated id set would come from
    cache), alternating a plain gather into a reused buffer and a pooled one (8 rows per bag).
    """

    GATHER_ROWS = 1 << 16
    MATMUL_N = 1024

    def __init__(self, weight: torch.Tensor, first_samples: int = 5) -> None:
        self.weight = weight
        self.samples: dict[str, list[float]] = {
            "matmul_gflops": [],
            "matmul_gflops_bf16": [],
            "gather_gbps": [],
        }
        self._g = torch.Generator().manual_seed(1)
        self._buf = torch.empty(self.GATHER_ROWS, weight.shape[1], dtype=weight.dtype)
        self._offsets = torch.arange(0, self.GATHER_ROWS + 1, 8)
        self._pooled = False
        self._fp32 = torch.randn(self.MATMUL_N, self.MATMUL_N)
        self._bf16 = self._fp32.bfloat16()
        # Without native bf16 a 1024^3 product takes seconds: one small probe stands for it.
        self.native_bf16 = native_bf16()
        if not self.native_bf16:
            self.samples["matmul_gflops_bf16"].append(matmul_gflops(256, torch.bfloat16))
        for _ in range(first_samples):
            self.sample()

    def sample(self) -> None:
        self.samples["matmul_gflops"].append(self._matmul(self._fp32))
        if self.native_bf16:
            self.samples["matmul_gflops_bf16"].append(self._matmul(self._bf16))
        ids = torch.randint(0, self.weight.shape[0], (self.GATHER_ROWS,), generator=self._g)
        t0 = time.perf_counter()
        if self._pooled:
            F.embedding_bag(ids, self.weight, self._offsets, mode="sum", include_last_offset=True)
        else:
            torch.index_select(self.weight, 0, ids, out=self._buf)
        sec = time.perf_counter() - t0
        self._pooled = not self._pooled
        row_bytes = self.weight.shape[1] * self.weight.element_size()
        self.samples["gather_gbps"].append(self.GATHER_ROWS * row_bytes / sec / 1e9)

    def _matmul(self, a: torch.Tensor) -> float:
        t0 = time.perf_counter()
        torch.mm(a, a)
        return 2 * self.MATMUL_N**3 / (time.perf_counter() - t0) / 1e9

    def summary(self) -> dict[str, Any]:
        best = {key: round(max(values), 2) for key, values in self.samples.items()}
        row_bytes = self.weight.shape[1] * self.weight.element_size()
        return {
            **best,
            "native_bf16": self.native_bf16,
            "gather_mrows_per_s": round(best["gather_gbps"] * 1e9 / row_bytes / 1e6, 1),
            "probe_samples": len(self.samples["matmul_gflops"]),
        }


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms)
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "min": round(float(arr.min()), 3),
    }


def summary(report: dict[str, Any]) -> str:
    """A few human-readable lines, then the JSON."""
    lines = []
    for label, sec in (("single-hot", report), ("multi-hot", report["multi_hot"])):
        for name, v in sec["variants"].items():
            lines.append(
                f"{label:<10} {name:<20} {v['candidates_per_s']:>10.0f} cand/s  "
                f"p50 {v['request_ms']['p50']:8.2f} ms  x{v['ratio']:.2f}  "
                f"maxdiff {v['max_abs_score_diff']:.2g}"
            )
        lines.append(
            f"{label:<10} ratio {sec['ratio']:.2f} {sec['ratio_by_repeat']}  binding {sec['binding']}  "
            f"roofline fraction {sec['roofline_fraction']:.2f}"
        )
    return "\n".join(lines) + "\n" + json.dumps(report, indent=2)


if __name__ == "__main__":
    sys.exit(main())
