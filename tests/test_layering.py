"""The import graph points one way: dlrm <- embeddings <- serving <- loadtest, it has no circles,
and only the servicer and the converter touch generated protobuf classes.

The graph has an edge for every import statement (at any depth: inside functions and under
``TYPE_CHECKING`` too) and for every module loaded by name: a string constant that is exactly a
module of ours (``"serving.commands.serve"``, ``"serving.revenue.memory:InMemoryTracker"``), as
the CLI's command table and the backend registries hold them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["dlrm", "embeddings", "serving", "loadtest"]
PROTO_USERS = {"serving/edge/servicer.py", "serving/edge/admin.py", "serving/edge/convert.py"}
"""The servicers (Recommender, Admin) and the converter: the only modules that touch generated code."""
MODULE_NAME = re.compile(r"^(?:" + "|".join(LAYERS) + r")(?:\.\w+)*(?::\w+)?$")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in LAYERS for p in sorted((ROOT / package).rglob("*.py"))}


def imports(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every name ``module`` (whose text is ``source``) imports or loads by name."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, or not
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.match(node.value):
            names.add(node.value.partition(":")[0])
    return names


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules among ``sources`` it depends on (a name resolves to its longest
    prefix that is a module: ``from serving.edge import convert`` -> ``serving.edge.convert``)."""
    edges: dict[str, set[str]] = {}
    for module, text in sources.items():
        targets = set()
        for name in imports(module, text):
            while name and name not in sources:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = targets
    return edges


def _our_graph() -> dict[str, set[str]]:
    return graph({module: path.read_text() for module, path in MODULES.items()})


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_in_functions_type_checking_blocks_and_by_name() -> None:
    sources = {
        "serving.a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from serving.b import X\n",
        "serving.b": "def f():\n    from serving import c\n",
        "serving.c": "BACKENDS = {'x': 'serving.a:Thing'}\n",
        "serving.d": "import serving.c\n",
    }
    edges = graph(sources)
    assert edges == {
        "serving.a": {"serving.b"},
        "serving.b": {"serving.c"},
        "serving.c": {"serving.a"},
        "serving.d": {"serving.c"},
    }
    assert circles(edges) == [["serving.a", "serving.b", "serving.c"]]


def test_no_import_circles() -> None:
    assert circles(_our_graph()) == []


@pytest.mark.parametrize("package", LAYERS)
def test_lower_layers_never_import_higher_ones(package: str) -> None:
    higher = LAYERS[LAYERS.index(package) + 1 :]
    offenders = [
        f"{module} imports {name}"
        for module, targets in _our_graph().items()
        if module.split(".")[0] == package
        for name in targets
        if name.split(".")[0] in higher
    ]
    assert not offenders, offenders


def test_only_servicer_and_converter_import_generated_protobuf() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for module, path in MODULES.items()
        if any(name.startswith("protos") for name in imports(module, path.read_text()))
        and str(path.relative_to(ROOT)) not in PROTO_USERS
    ]
    assert not offenders, offenders


def test_production_code_never_imports_tests() -> None:
    offenders = [
        module
        for module, path in MODULES.items()
        if any(name.split(".")[0] == "tests" for name in imports(module, path.read_text()))
    ]
    assert not offenders, offenders
