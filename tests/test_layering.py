"""The import graph points one way: dlrm <- embeddings <- serving <- loadtest, and only the
servicer and the converter touch generated protobuf classes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["dlrm", "embeddings", "serving", "loadtest"]
PROTO_USERS = {"serving/edge/servicer.py", "serving/edge/convert.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", LAYERS)
def test_lower_layers_never_import_higher_ones(package: str) -> None:
    higher = LAYERS[LAYERS.index(package) + 1 :]
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules(package)
        for name in _imports(path)
        if name.split(".")[0] in higher
    ]
    assert not offenders, offenders


def test_only_servicer_and_converter_import_generated_protobuf() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for package in LAYERS
        for path in _modules(package)
        if any(name.startswith("protos") for name in _imports(path))
        and str(path.relative_to(ROOT)) not in PROTO_USERS
    ]
    assert not offenders, offenders


def test_production_code_never_imports_tests() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for package in LAYERS
        for path in _modules(package)
        if any(name.split(".")[0] == "tests" for name in _imports(path))
    ]
    assert not offenders, offenders
