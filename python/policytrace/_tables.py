"""Configuration tables: frozen dataclasses that carry each field's default, type and docstring
in one place, check types and choices on construction, and read themselves from TOML tables.

A table is declared once, beside the code that consumes it::

    @table("update")
    class UpdateCfg:
        lr: float = 1e-4
        \"\"\"Learning rate of the per-pair step.\"\"\"

``@table`` makes the class a frozen dataclass, records its TOML name, and checks every field
against its annotation (``bool``, ``int``, ``float``, ``str``, ``tuple[str, ...]``, ``Literal``
choices and unions of these) when an instance is built, raising :class:`ConfigError` that names
``table.key``. Field docstrings (the string literal after each field, as in Bergson and
sae-lens configs) are read from the source by :func:`field_docs`; the README's configuration
table is generated from them (``python -m policytrace.pipeline.config --markdown``).
Kept free of torch so configs load without the model extra.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Callable, Literal, Union, get_args, get_origin

from .errors import ConfigError

_DOCS: dict[type, dict[str, str]] = {}


def table(name: str) -> Callable[[type], type]:
    """Decorator: a frozen, type-checked configuration table called ``name`` in TOML."""

    def wrap(cls: type) -> type:
        cls.TABLE = name  # type: ignore[attr-defined]
        user_post = cls.__dict__.get("__post_init__")

        def __post_init__(self) -> None:
            check_types(self)
            if user_post is not None:
                user_post(self)

        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
        return dataclasses.dataclass(frozen=True)(cls)

    return wrap


def output_neutral(cls: type) -> frozenset[str]:
    """Fields a table marks as not changing a run's outputs (``OUTPUT_NEUTRAL``, a ClassVar):
    everything else counts for a run folder's identity, so a field added later counts unless
    it is marked."""
    names = frozenset(cls.__dict__.get("OUTPUT_NEUTRAL", ()))
    unknown = names - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__}.OUTPUT_NEUTRAL names no field {sorted(unknown)}")
    return names


def added_later(cls: type) -> frozenset[str]:
    """Fields a table marks ``ADDED_LATER`` (a ClassVar): left out of the run's identity and of
    the resolved TOML while they hold their default, so a folder of an earlier version, whose
    settings are unchanged, keeps its config digest and its config.toml bytes. Set to anything
    else, such a field counts like any other."""
    names = frozenset(cls.__dict__.get("ADDED_LATER", ()))
    unknown = names - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__}.ADDED_LATER names no field {sorted(unknown)}")
    return names


def identity_mapping(obj: Any) -> dict[str, Any]:
    """:func:`to_mapping` without the ``ADDED_LATER`` fields that hold their default."""
    later = added_later(type(obj))
    if not later:
        return to_mapping(obj)
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    return {k: v for k, v in to_mapping(obj).items()
            if k not in later or getattr(obj, k) != defaults[k]}


def key(obj: Any, field: str) -> str:
    """``table.field`` for messages."""
    return f"{type(obj).TABLE}.{field}"


def fail(obj: Any, field: str, why: str) -> ConfigError:
    return ConfigError(f"config '{key(obj, field)}' {why} (got {getattr(obj, field)!r})")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _matches(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in get_args(hint))
    if origin is tuple:
        item = get_args(hint)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint)


def _allows(hint: Any, kind: type) -> bool:
    if hint is kind:
        return True
    return get_origin(hint) in (Union, types.UnionType) and kind in get_args(hint)


def _allows_float(hint: Any) -> bool:
    return _allows(hint, float)


def describe(hint: Any) -> str:
    """A reader's name for an annotation: ``"sgd" | "adam"``, ``list of strings``, ..."""
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(h) for h in get_args(hint))
    if origin is tuple:
        item = get_args(hint)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, describe(item))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_types(obj: Any) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if not _matches(value, hint):
            raise fail(obj, f.name, f"must be {describe(hint)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(obj, f.name, "must be a finite number")
        # Number fields accept TOML integers; store them as floats so equal configs are equal.
        if _matches(value, int) and _allows_float(hint) and not _allows(hint, int):
            object.__setattr__(obj, f.name, float(value))


def _from_toml(value: Any) -> Any:
    """TOML arrays become tuples (frozen tables stay hashable)."""
    return tuple(value) if isinstance(value, list) else value


def from_mapping(cls: type, values: Any, base: Any = None) -> Any:
    """An instance of table ``cls`` from a TOML table: ``base`` (or the defaults) with the
    given keys replaced. Unknown keys and non-table values are errors naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"config '{cls.TABLE}' must be a table ([{cls.TABLE}])")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in names:
            raise ConfigError(f"unknown config key '{cls.TABLE}.{k}' (known: {', '.join(sorted(names))})")
    base = cls() if base is None else base
    return dataclasses.replace(base, **{k: _from_toml(v) for k, v in values.items()})


def to_mapping(obj: Any) -> dict[str, Any]:
    """Field → value, tuples as lists (the TOML / JSON view)."""
    return {f.name: (list(v) if isinstance(v := getattr(obj, f.name), tuple) else v) for f in dataclasses.fields(obj)}


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right after its annotation in the source."""
    if cls in _DOCS:
        return _DOCS[cls]
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    _DOCS[cls] = docs
    return docs


def undocumented(cls: type) -> list[str]:
    docs = field_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if f.name not in docs]
