"""The revenue-vs-compute PNG of a replay: one curve per budgeted policy, points for the rest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # after the backend is chosen

CURVES = (
    ("oracle", "tab:gray", "--"),
    ("oracle_segment", "tab:purple", "-."),
    ("value_aware", "tab:blue", "-"),
    ("depth_table", "tab:brown", ":"),
    ("fixed_depth", "tab:olive", ":"),
    ("value_aware_binary", "tab:cyan", "-"),
    ("static_tiers", "tab:orange", ":"),
)
POINTS = (
    ("always_full", "tab:red", "s"),
    ("always_cheap", "tab:green", "v"),
    ("static_tiers", "tab:orange", "D"),
)


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Revenue (share of always-full's) against compute (share of always-full's)."""
    policies = result["policies"]
    full = policies["always_full"]["revenue"] or 1.0
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    for prefix, color, style in CURVES:
        pts = sorted(
            (p["compute_share"], p["revenue"] / full)
            for name, p in policies.items()
            if re.fullmatch(rf"{prefix}@[0-9.]+", name)
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, style, marker="o", color=color, label=f"{prefix} (by budget)")
    for name, color, marker in POINTS:
        if name in policies:
            p = policies[name]
            ax.scatter(
                [p["compute_share"]], [p["revenue"] / full], color=color, marker=marker, s=60, label=name
            )
    ax.set_xlabel("compute (share of always_full's CPU ms)")
    ax.set_ylabel("revenue (share of always_full's)")
    ax.set_title(f"Routing policies on {result.get('requests', '?')} replayed requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
