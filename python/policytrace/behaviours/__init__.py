"""The behaviours policytrace can attribute, by ``behaviour.name``; the only code that knows
what "refusal" or "sycophancy" is. See :mod:`policytrace.behaviours.base`."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Behaviour, BehaviourCfg, PlantedKind
from .refusal import REFUSAL
from .sycophancy import SYCOPHANCY

BEHAVIOURS: dict[str, Behaviour] = {b.name: b for b in (REFUSAL, SYCOPHANCY)}


def get(name: str) -> Behaviour:
    """The behaviour called ``name`` (a ConfigError listing the known ones otherwise)."""
    try:
        return BEHAVIOURS[name]
    except KeyError:
        raise ConfigError(f"behaviour.name = {name!r} is not a known behaviour ({', '.join(BEHAVIOURS)})") from None


__all__ = ["BEHAVIOURS", "Behaviour", "BehaviourCfg", "PlantedKind", "get"]
