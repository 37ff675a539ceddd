"""Command-line flags derived from config dataclasses.

Each field becomes ``--field-name``; its help text is the docstring written under the field
(read from the class source, as vLLM's ``EngineArgs`` does), so a flag and its documentation
cannot drift apart. Validation stays in the dataclass (``__post_init__`` raises ValueError).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written directly under each field of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _scalar_type(annotation: Any) -> Any:
    """The argparse type of a field annotation (``int | None`` -> int)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per scalar field of dataclass ``cls`` (tuples and nested configs are skipped)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = _scalar_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if typing.get_origin(kind) is tuple:
            parser.add_argument(
                flag,
                dest=f.name,
                type=_int_tuple,
                default=default,
                help=f"{help_text} (comma-separated; default: {','.join(map(str, default or ()))})",
            )
        elif kind is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        elif kind in (int, float, str):
            choices = None
            if typing.get_origin(hints[f.name]) is typing.Literal:
                choices = list(typing.get_args(hints[f.name]))
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=default,
                choices=choices,
                help=f"{help_text} (default: {default})",
            )


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def from_flags(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from parsed flags; ``overrides`` win over flags."""
    values = {
        f.name: getattr(ns, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if hasattr(ns, f.name) and getattr(ns, f.name) is not None
    }
    values.update(overrides)
    return cls(**values)
