"""`valuerank synth`: build the synthetic world's logs into the artifacts folder.

``<artifacts>/world/<key>/`` holds ``train.npz`` and ``test.npz`` (impressions with clicks;
the test log also keeps the true click probability, for the ground-truth AUC), ``replay.npz``
(requests only: replay scores any ranking counterfactually), ``world.json`` (the config) and
``summary.json`` (written last: its presence marks the folder complete).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlrm.artifact import write_json_atomic
from dlrm.data import Rows
from dlrm.world import Requests, World, WorldConfig


@dataclass
class WorldLogs:
    path: Path
    config: WorldConfig

    @property
    def train(self) -> Rows:
        return Rows.load(self.path / "train.npz")

    @property
    def test(self) -> Rows:
        return Rows.load(self.path / "test.npz")

    @property
    def test_true_p(self) -> np.ndarray:
        with np.load(self.path / "test_truth.npz") as z:
            return np.asarray(z["p"])

    @property
    def replay(self) -> Requests:
        return Requests.load(self.path / "replay.npz")

    @property
    def summary(self) -> dict[str, object]:
        return dict(json.loads((self.path / "summary.json").read_text()))


def world_dir(artifacts: Path, config: WorldConfig) -> Path:
    return artifacts / "world" / config.key()


def ensure_world_logs(
    config: WorldConfig, artifacts: Path, *, world: World | None = None, log: bool = True
) -> WorldLogs:
    """Write the world's logs unless a complete folder for the same config exists."""
    path = world_dir(artifacts, config)
    if (path / "summary.json").is_file():
        if log:
            print(f"synth: reusing {path}", file=sys.stderr)
        return WorldLogs(path, config)
    path.mkdir(parents=True, exist_ok=True)
    world = world or World(config)
    rng = np.random.default_rng(config.seed + 2)
    train, _ = world.impression_log(config.train_rows, rng)
    test, test_p = world.impression_log(config.test_rows, rng)
    replay = world.sample_requests(config.replay_requests, rng)
    train.save(path / "train.npz")
    test.save(path / "test.npz")
    np.savez(path / "test_truth.npz", p=test_p)
    replay.save(path / "replay.npz")
    write_json_atomic(path / "world.json", config.to_dict())
    summary = {
        "world_key": config.key(),
        "train_rows": len(train),
        "test_rows": len(test),
        "replay_requests": len(replay),
        "train_ctr": float(train.labels.mean()),
        "take_rate": {n: float(t) for n, t in zip(world.surface_names, world.take_rate, strict=True)},
    }
    write_json_atomic(path / "summary.json", summary)
    if log:
        print(f"synth: wrote {path}", file=sys.stderr)
    return WorldLogs(path, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank synth", description=__doc__)
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    logs = ensure_world_logs(WorldConfig.load(args.world), args.artifacts)
    summary = {"path": str(logs.path), **logs.summary}
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0
