"""The Admin service on a real server: the bearer token, and model rollout (ReloadModel and the
watched folder) under load without a failed request; a broken artifact is refused and the old
model serves on."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import wait_until

from dlrm.artifact import MANIFEST, WEIGHTS
from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.config import ServeConfig

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SURFACE = "ecommerce_recommendation"
WAIT_S = 60.0


def new_version(source: Path, dest: Path, version: str, bias_shift: float = 1.0) -> Path:
    """A retrained model as the trainer would leave it: ``source``'s weights with the top MLP's
    last bias moved (its scores differ), under a new version."""
    dest.mkdir(parents=True)
    state = torch.load(source / WEIGHTS, weights_only=True)
    last_bias = [name for name in state if name.startswith("over") and name.endswith("bias")][-1]
    state[last_bias] = state[last_bias] + bias_shift
    torch.save(state, dest / WEIGHTS)
    manifest = json.loads((source / MANIFEST).read_text())
    manifest["version"] = version
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def _stubs(target: str) -> tuple[pb_grpc.RecommenderStub, pb_grpc.AdminStub]:
    channel = grpc.insecure_channel(target)
    return pb_grpc.RecommenderStub(channel), pb_grpc.AdminStub(channel)


def _recommend(stub: pb_grpc.RecommenderStub, i: int) -> pb.RecommendResponse:
    request = pb.RecommendRequest(request_id=f"adm-{i}", user_id=i % 50, surface=SURFACE, k=5)
    return stub.Recommend(request, timeout=30)


def _score(stub: pb_grpc.RecommenderStub) -> list[float]:
    request = pb.ScoreRequest(user_id=3, surface=SURFACE, item_ids=[1, 2, 3])
    return list(stub.Score(request, timeout=30).scores)


class Traffic:
    """Recommend calls back to back on a thread until stopped: every answer's model version, and
    every failure."""

    def __init__(self, stub: pb_grpc.RecommenderStub) -> None:
        self.stub = stub
        self.versions: list[str] = []
        self.failures: list[grpc.RpcError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.versions.append(_recommend(self.stub, i).model_version)
            except grpc.RpcError as exc:
                self.failures.append(exc)
            i += 1

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)


def test_admin_calls_need_the_servers_token(serving_assets: Any, start_grpc_server: Any) -> None:
    guarded = start_grpc_server(serving_assets.load(), ServeConfig(port=0, grace_s=1.0, admin_token=TOKEN))
    _, admin = _stubs(guarded.wait_serving().target)
    for metadata in ((), (("authorization", "Bearer wrong-token-0123456789"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as refused:
            admin.ReloadModel(pb.ReloadModelRequest(), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in (refused.value.details() or "")
    open_server = start_grpc_server(serving_assets.load(), ServeConfig(port=0, grace_s=1.0))
    _, admin = _stubs(open_server.wait_serving().target)
    with pytest.raises(grpc.RpcError) as disabled:
        admin.ReloadModel(pb.ReloadModelRequest(), metadata=AUTH, timeout=30)
    assert disabled.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_reload_under_load_fails_no_request_and_answers_with_the_new_version(
    serving_assets: Any, start_grpc_server: Any, tmp_path: Path
) -> None:
    v2 = new_version(serving_assets.model_dir, tmp_path / "v2", "v2-retrained")
    server = start_grpc_server(serving_assets.load(), ServeConfig(port=0, grace_s=1.0, admin_token=TOKEN))
    recommender, admin = _stubs(server.wait_serving().target)
    old_version = _recommend(recommender, 0).model_version
    old_scores = _score(recommender)
    with Traffic(recommender) as traffic:
        wait_until(lambda: len(traffic.versions) >= 20, "traffic before the reload", timeout_s=WAIT_S)
        reply = admin.ReloadModel(pb.ReloadModelRequest(model_dir=str(v2)), metadata=AUTH, timeout=120)
        seen = len(traffic.versions)
        wait_until(lambda: len(traffic.versions) >= seen + 20, "traffic after the reload", timeout_s=WAIT_S)
    assert not traffic.failures
    assert (reply.model_version, reply.previous_version) == ("v2-retrained", old_version)
    # Atomic: once a response carried the new version, none carried the old one again.
    first_new = traffic.versions.index("v2-retrained")
    assert set(traffic.versions[:first_new]) == {old_version}
    assert set(traffic.versions[first_new:]) == {"v2-retrained"}
    assert _score(recommender) != old_scores  # the new weights score
    assert 0 < reply.steady_rss_bytes <= reply.peak_rss_bytes < 1.6 * reply.steady_rss_bytes
    stats = json.loads(recommender.GetRoutingStats(pb.GetRoutingStatsRequest(), timeout=30).json)
    assert stats["segments"], "the tracker's state survives the swap"


def _broken_versions(source: Path, root: Path) -> dict[str, Path]:
    truncated = new_version(source, root / "truncated", "v-truncated")
    (truncated / WEIGHTS).write_bytes((truncated / WEIGHTS).read_bytes()[:100])
    other_schema = new_version(source, root / "other-schema", "v-other")
    manifest = json.loads((other_schema / MANIFEST).read_text())
    manifest["schema"]["name"] = "another-schema"
    (other_schema / MANIFEST).write_text(json.dumps(manifest))
    return {"truncated": truncated, "other schema": other_schema, "missing": root / "missing"}


def test_a_broken_artifact_is_refused_and_the_old_model_serves_on(
    serving_assets: Any, start_grpc_server: Any, tmp_path: Path
) -> None:
    server = start_grpc_server(serving_assets.load(), ServeConfig(port=0, grace_s=1.0, admin_token=TOKEN))
    recommender, admin = _stubs(server.wait_serving().target)
    version = _recommend(recommender, 0).model_version
    for what, folder in _broken_versions(serving_assets.model_dir, tmp_path).items():
        with pytest.raises(grpc.RpcError) as refused:
            admin.ReloadModel(pb.ReloadModelRequest(model_dir=str(folder)), metadata=AUTH, timeout=120)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert "model_dir" in (refused.value.details() or ""), what
        assert _recommend(recommender, 1).model_version == version, what


def test_a_new_version_in_the_watched_folder_is_swapped_in_and_a_broken_one_skipped(
    serving_assets: Any, start_grpc_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("ERROR", logger="serving.edge.server")
    watched = tmp_path / "models"
    watched.mkdir()
    config = ServeConfig(port=0, grace_s=1.0, model_watch_dir=str(watched), model_watch_s=0.1)
    server = start_grpc_server(serving_assets.load(), config)
    recommender, _ = _stubs(server.wait_serving().target)
    with Traffic(recommender) as traffic:
        new_version(serving_assets.model_dir, watched / "v3", "v3-watched")
        wait_until(
            lambda: _recommend(recommender, 2).model_version == "v3-watched",
            "the watched version served",
            timeout_s=WAIT_S,
        )
        broken = _broken_versions(serving_assets.model_dir, tmp_path / "broken")["truncated"]
        shutil.move(broken, watched / "v4")  # newest, but refused: v3 serves on
        refusal = f"watched model {(watched / 'v4').resolve()} refused"
        wait_until(
            lambda: any(refusal in r.getMessage() for r in caplog.records), "the broken version refused"
        )
        seen = len(traffic.versions)
        wait_until(lambda: len(traffic.versions) >= seen + 20, "traffic after the refusal", timeout_s=WAIT_S)
    assert not traffic.failures
    assert traffic.versions[-1] == "v3-watched"
