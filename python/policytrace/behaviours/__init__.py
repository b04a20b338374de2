"""The behaviours policytrace can attribute: the shipped ones by ``behaviour.name``, one declared
in a config's ``[behaviour]`` table, or one from the user's code (``behaviour.module``); the only
code that knows what "refusal" or "sycophancy" is. See :mod:`policytrace.behaviours.base`."""

from __future__ import annotations

from typing import Mapping

from . import declare
from .base import Behaviour, BehaviourCfg, PlantedKind
from .refusal import REFUSAL
from .sycophancy import SYCOPHANCY

BEHAVIOURS: dict[str, Behaviour] = {b.name: b for b in (REFUSAL, SYCOPHANCY)}
DEFAULT = REFUSAL.name


def get(spec: str | Mapping) -> Behaviour:
    """A behaviour by name (``"refusal"``), by module (``"pkg.mod:Name"``), or from a resolved
    ``[behaviour]`` table (what a run's manifest records for a behaviour of the user's own). A
    ConfigError names the known ones otherwise."""
    return declare.from_spec(spec, BEHAVIOURS)


def from_config(cfg: BehaviourCfg) -> Behaviour:
    """The behaviour a ``[behaviour]`` table describes: a shipped one with the table's overrides,
    one declared in the table, or ``behaviour.module``'s."""
    return declare.from_config(cfg, BEHAVIOURS)


def resolved_table(cfg: BehaviourCfg) -> BehaviourCfg:
    """The table with every key filled from the behaviour it describes."""
    return declare.resolved_table(cfg, from_config(cfg))


def spec(cfg: BehaviourCfg) -> str | dict:
    """What a run's manifest records as its behaviour (:func:`get` reads it back)."""
    return declare.spec(cfg, BEHAVIOURS)


__all__ = ["BEHAVIOURS", "DEFAULT", "Behaviour", "BehaviourCfg", "PlantedKind", "from_config", "get",
           "resolved_table", "spec"]
