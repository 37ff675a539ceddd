"""A load run's report: the workers' measurements merged, printed, and drawn over time.

Latency percentiles come from the workers' HDR histograms added together (3 significant
digits, from each request's intended send time); per-second series (offered, ok, errors,
p50 / p99, path mix) from the raw per-request arrays. Revenue is the world's expected revenue
of each shown slate (its ground truth) with the drawn (realised) figure beside it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

MAX_LATENCY_US = 60_000_000
"""Largest latency the histograms hold (60 s), at 3 significant digits."""
KEPT_UP_LATE_SHARE = 0.01
"""The generator kept up when at most this share of its sends were late (a shared machine's
scheduler delays a few sends by a slice; more than 1% means the offered rate was not offered)."""
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def merge(
    config: Any,
    parts: list[dict[str, Any]],
    server_before: dict[str, Any] | None = None,
    server_after: dict[str, Any] | None = None,
    server_samples: list[tuple[float, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """One report from the workers' parts (histograms added, arrays joined, counters summed);
    ``server_samples``: (seconds into the run, the server's ``process`` stats) taken during it."""
    histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
    refused = HdrHistogram(1, MAX_LATENCY_US, 3)
    outcomes: Counter[str] = Counter()
    for part in parts:
        histogram.decode_and_add(part["histogram"])
        refused.decode_and_add(part["refused_histogram"])
        outcomes.update(part["outcomes"])
    joined = {key: np.concatenate([p[key] for p in parts]) for key in _ARRAYS}
    offered = len(joined["offsets"])
    ok = int(histogram.get_total_count())
    answered = joined["path"] != ""
    errors = Counter(joined["error"][joined["error"] != ""].tolist())
    late = sum(p["late_sends"] for p in parts)
    duration = float(config.duration)
    expected = float(np.nansum(joined["expected"][answered]))
    realised = float(np.nansum(joined["realised"][answered]))
    report: dict[str, Any] = {
        "config": asdict(config),
        "offered": offered,
        "offered_rps": offered / duration,
        "ok": ok,
        "achieved_rps": ok / duration,
        "latency_ms": _percentiles(histogram),
        "errors": dict(errors),
        "error_share": sum(errors.values()) / offered if offered else 0.0,
        "refused_latency_ms": _percentiles(refused),
        "paths": dict(Counter(joined["path"][answered].tolist())),
        "revenue_per_inference": expected / ok if ok else 0.0,
        "realised_revenue_per_inference": realised / ok if ok else 0.0,
        "revenue_per_s": expected / duration,
        "revenue": _revenue_table(joined, answered),
        "outcomes": dict(outcomes),
        "server_cpu_ms_per_request": _server_cpu_ms(server_before, server_after, ok),
        "generator": {
            "processes": len(parts),
            "late_sends": late,
            "max_lag_ms": max((p["max_lag_ms"] for p in parts), default=0.0),
            "kept_up": late <= KEPT_UP_LATE_SHARE * max(offered, 1),
        },
        "series": _series(joined, duration),
        "stability": _stability(joined, duration, server_samples or []),
    }
    return report


def _stability(
    joined: dict[str, np.ndarray], duration: float, samples: list[tuple[float, dict[str, Any]]]
) -> dict[str, Any]:
    """What a soak is judged by: p99 of the first and last window (a minute, or a quarter of a
    shorter run) after a warm-up of the same length, and the server's resident memory from the
    end of that warm-up to the end (``growth``: their ratio - 1)."""
    window = min(60.0, duration / 4.0)
    ok = (joined["path"] != "") & (joined["error"] == "")
    offsets, latency = joined["offsets"], joined["latency_ms"]

    def p99(lo: float, hi: float) -> float | None:
        rows = ok & (offsets >= lo) & (offsets < hi)
        return float(np.percentile(latency[rows], 99)) if rows.any() else None

    first, last = p99(window, 2 * window), p99(duration - window, duration)
    rss = [(t, int(s.get("rss_bytes", 0))) for t, s in samples if s.get("rss_bytes")]
    warm = [b for t, b in rss if t >= window]
    out: dict[str, Any] = {
        "window_s": window,
        "p99_first_ms": first,
        "p99_last_ms": last,
        "p99_last_over_first": last / first if first and last else None,
        "rss_samples": rss,
    }
    if warm:
        out |= {"rss_after_warmup": warm[0], "rss_end": warm[-1], "rss_growth": warm[-1] / warm[0] - 1.0}
    return out


_ARRAYS = ("offsets", "latency_ms", "path", "error", "surface", "expected", "realised")


def _percentiles(histogram: HdrHistogram) -> dict[str, float]:
    if histogram.get_total_count() == 0:
        return {name: 0.0 for name, _ in PERCENTILES} | {"max": 0.0}
    out = {name: histogram.get_value_at_percentile(pct) / 1000.0 for name, pct in PERCENTILES}
    return out | {"max": histogram.get_max_value() / 1000.0}


def _server_cpu_ms(before: dict[str, Any] | None, after: dict[str, Any] | None, ok: int) -> float | None:
    """The server's CPU milliseconds per answered request over the run (None: unknown, or it restarted)."""
    if before is None or after is None or before.get("pid") != after.get("pid") or ok == 0:
        return None
    return (float(after["cpu_s"]) - float(before["cpu_s"])) * 1000.0 / ok


def _revenue_table(joined: dict[str, np.ndarray], answered: np.ndarray) -> dict[str, dict[str, Any]]:
    """``surface -> path -> {inferences, revenue_per_inference, realised_per_inference}``."""
    table: dict[str, dict[str, Any]] = {}
    for surface in sorted(set(joined["surface"][answered].tolist())):
        for path in sorted(set(joined["path"][answered].tolist())):
            rows = answered & (joined["surface"] == surface) & (joined["path"] == path)
            n = int(rows.sum())
            if n:
                table.setdefault(surface, {})[path] = {
                    "inferences": n,
                    "revenue_per_inference": float(np.nansum(joined["expected"][rows])) / n,
                    "realised_per_inference": float(np.nansum(joined["realised"][rows])) / n,
                }
    return table


def _series(joined: dict[str, np.ndarray], duration: float) -> dict[str, list[Any]]:
    """Per second of the run (by intended send time): offered, ok, errors, p50, p99, paths."""
    second = joined["offsets"].astype(np.int64)
    n = max(int(np.ceil(duration)), 1)
    ok = joined["path"] != ""
    series: dict[str, list[Any]] = {
        "offered": [],
        "ok": [],
        "errors": [],
        "p50_ms": [],
        "p99_ms": [],
        "paths": [],
    }
    for s in range(n):
        this = second == s
        lat = joined["latency_ms"][this & ok]
        series["offered"].append(int(this.sum()))
        series["ok"].append(int((this & ok).sum()))
        series["errors"].append(int((this & (joined["error"] != "")).sum()))
        series["p50_ms"].append(float(np.percentile(lat, 50)) if len(lat) else None)
        series["p99_ms"].append(float(np.percentile(lat, 99)) if len(lat) else None)
        series["paths"].append(dict(Counter(joined["path"][this & ok].tolist())))
    return series


def format_report(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    gen = report["generator"]
    cpu = report["server_cpu_ms_per_request"]
    out = report["outcomes"]
    lines = [
        f"offered {report['offered_rps']:.1f} req/s ({report['offered']} requests), "
        f"ok {report['achieved_rps']:.1f} req/s",
        "latency ms (from intended send): " + "  ".join(f"{k} {v:.2f}" for k, v in lat.items()),
        f"errors {report['errors'] or 0}  paths {report['paths']}",
        f"revenue per inference ${report['revenue_per_inference']:.4f} expected "
        f"(${report['realised_revenue_per_inference']:.4f} realised), "
        f"${report['revenue_per_s']:.2f} per second",
        f"outcomes sent {out.get('sent', 0)}, accepted {out.get('accepted', 0)}, "
        f"duplicates {out.get('duplicates', 0)}, failed {out.get('failed', 0)}",
        "server CPU per request: " + ("unknown" if cpu is None else f"{cpu:.3f} ms"),
        f"generator: {gen['processes']} processes, {gen['late_sends']} sends more than 20 ms late "
        f"(max {gen['max_lag_ms']:.1f} ms)"
        + ("" if gen["kept_up"] else "  -- it did NOT keep up with the offered rate"),
    ]
    st = report.get("stability", {})
    if st.get("p99_last_over_first") is not None:
        line = (
            f"stability: p99 {st['p99_first_ms']:.1f} ms in the first {st['window_s']:.0f} s after warm-up,"
            f" {st['p99_last_ms']:.1f} ms in the last (x{st['p99_last_over_first']:.2f})"
        )
        if "rss_growth" in st:
            line += (
                f"; server resident {st['rss_after_warmup'] / 2**20:.0f} -> {st['rss_end'] / 2**20:.0f} MiB"
                f" ({st['rss_growth']:+.1%})"
            )
        lines.append(line)
    return "\n".join(lines)


def plot_run(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles, goodput against offered load, and the path mix, per second."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    series = report["series"]
    t = np.arange(len(series["ok"]))
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
        values = [np.nan if v is None else v for v in series[key]]
        axes[0].plot(t, values, style, label=key.replace("_ms", ""))
    axes[0].set_ylabel("latency ms")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(t, series["offered"], ":", label="offered")
    axes[1].plot(t, series["ok"], "-", label="ok (goodput)")
    axes[1].plot(t, series["errors"], "-", label="errors")
    axes[1].set_ylabel("requests / s")
    axes[1].legend()
    paths = sorted({p for mix in series["paths"] for p in mix})
    bottom = np.zeros(len(t))
    for name in paths:
        share = np.array([mix.get(name, 0) / max(sum(mix.values()), 1) for mix in series["paths"]])
        axes[2].bar(t, share, bottom=bottom, width=1.0, label=name)
        bottom += share
    axes[2].set_ylabel("path share")
    axes[2].set_xlabel("second of the run")
    axes[2].legend()
    cfg = report["config"]
    fig.suptitle(f"{cfg['profile']} {cfg['rps']:.0f} req/s, ok {report['achieved_rps']:.0f} req/s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
