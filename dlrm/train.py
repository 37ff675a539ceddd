"""`valuerank train`: train the DLRM on the synthetic world or on Criteo TSV, export an artifact.

The model is TorchRec's DLRM (EmbeddingBagCollection fed by KeyedJaggedTensor). The best
epoch is chosen on a validation slice of the training rows (never the held-out rows), and
AUC and logloss are reported on the held-out rows. On the synthetic world the ground-truth
click model's AUC on the same held-out rows is printed beside the model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dlrm import metrics
from dlrm.artifact import ModelArtifact, config_key, is_complete, load_artifact, save_model
from dlrm.configs import add_flags, from_flags
from dlrm.data import Rows, single_hot_kjt
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import FeatureSchema, load_schema
from dlrm.synth import ensure_world_logs
from dlrm.world import WorldConfig


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    """Passes over the training rows (the best one on validation is kept)."""
    batch_size: int = 1024
    """Rows per optimiser step."""
    lr: float = 3e-3
    """Adam learning rate for the MLPs."""
    embedding_lr: float = 3e-2
    """Adagrad learning rate for the embedding tables."""
    weight_decay: float = 0.0
    """L2 penalty on the MLP weights."""
    embedding_weight_decay: float = 0.0
    """L2 penalty on the embedding rows (Adagrad weight decay): shrinks rarely seen ids."""
    validation: float = 0.1
    """Fraction of the training rows held back to choose the best epoch."""
    seed: int = 0
    """Seed of initialisation, shuffling and splits."""
    threads: int = 2
    """torch intra-op threads."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"{self.epochs=} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"{self.batch_size=} must be >= 1")
        if self.lr <= 0 or self.embedding_lr <= 0:
            raise ValueError(f"{self.lr=} and {self.embedding_lr=} must be > 0")
        if not 0.0 <= self.validation < 1.0:
            raise ValueError(f"{self.validation=} must be in [0, 1)")
        if self.threads < 1:
            raise ValueError(f"{self.threads=} must be >= 1")


def _batches(rows: Rows, batch_size: int, order: np.ndarray) -> Any:
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield (
            torch.from_numpy(rows.dense[idx]),
            torch.from_numpy(rows.sparse[idx]),
            torch.from_numpy(rows.labels[idx]),
        )


def _dense_input(dense: torch.Tensor) -> torch.Tensor:
    # A schema without dense features still feeds the bottom MLP one zero column.
    return dense if dense.shape[1] else torch.zeros(dense.shape[0], 1)


def predict(model: torch.nn.Module, schema: FeatureSchema, rows: Rows, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities for ``rows``."""
    model.eval()
    out = []
    with torch.inference_mode():
        for dense, sparse, _ in _batches(rows, batch_size, np.arange(len(rows))):
            logits = model(_dense_input(dense), single_hot_kjt(schema.sparse_names, sparse))
            out.append(torch.sigmoid(logits.squeeze(1)).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def evaluate(model: torch.nn.Module, schema: FeatureSchema, rows: Rows) -> dict[str, float]:
    p = predict(model, schema, rows)
    return {"auc": metrics.auc(rows.labels, p), "logloss": metrics.logloss(rows.labels, p)}


def fit(
    schema: FeatureSchema,
    model_config: ModelConfig,
    config: TrainConfig,
    train: Rows,
    *,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a DLRM; returns the best model (on validation) and a training record."""
    torch.set_num_threads(config.threads)
    fit_rows, val_rows = (
        train.split(config.validation, config.seed) if config.validation > 0 else (train, None)
    )
    model = build_dlrm(schema, model_config, seed=config.seed)
    emb_params = list(model.sparse_arch.parameters())
    emb_ids = {id(p) for p in emb_params}
    dense_params = [p for p in model.parameters() if id(p) not in emb_ids]
    # Adagrad is the standard optimiser for embedding rows (each row sees few updates);
    # Adam for the MLPs.
    optimisers = [
        torch.optim.Adagrad(emb_params, lr=config.embedding_lr, weight_decay=config.embedding_weight_decay),
        torch.optim.Adam(dense_params, lr=config.lr, weight_decay=config.weight_decay),
    ]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(config.seed)
    best: tuple[float, int, dict[str, Any]] | None = None
    history = []
    for epoch in range(config.epochs):
        model.train()
        order = rng.permutation(len(fit_rows))
        steps = (len(order) + config.batch_size - 1) // config.batch_size
        bar = tqdm(
            _batches(fit_rows, config.batch_size, order),
            total=steps,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            file=sys.stderr,
            leave=False,
        )
        total = 0.0
        for dense, sparse, labels in bar:
            logits = model(_dense_input(dense), single_hot_kjt(schema.sparse_names, sparse))
            loss = loss_fn(logits.squeeze(1), labels)
            for opt in optimisers:
                opt.zero_grad()
            loss.backward()
            for opt in optimisers:
                opt.step()
            total += loss.item() * len(labels)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        record: dict[str, Any] = {"epoch": epoch + 1, "train_logloss": total / len(order)}
        if val_rows is not None:
            val = evaluate(model, schema, val_rows)
            record.update(val_auc=val["auc"], val_logloss=val["logloss"])
            score = val["logloss"]
        else:
            score = -float(epoch)
        history.append(record)
        if progress:
            print(f"train: {json.dumps(record)}", file=sys.stderr)
        if best is None or score < best[0]:
            best = (score, epoch + 1, copy.deepcopy(model.state_dict()))
    assert best is not None  # epochs >= 1 is validated
    model.load_state_dict(best[2])
    model.eval()
    return model, {"best_epoch": best[1], "history": history}


def train_world(
    world_config: WorldConfig,
    artifacts: Path,
    model_config: ModelConfig = ModelConfig(),
    train_config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
) -> ModelArtifact:
    """Train on the world's logs (reusing a finished artifact of the same config)."""
    logs = ensure_world_logs(world_config, artifacts, log=progress)
    schema = load_schema(world_config.schema)
    key = config_key(
        "world", world_config.key(), schema.to_dict(), asdict(model_config), asdict(train_config)
    )
    path = artifacts / "model" / key
    if is_complete(path):
        if progress:
            print(f"train: reusing {path}", file=sys.stderr)
        return load_artifact(path)
    started = time.perf_counter()
    model, record = fit(schema, model_config, train_config, logs.train, progress=progress)
    test = logs.test
    test_metrics = evaluate(model, schema, test)
    truth_p = logs.test_true_p
    result = {
        "source": "world",
        "train_rows": len(logs.train),
        "test_rows": len(test),
        "test_auc": test_metrics["auc"],
        "test_logloss": test_metrics["logloss"],
        "ground_truth_auc": metrics.auc(test.labels, truth_p),
        "ground_truth_logloss": metrics.logloss(test.labels, truth_p),
        "train_seconds": time.perf_counter() - started,
        **record,
    }
    result["auc_gap"] = result["ground_truth_auc"] - result["test_auc"]
    return _export(path, key, schema, model, model_config, train_config, result, world_config.key())


def train_criteo(
    tsv: Path,
    artifacts: Path,
    *,
    holdout: float = 0.2,
    schema: FeatureSchema | None = None,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> ModelArtifact:
    """Train on a Criteo TSV file with a random ``holdout`` split (seeded by the train seed)."""
    from dlrm.criteo import read_criteo  # only this mode needs the reader

    schema = schema or load_schema("criteo")
    model_config = model_config or ModelConfig(bottom_mlp=(64, schema.embedding_dim))
    rows, report = read_criteo(tsv, schema)
    if report.rows_malformed and progress:
        print(f"criteo: skipped {report.rows_malformed} malformed rows: {report.examples}", file=sys.stderr)
    train, test = rows.split(holdout, train_config.seed)
    started = time.perf_counter()
    model, record = fit(schema, model_config, train_config, train, progress=progress)
    test_metrics = evaluate(model, schema, test)
    result = {
        "source": "criteo",
        "file": str(tsv),
        "reader": report.to_dict(),
        "holdout": holdout,
        "train_rows": len(train),
        "test_rows": len(test),
        "test_auc": test_metrics["auc"],
        "test_logloss": test_metrics["logloss"],
        "test_ctr": float(test.labels.mean()),
        "train_seconds": time.perf_counter() - started,
        **record,
    }
    key = config_key(
        "criteo",
        str(Path(tsv).resolve()),
        holdout,
        schema.to_dict(),
        asdict(model_config),
        asdict(train_config),
    )
    return _export(artifacts / "model" / key, key, schema, model, model_config, train_config, result, None)


def _export(
    path: Path,
    key: str,
    schema: FeatureSchema,
    model: torch.nn.Module,
    model_config: ModelConfig,
    train_config: TrainConfig,
    result: dict[str, Any],
    world_key: str | None,
) -> ModelArtifact:
    manifest = {
        "version": f"{schema.name}-{key}",
        "schema": schema.to_dict(),
        "model_config": asdict(model_config),
        "train_config": asdict(train_config),
        "world_key": world_key,
        "metrics": result,
        "created_unix": time.time(),
        "torch": torch.__version__,
    }
    return save_model(path, model, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank train", description=__doc__)
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--criteo", type=Path, default=None, help="train on this Criteo TSV instead")
    parser.add_argument("--holdout", type=float, default=0.2, help="held-out fraction (Criteo)")
    parser.add_argument("--schema", default=None, help="schema file or bundled name (Criteo)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_flags(parser, TrainConfig)
    add_flags(parser, ModelConfig)
    args = parser.parse_args(argv)
    try:
        train_config = from_flags(TrainConfig, args)
        progress = not args.json or sys.stderr.isatty()
        if args.criteo is not None:
            schema = load_schema(args.schema or "criteo")
            model_config = from_flags(
                ModelConfig,
                args,
                **(
                    {}
                    if args.bottom_mlp != ModelConfig.bottom_mlp
                    else {"bottom_mlp": (64, schema.embedding_dim)}
                ),
            )
            art = train_criteo(
                args.criteo,
                args.artifacts,
                holdout=args.holdout,
                schema=schema,
                model_config=model_config,
                train_config=train_config,
                progress=progress,
            )
        else:
            art = train_world(
                WorldConfig.load(args.world),
                args.artifacts,
                from_flags(ModelConfig, args),
                train_config,
                progress=progress,
            )
    except (ValueError, FileNotFoundError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    out = {"model_version": art.version, "artifact": str(art.path), **art.metrics}
    out.pop("history", None) if not args.json else None
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
