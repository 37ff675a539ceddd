"""`valuerank train`: train the DLRM on the synthetic world or on Criteo TSV, export an artifact.

The model is TorchRec's DLRM (EmbeddingBagCollection fed by KeyedJaggedTensor). The best
epoch is chosen on a validation slice of the training rows (never the held-out rows), and
AUC and logloss are reported on the held-out rows. On the synthetic world the ground-truth
click model's AUC on the same held-out rows is printed beside the model's.

The two sources have their own defaults (``TrainConfig()`` for the world, ``CRITEO_TRAIN`` and
``criteo_model_config`` for the few thousand Criteo rows, where regularisation matters most);
flags given on the command line override either. A finished artifact of the same data and
configs is reused, not retrained.

``--nproc N`` (or starting it under ``torchrun``) trains with TorchRec's planner and
DistributedModelParallel on N CPU processes (``dlrm.distributed``); ``--sharding`` picks
table-wise or row-wise shards. With the default ``--embedding-optimizer`` it trains the same
model as one process, up to float rounding; the artifact is unsharded either way.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dlrm import metrics
from dlrm.artifact import ModelArtifact, config_key, is_complete, load_artifact, save_model
from dlrm.configs import add_flags, from_flags
from dlrm.criteo import CriteoConfig, Vocabulary, hash_ids, read_criteo
from dlrm.data import Rows, dense_input, single_hot_kjt
from dlrm.distributed import ShardConfig, fit_sharded, follow, leading, shard_config, torchrun_env
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import FeatureSchema, load_schema
from dlrm.synth import ensure_world_logs
from dlrm.train_config import CRITEO_TRAIN, TrainConfig
from dlrm.world import WorldConfig

VOCABULARY_FILE = "vocab.npz"
"""Criteo artifacts keep their vocabulary beside the weights: raw ids -> table rows."""


def criteo_model_config(schema: FeatureSchema) -> ModelConfig:
    """A small over arch: with ~6k training rows a wider one only memorises."""
    return ModelConfig(bottom_mlp=(64, schema.embedding_dim), top_mlp=(64, 32, 1))


def _finished(path: Path, progress: bool) -> ModelArtifact | None:
    """The artifact already trained for this config key, if any (stages skip finished work)."""
    if not is_complete(path):
        return None
    if progress:
        print(f"train: reusing {path}", file=sys.stderr)
    return load_artifact(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank train", description=__doc__)
    parser.add_argument("--world", type=Path, default=None, help="world config file (default: bundled)")
    parser.add_argument("--criteo", type=Path, default=None, help="train on this Criteo TSV instead")
    parser.add_argument("--schema", default=None, help="schema file or bundled name (Criteo)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_flags(parser, TrainConfig)
    add_flags(parser, ModelConfig)
    add_flags(parser, CriteoConfig)
    add_flags(parser, ShardConfig)
    args = parser.parse_args(argv)
    progress = not args.json or sys.stderr.isatty()
    try:
        shard = shard_config(args.nproc, args.sharding, args.embedding_optimizer)
    except ValueError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    torchrun = torchrun_env() if shard is not None else None
    if torchrun is not None and torchrun[0] > 0:
        return follow()  # torchrun's other ranks train what rank 0 sends them, print nothing
    # Under torchrun, rank 0 leads the group for the whole command (its followers are released
    # even when an artifact is reused); otherwise each training opens and closes its own group.
    with leading(torchrun[1]) if torchrun is not None else contextlib.nullcontext():
        try:
            if args.criteo is not None:
                schema = load_schema(args.schema or "criteo")
                art = train_criteo(
                    args.criteo,
                    args.artifacts,
                    criteo=from_flags(CriteoConfig, args),
                    schema=schema,
                    model_config=_override(criteo_model_config(schema), args),
                    train_config=_override(CRITEO_TRAIN, args),
                    progress=progress,
                    shard=shard,
                )
            else:
                art = train_world(
                    WorldConfig.load(args.world),
                    args.artifacts,
                    _override(ModelConfig(), args),
                    _override(TrainConfig(), args),
                    progress=progress,
                    shard=shard,
                )
        except (ValueError, FileNotFoundError) as exc:
            print(f"train: error: {exc}", file=sys.stderr)
            return 2
    out = {"model_version": art.version, "artifact": str(art.path), **art.metrics}
    if "ground_truth_auc" in out:
        print(
            f"train: test AUC {out['test_auc']:.4f}, ground truth {out['ground_truth_auc']:.4f} "
            f"(gap {out['auc_gap']:.4f}) on the same {out['test_rows']} held-out rows",
            file=sys.stderr,
        )
    if not args.json:
        out.pop("history", None)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def _override(base: Any, args: argparse.Namespace) -> Any:
    """``base`` with the fields whose flags were given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


# -- the two sources ----------------------------------------------------------------------


def train_world(
    world_config: WorldConfig,
    artifacts: Path,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
    shard: ShardConfig | None = None,
) -> ModelArtifact:
    """Train on the world's logs (reusing a finished artifact of the same config).

    ``shard`` trains sharded across ``shard.nproc`` ranks (``dlrm.distributed``) instead of ``fit``.
    """
    model_config = model_config or ModelConfig()
    logs = ensure_world_logs(world_config, artifacts, log=progress)
    schema = load_schema(world_config.schema)
    key = config_key(
        "world",
        world_config.key(),
        schema.to_dict(),
        asdict(model_config),
        asdict(train_config),
        *_shard_key(shard),
    )
    path = artifacts / "model" / key
    if (done := _finished(path, progress)) is not None:
        return done
    started = time.perf_counter()
    model, record = _fit_on(shard, schema, model_config, train_config, logs.train, progress)
    train_seconds = time.perf_counter() - started
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
        "train_seconds": train_seconds,
        **record,
    }
    result["auc_gap"] = result["ground_truth_auc"] - result["test_auc"]
    return _export(path, key, schema, model, model_config, train_config, result, world_config.key())


def train_criteo(
    tsv: Path,
    artifacts: Path,
    *,
    criteo: CriteoConfig | None = None,
    schema: FeatureSchema | None = None,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig = CRITEO_TRAIN,
    progress: bool = True,
    shard: ShardConfig | None = None,
) -> ModelArtifact:
    """Train on a Criteo TSV file with a random held-out split (seeded by the train seed).

    The vocabulary is fitted on the training split only and saved in the artifact.
    """
    criteo = criteo or CriteoConfig()
    schema = schema or load_schema("criteo")
    model_config = model_config or criteo_model_config(schema)
    stat = Path(tsv).stat()  # the file's identity: an edited file is a new artifact
    key = config_key(
        "criteo",
        str(Path(tsv).resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        asdict(criteo),
        schema.to_dict(),
        asdict(model_config),
        asdict(train_config),
        *_shard_key(shard),
    )
    path = artifacts / "model" / key
    if (done := _finished(path, progress)) is not None:
        return done
    raw, report = read_criteo(tsv, schema, raw_ids=True)
    if report.rows_malformed and progress:
        print(f"criteo: skipped {report.rows_malformed} malformed rows: {report.examples}", file=sys.stderr)
    train_raw, test_raw = raw.split(criteo.holdout, train_config.seed)
    vocab = Vocabulary.fit(train_raw, schema, criteo.min_count) if criteo.min_count > 0 else None
    train, test = (
        (vocab.encode(train_raw), vocab.encode(test_raw))
        if vocab is not None
        else (hash_ids(train_raw, schema), hash_ids(test_raw, schema))
    )
    started = time.perf_counter()
    model, record = _fit_on(shard, schema, model_config, train_config, train, progress)
    train_seconds = time.perf_counter() - started
    test_metrics = evaluate(model, schema, test)
    result = {
        "source": "criteo",
        "file": str(tsv),
        "reader": report.to_dict(),
        "holdout": criteo.holdout,
        "min_count": criteo.min_count,
        "train_rows": len(train),
        "test_rows": len(test),
        "test_auc": test_metrics["auc"],
        "test_logloss": test_metrics["logloss"],
        "test_ctr": float(test.labels.mean()),
        "train_seconds": train_seconds,
        **record,
    }
    if vocab is not None:
        result["vocabulary_rows"] = int(sum(len(k) for k in vocab.kept))
        result["test_oov_share"] = vocab.oov_share(test_raw)
        path.mkdir(parents=True, exist_ok=True)
        vocab.save(path / VOCABULARY_FILE)  # before the manifest, which marks the folder complete
    return _export(path, key, schema, model, model_config, train_config, result, None)


# -- training -----------------------------------------------------------------------------


def _fit_on(
    shard: ShardConfig | None,
    schema: FeatureSchema,
    model_config: ModelConfig,
    config: TrainConfig,
    train: Rows,
    progress: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    if shard is None:
        return fit(schema, model_config, config, train, progress=progress)
    return fit_sharded(schema, model_config, config, train, shard, evaluate=evaluate, progress=progress)


def _shard_key(shard: ShardConfig | None) -> list[dict[str, Any]]:
    # Unsharded artifacts keep the keys they had before sharding existed.
    return [] if shard is None else [asdict(shard)]


def fit(
    schema: FeatureSchema,
    model_config: ModelConfig,
    config: TrainConfig,
    train: Rows,
    *,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a DLRM; returns the best model (on validation) and a training record."""
    with _torch_threads(config.threads):
        return _fit(schema, model_config, config, train, progress)


def _fit(
    schema: FeatureSchema, model_config: ModelConfig, config: TrainConfig, train: Rows, progress: bool
) -> tuple[torch.nn.Module, dict[str, Any]]:
    fit_rows, val_rows = (
        train.split(config.validation, config.seed) if config.validation > 0 else (train, None)
    )
    model = build_dlrm(schema, model_config, seed=config.seed)
    emb_params = list(model.sparse_arch.parameters())
    emb_ids = {id(p) for p in emb_params}
    if config.embedding_init_std > 0:
        with torch.no_grad():  # torch's RNG was seeded by build_dlrm: still deterministic
            for p in emb_params:
                p.normal_(0.0, config.embedding_init_std)
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
            disable=not progress or not sys.stderr.isatty(),  # logs get the per-epoch line
            file=sys.stderr,
            leave=False,
        )
        total = 0.0
        for dense, sparse, labels in bar:
            logits = model(dense_input(dense), single_hot_kjt(schema.sparse_names, sparse))
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
    if best is None:  # unreachable: epochs >= 1 is validated
        raise ValueError("no epoch was trained")
    model.load_state_dict(best[2])
    model.eval()
    return model, {"best_epoch": best[1], "history": history}


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # torch's thread count is process-wide: restore it for whoever runs next in this process.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predict(model: torch.nn.Module, schema: FeatureSchema, rows: Rows, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities for ``rows``."""
    model.eval()
    out = []
    with torch.inference_mode():
        for dense, sparse, _ in _batches(rows, batch_size, np.arange(len(rows))):
            logits = model(dense_input(dense), single_hot_kjt(schema.sparse_names, sparse))
            out.append(torch.sigmoid(logits.squeeze(1)).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def evaluate(model: torch.nn.Module, schema: FeatureSchema, rows: Rows) -> dict[str, float]:
    p = predict(model, schema, rows)
    return {"auc": metrics.auc(rows.labels, p), "logloss": metrics.logloss(rows.labels, p)}


def _batches(rows: Rows, batch_size: int, order: np.ndarray) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield (
            torch.from_numpy(rows.dense[idx]),
            torch.from_numpy(rows.sparse[idx]),
            torch.from_numpy(rows.labels[idx]),
        )


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
