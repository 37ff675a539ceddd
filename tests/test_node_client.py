"""examples/node against a real server: installed from the npm registry by the test when node and
npm are present, skipped with the reason when they are not."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"


@pytest.fixture(scope="module")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the Node example is not run")
    folder = tmp_path_factory.mktemp("node")
    for name in ("package.json", "client.js"):
        shutil.copy(EXAMPLE / name, folder / name)
    install = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0:
        pytest.fail(f"npm install failed (the registry must be reachable):\n{install.stderr[-2000:]}")
    return folder


def test_the_node_client_recommends_scores_and_reports(node_client: Path, grpc_server: str) -> None:
    run = subprocess.run(
        ["node", str(node_client / "client.js"), grpc_server, str(EXAMPLE.parents[1])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    items = answer["recommended"]["items"]
    assert len(items) == 5 and [item["rank"] for item in items] == [0, 1, 2, 3, 4]
    assert answer["recommended"]["model_version"]
    assert len(answer["scored"]["scores"]) == 5
    assert answer["reported"]["accepted"] == 2 and answer["reported"]["unknown_requests"] == 0
    assert answer["invalid"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answer["invalid"]["details"].startswith("k:")
