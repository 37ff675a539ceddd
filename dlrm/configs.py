"""Config dataclasses from the command line and from config files.

Flags:
Each field becomes ``--field-name``; its help text is the docstring written under the field
(read from the class source, as vLLM's ``EngineArgs`` does), so a flag and its documentation
cannot drift apart. Validation stays in the dataclass (``__post_init__`` raises ValueError).

Layers: ``valuerank serve`` takes every setting from a config file (``config_from_tree``), then
environment variables (``VALUERANK_<FLAG>``: ``apply_env``), then flags, each overriding the one
before: flags default to None (not given), so only what a layer sets moves a field.

Files: ``config_from_dict`` is the one typed-config parser (unknown keys are an error, naming
them), and ``Registry`` the one lazy backend registry (Feast's pattern): a config's ``type``
picks a backend whose class is imported only when it is built, so a server on the embedded
defaults never imports redis.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
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


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def add_flags(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), _path: tuple[str, ...] = ()
) -> None:
    """Add one flag per scalar or tuple field of dataclass ``cls``, and of the config dataclasses
    nested in it, flattened: ``ServeConfig.router.value_aware.epsilon`` is ``--epsilon``. A name
    that an earlier flag took is prefixed with its parents (``--static-tiers-min-full-deadline-ms``).
    Fields named in ``skip``, at any depth, get no flag; unions of configs are left to the caller."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        path = (*_path, f.name)
        if _is_config(hints[f.name]):
            add_flags(parser, hints[f.name], skip=skip, _path=path)
            continue
        if any(_is_config(arg) for arg in typing.get_args(hints[f.name])):
            continue  # one of several configs (a backend's): the caller reads it from a file
        kind = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        # The flag's own default is None ("not given"): a config file or the environment may
        # have set the field; the help text shows the dataclass default.
        help_text = docs.get(f.name, "")
        options: dict[str, Any]
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0] if typing.get_args(kind) else str
            options = dict(
                type=_int_tuple if item is int else _str_tuple,
                help=f"{help_text} (comma-separated; default: {','.join(map(str, default or ()))})",
            )
        elif kind is bool:
            options = dict(action=argparse.BooleanOptionalAction, help=f"{help_text} (default: {default})")
        elif kind in (int, float, str):
            choices = None
            if typing.get_origin(hints[f.name]) is typing.Literal:
                choices = list(typing.get_args(hints[f.name]))
            options = dict(type=kind, choices=choices, help=f"{help_text} (default: {default})")
        else:
            continue
        dest = ".".join(path)
        if "action" not in options:
            options["metavar"] = f.name.upper()
        try:
            action = parser.add_argument("--" + f.name.replace("_", "-"), dest=dest, default=None, **options)
        except argparse.ArgumentError:  # the name is taken: say whose field this one is
            action = parser.add_argument(
                "--" + "-".join(path).replace("_", "-"), dest=dest, default=None, **options
            )
        parser.__dict__.setdefault("_config_actions", []).append(action)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _str_tuple(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def from_flags(
    cls: type[T], ns: argparse.Namespace, _path: tuple[str, ...] = (), *, base: Any = None, **overrides: Any
) -> T:
    """Build ``cls`` from flags parsed after ``add_flags(parser, cls)``: each flag given (not None)
    sets its field of ``base`` (a config from a file; default: the dataclass defaults);
    ``overrides`` (top-level fields) win over flags."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides or not f.init:
            continue
        path = (*_path, f.name)
        if _is_config(hints[f.name]):
            values[f.name] = from_flags(hints[f.name], ns, path, base=getattr(base, f.name, None))
            continue
        value = getattr(ns, ".".join(path), None)
        if value is not None:
            values[f.name] = value
    values.update(overrides)
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def config_from_dict(cls: type[T], raw: Mapping[str, Any], what: str) -> T:
    """``cls(**raw)``, with a ValueError naming any key that is not a field of ``cls``."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what}: expected an object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(known)}")
    return cls(**raw)


class Registry:
    """Backend name -> its config class and its ``"module:Class"``, imported only when built."""

    def __init__(
        self, what: str, backends: Mapping[str, tuple[type, str]], default: str | None = None
    ) -> None:
        self.what = what
        self.configs = {name: config for name, (config, _) in backends.items()}
        self.targets = {name: target for name, (_, target) in backends.items()}
        self.default = default

    def config_from_dict(self, raw: Mapping[str, Any]) -> Any:
        """The config ``raw`` describes (a parsed config file); its ``type`` picks the backend."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{self.what} config: expected an object, got {type(raw).__name__}")
        kind = raw.get("type", self.default)
        if kind not in self.configs:
            raise ValueError(f"{self.what} type {kind!r} must be one of {sorted(self.configs)}")
        return config_from_dict(self.configs[kind], raw, f"{kind} {self.what}")

    def backend_class(self, kind: str) -> type:
        """The class registered under ``kind`` (its module is imported now)."""
        if kind not in self.targets:
            raise ValueError(f"unknown {self.what} type {kind!r}; known: {sorted(self.targets)}")
        module, _, name = self.targets[kind].partition(":")
        cls: type = getattr(importlib.import_module(module), name)
        return cls


# -- layers: a config file, then environment variables, then flags ----------------------------------

ENV_PREFIX = "VALUERANK_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_name(option: str, prefix: str = ENV_PREFIX) -> str:
    """The environment variable of a flag: ``--budget-share`` -> ``VALUERANK_BUDGET_SHARE``."""
    return prefix + option.lstrip("-").replace("-", "_").upper()


def apply_env(
    parser: argparse.ArgumentParser,
    ns: argparse.Namespace,
    environ: Mapping[str, str],
    prefix: str = ENV_PREFIX,
) -> list[str]:
    """Fill each config flag (``add_flags``) not given on the command line from its environment
    variable (``env_name``), parsed as the flag would be. Returns the variables used; a bad value
    raises ValueError naming the variable."""
    used = []
    for action in getattr(parser, "_config_actions", ()):
        name = env_name(action.option_strings[0], prefix)
        if getattr(ns, action.dest, None) is not None or name not in environ:
            continue
        text = environ[name]
        try:
            value: Any
            if isinstance(action, argparse.BooleanOptionalAction):
                word = text.strip().lower()
                if word not in _TRUE | _FALSE:
                    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
                value = word in _TRUE
            else:
                value = action.type(text) if callable(action.type) else text
                if action.choices is not None and value not in action.choices:
                    raise ValueError(f"must be one of {list(action.choices)}")
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"environment variable {name}={text!r}: {exc}") from exc
        setattr(ns, action.dest, value)
        used.append(name)
    return used


def config_from_tree(
    cls: type[T],
    raw: Mapping[str, Any],
    what: str,
    backends: Mapping[str, Callable[[Any], Any]] | None = None,
) -> T:
    """A nested config from a parsed config file: each nested config from its sub-object (unknown
    keys are an error, naming the section), lists as tuples, and each field of ``backends``
    (one of several configs, e.g. the tracker's) built by its function from its sub-object."""
    backends = backends or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what}: expected an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        hint = hints.get(key)
        if key in backends:
            values[key] = None if value is None else backends[key](value)
        elif hint is not None and _is_config(hint):
            values[key] = config_from_tree(hint, value, f"{what}.{key}", backends)
        else:
            values[key] = tuple(value) if isinstance(value, list) else value
    return config_from_dict(cls, values, what)


def config_to_tree(config: Any, secret: Callable[[str], bool] = lambda name: False) -> Any:
    """A config as plain JSON-ready values (tuples as lists); fields ``secret`` names read ``***``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            f.name: "***"
            if secret(f.name) and getattr(config, f.name)
            else config_to_tree(getattr(config, f.name), secret)
            for f in dataclasses.fields(config)
        }
    if isinstance(config, tuple | list):
        return [config_to_tree(v, secret) for v in config]
    return config
