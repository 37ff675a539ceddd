"""Training end to end on a tiny world and a small Criteo-format file; artifacts reload and are reused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from dlrm.artifact import load_artifact
from dlrm.criteo import N_DENSE, N_SPARSE, CriteoConfig, Vocabulary, read_criteo
from dlrm.synth import ensure_world_logs
from dlrm.train import (
    CRITEO_TRAIN,
    VOCABULARY_FILE,
    TrainConfig,
    evaluate,
    main,
    predict,
    train_criteo,
    train_world,
)
from dlrm.world import WorldConfig

SAMPLE_NAME = "data/criteo/criteo_kaggle_sample.tsv"
TINY = WorldConfig.load().replace(train_rows=20_000, test_rows=5_000, replay_requests=200)
TINY_TRAIN = TrainConfig(epochs=2, batch_size=512)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def test_tiny_world_trains_exports_and_reloads(artifacts: Path) -> None:
    art = train_world(TINY, artifacts, train_config=TINY_TRAIN, progress=False)
    m = art.metrics
    assert m["source"] == "world" and m["train_rows"] == 20_000 and m["test_rows"] == 5_000
    assert 0.7 < m["test_auc"] <= m["ground_truth_auc"] + 0.01
    assert m["auc_gap"] == pytest.approx(m["ground_truth_auc"] - m["test_auc"])
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["best_epoch"] in (1, 2)

    again = load_artifact(art.path)
    assert again.version == art.version and again.schema == art.schema
    test = ensure_world_logs(TINY, artifacts, log=False).test
    model_a, model_b = again.load_model(), load_artifact(art.path).load_model()
    p_a, p_b = predict(model_a, again.schema, test), predict(model_b, again.schema, test)
    np.testing.assert_array_equal(p_a, p_b)
    # The reloaded weights are the trained ones: the recorded held-out metrics come out exactly.
    assert evaluate(model_a, again.schema, test) == {"auc": m["test_auc"], "logloss": m["test_logloss"]}


def test_a_finished_artifact_is_reused_not_retrained(artifacts: Path) -> None:
    first = train_world(TINY, artifacts, train_config=TINY_TRAIN, progress=False)
    stamp = (first.path / "model.pt").stat().st_mtime_ns
    second = train_world(TINY, artifacts, train_config=TINY_TRAIN, progress=False)
    assert second.path == first.path
    assert second.manifest["created_unix"] == first.manifest["created_unix"]
    assert (second.path / "model.pt").stat().st_mtime_ns == stamp


def test_cli_prints_both_aucs_and_reuses_the_artifact(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world_file = tmp_path / "tiny.json"
    world_file.write_text(json.dumps(TINY.to_dict()))
    argv = [
        "--json",
        "--world",
        str(world_file),
        "--artifacts",
        str(artifacts),
        "--epochs",
        "2",
        "--batch-size",
        "512",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    first = train_world(TINY, artifacts, train_config=TINY_TRAIN, progress=False)
    assert out["artifact"] == str(first.path)  # same configs: the flags map onto TrainConfig
    assert {"test_auc", "ground_truth_auc", "auc_gap", "train_seconds", "history"} <= set(out)
    assert "ground truth" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs"),
        (["--criteo", "/nonexistent/criteo.tsv"], "No such file"),
        (["--criteo", "x.tsv", "--min-count", "-1"], "min_count"),
    ],
)
def test_cli_reports_bad_input_with_exit_code_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--artifacts", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


# -- Criteo ---------------------------------------------------------------------------------


def write_criteo(path: Path, n: int, seed: int = 0) -> None:
    """A Criteo-format file with a planted signal in C1 and I1, a per-row unique C26, and 3 bad lines."""
    rng = np.random.default_rng(seed)
    c1 = rng.integers(0, 30, n)
    i1 = rng.integers(0, 50, n)
    logit = -1.5 + 2.0 * (c1 % 3 == 0) + 0.5 * np.log1p(i1) - 1.0
    labels = rng.random(n) < 1 / (1 + np.exp(-logit))
    lines = []
    for r in range(n):
        dense = [str(i1[r])] + [
            "" if rng.random() < 0.3 else str(rng.integers(0, 100)) for _ in range(N_DENSE - 1)
        ]
        sparse = [f"{c1[r] * 7919:08x}"] + [f"{rng.zipf(1.5) % 200:08x}" for _ in range(N_SPARSE - 2)]
        lines.append("\t".join([str(int(labels[r])), *dense, *sparse, f"{r + 10**6:08x}"]))
    lines[5] = "2" + lines[5][1:]
    lines[9] = lines[9] + "\textra"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")


@pytest.fixture(scope="module")
def criteo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("criteo") / "small.tsv"
    write_criteo(path, 3000)
    return path


def test_criteo_trains_with_a_vocabulary_fitted_on_training_rows_only(
    criteo_file: Path, tmp_path: Path
) -> None:
    config = CriteoConfig(holdout=0.25, min_count=5)
    train_config = dataclasses.replace(CRITEO_TRAIN, seed=3)
    art = train_criteo(criteo_file, tmp_path, criteo=config, train_config=train_config, progress=False)
    m = art.metrics
    assert m["reader"]["rows_ok"] == 2998
    assert m["reader"]["malformed_by_reason"] == {"label": 1, "field_count": 1, "encoding": 1}
    assert m["test_auc"] > 0.68, m  # the planted signal is learnt
    # No leakage: every kept value occurs >= min_count times in the training split itself.
    raw, _ = read_criteo(criteo_file, art.schema, raw_ids=True)
    train_raw, test_raw = raw.split(config.holdout, train_config.seed)
    vocab = Vocabulary.load(art.path / VOCABULARY_FILE, art.schema)
    for j, kept in enumerate(vocab.kept):
        values, counts = np.unique(train_raw.sparse[:, j], return_counts=True)
        frequent = set(values[counts >= config.min_count].tolist())
        assert set(kept.tolist()) <= frequent
    assert len(vocab.kept[25]) == 0  # C26 is unique per row: it all shares the OOV row
    assert m["test_oov_share"] == pytest.approx(vocab.oov_share(test_raw))
    # The exported model scores the encoded held-out rows exactly as reported.
    test_metrics = evaluate(art.load_model(), art.schema, vocab.encode(test_raw))
    assert test_metrics["auc"] == m["test_auc"]


def test_criteo_cli_defaults_and_reuse(
    criteo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--criteo", str(criteo_file), "--json", "--artifacts", str(tmp_path)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    manifest = load_artifact(out["artifact"]).manifest
    assert manifest["train_config"] == {**manifest["train_config"], **vars(CRITEO_TRAIN)}
    assert manifest["model_config"]["top_mlp"] == [64, 32, 1]
    assert out["min_count"] == CriteoConfig().min_count and out["holdout"] == 0.2
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["artifact"] == out["artifact"]
    assert manifest["created_unix"] == load_artifact(out["artifact"]).manifest["created_unix"]


def find_sample() -> Path | None:
    """The shared real-data sample, wherever this checkout keeps ``shared/``."""
    root = Path(__file__).resolve().parents[1]
    for candidate in (root / "shared" / SAMPLE_NAME, root.parent / "shared" / SAMPLE_NAME):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.slow
def test_real_criteo_sample_reaches_the_quality_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = find_sample()
    if sample is None:
        pytest.skip("shared/data/criteo sample not in this checkout")
    assert (
        main(
            [
                "--criteo",
                str(sample),
                "--holdout",
                "0.2",
                "--seed",
                "0",
                "--json",
                "--artifacts",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    # Measured on this sample with --holdout 0.2: seed 0 0.746, seed 1 0.740, seed 2 0.735 (a hashed
    # logistic regression reaches ~0.74); the floor sits below the spread across seeds.
    assert out["test_auc"] >= 0.72
