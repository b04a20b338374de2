"""A run's behaviour from its ``[behaviour]`` table: a shipped one (with the table's overrides),
one declared entirely in TOML, or one from the user's own code (``behaviour.module``)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from .._tables import from_mapping, to_mapping
from ..errors import ConfigError, InvalidValueError
from .base import Behaviour, BehaviourCfg

# The [behaviour] keys that are fields of a Behaviour ("" or [] in the table: the behaviour's own).
DECLARED = ("targets", "anti_targets", "flag", "flagged_value", "unflagged_value", "sides", "raising_labels",
            "lowering_labels", "neutral_labels", "raising_judged_on", "lowering_judged_on", "score_name")
REQUIRED = "behaviour.targets, behaviour.flag and behaviour.raising_labels and/or lowering_labels"


def declared(cfg: BehaviourCfg) -> dict[str, Any]:
    """The keys the table sets (not left empty)."""
    return {k: getattr(cfg, k) for k in DECLARED if getattr(cfg, k) not in ("", ())}


def fields(b: Behaviour) -> dict[str, Any]:
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}


def _module(name: str) -> ModuleType:
    """A module by dotted name (the working folder counts, as for ``python -m``), or a ``.py``
    file by path."""
    if name.endswith(".py"):
        path = Path(name).expanduser().resolve()
        key = f"policytrace_user_{path.stem}"
        loaded = sys.modules.get(key)
        if loaded is not None and getattr(loaded, "__file__", None) == str(path):
            return loaded  # once per process, as an import would be
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None or not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while decorating
        spec.loader.exec_module(module)
        return module
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _import(spec: str) -> Any:
    mod, sep, attr = spec.rpartition(":")
    if not sep or not mod or not attr:
        raise ConfigError(f"behaviour.module = {spec!r} must be \"package.module:Name\" or \"path/to/file.py:Name\"")
    try:
        obj: Any = _module(mod)
    except Exception as e:  # the user's module may fail in any way while importing
        raise ConfigError(f"behaviour.module = {spec!r}: cannot import {mod!r} ({type(e).__name__}: {e}); "
                          "is it on the Python path (or give the .py file's path)?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"behaviour.module = {spec!r}: {mod!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def _build(cls: type, base: dict[str, Any], cfg: BehaviourCfg) -> Behaviour:
    values = base | declared(cfg)
    missing = [k for k in ("targets", "flag") if k not in values]
    if "raising_labels" not in values and "lowering_labels" not in values:
        missing.append("raising_labels or lowering_labels")
    if missing:
        raise ConfigError(f"behaviour.name = {cfg.name!r} is not a shipped behaviour, so [behaviour] must declare "
                          f"it ({REQUIRED}): set behaviour.{', behaviour.'.join(missing)}; or name its code with "
                          "behaviour.module (README, \"Your own data\")")
    try:
        return cls(**values)
    except TypeError as e:  # a subclass with fields of its own the table cannot fill
        raise ConfigError(f"behaviour {cfg.name!r}: {cls.__name__} cannot be built from [behaviour] ({e})") from e


def from_config(cfg: BehaviourCfg, shipped: Mapping[str, Behaviour]) -> Behaviour:
    """The behaviour the table describes (errors name the key to set)."""
    try:
        if cfg.module:
            obj = _import(cfg.module)
            if isinstance(obj, Behaviour):
                return dataclasses.replace(obj, **declared(cfg))
            if not (isinstance(obj, type) and issubclass(obj, Behaviour)):
                raise ConfigError(f"behaviour.module = {cfg.module!r} is neither a Behaviour subclass nor an "
                                  f"instance (got {type(obj).__name__})")
            base = fields(shipped[cfg.name]) if cfg.name in shipped else {"name": cfg.name}
            return _build(obj, base, cfg)
        if cfg.name in shipped:
            return dataclasses.replace(shipped[cfg.name], **declared(cfg))
        return _build(Behaviour, {"name": cfg.name}, cfg)
    except InvalidValueError as e:
        raise ConfigError(str(e)) from e


def resolved_table(cfg: BehaviourCfg, b: Behaviour) -> BehaviourCfg:
    """The table with every declared key filled from the behaviour, so a run folder's
    config.toml records what was used (and rebuilds the same behaviour)."""
    return dataclasses.replace(cfg, name=b.name, **{k: getattr(b, k) for k in DECLARED})


def spec(cfg: BehaviourCfg, shipped: Mapping[str, Behaviour]) -> str | dict:
    """How a run records its behaviour for readers of its manifest: the name of a shipped
    behaviour used as shipped, else the whole resolved table (``get`` accepts both)."""
    b = from_config(cfg, shipped)
    if not cfg.module and cfg.name in shipped and fields(b) == fields(dataclasses.replace(
            shipped[cfg.name], targets=b.targets, anti_targets=b.anti_targets)):
        return cfg.name
    return to_mapping(resolved_table(cfg, b))


def from_spec(value: str | Mapping, shipped: Mapping[str, Behaviour]) -> Behaviour:
    if isinstance(value, Mapping):
        return from_config(from_mapping(BehaviourCfg, dict(value)), shipped)
    if ":" in value:
        return from_config(BehaviourCfg(module=value), shipped)
    if value not in shipped:
        raise ConfigError(f"behaviour.name = {value!r} is not a known behaviour ({', '.join(shipped)}); a behaviour "
                          f"of your own is declared in [behaviour] ({REQUIRED}) or named by behaviour.module")
    return shipped[value]
