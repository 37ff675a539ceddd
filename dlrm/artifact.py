"""Versioned model artifacts: weights, schema, configs and metrics in one folder.

Layout of ``<artifacts>/model/<key>/``::

    manifest.json   version, schema, model and train config, metrics, data key
    model.pt        the DLRM's state_dict (fp32, unsharded: it serves the same whatever the
                    number of training shards)

A folder is complete only once ``manifest.json`` exists; it is written last and atomically,
so a crashed run never leaves a half artifact that a later run would reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchrec.models.dlrm import DLRM

from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import FeatureSchema

MANIFEST = "manifest.json"
WEIGHTS = "model.pt"


def config_key(*parts: Any) -> str:
    """Stable short hash of JSON-able parts: equal configs reuse the same artifact folder."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class ModelArtifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def schema(self) -> FeatureSchema:
        return FeatureSchema.from_dict(self.manifest["schema"])

    @property
    def model_config(self) -> ModelConfig:
        raw = self.manifest["model_config"]
        return ModelConfig(tuple(raw["bottom_mlp"]), tuple(raw["top_mlp"]))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics", {}))

    def load_model(self) -> DLRM:
        model = build_dlrm(self.schema, self.model_config)
        state = torch.load(self.path / WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        return model


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / WEIGHTS).is_file()


def save_model(path: Path, model: torch.nn.Module, manifest: dict[str, Any]) -> ModelArtifact:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path / WEIGHTS)
    write_json_atomic(path / MANIFEST, manifest)
    return ModelArtifact(path, manifest)


def load_artifact(path: str | Path) -> ModelArtifact:
    p = Path(path)
    if not is_complete(p):
        raise FileNotFoundError(f"no complete model artifact in {p}")
    return ModelArtifact(p, json.loads((p / MANIFEST).read_text()))
