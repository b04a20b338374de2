"""The run modes, by ``run.mode``: each one implementation of :class:`~.base.Mode` behind one
seam (docs/design.md, "Adding a mode"). The run and validate ask this registry, the report reads
what the frames contain; no code outside this package tests the mode's name."""

from __future__ import annotations

from ...errors import ConfigError
from .base import Deltas, Finished, Mode, Prepared, RunScores, ShardFrames
from .engine import EngineMode
from .gradient import GradientMode
from .trajectory import TrajectoryMode

MODES: dict[str, Mode] = {m.name: m for m in (EngineMode(), GradientMode(), TrajectoryMode())}


def get_mode(name: str) -> Mode:
    """The mode called ``name`` (a ConfigError listing the known ones otherwise)."""
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"run.mode = {name!r} is not a known mode ({', '.join(MODES)})") from None


__all__ = ["MODES", "Deltas", "Finished", "Mode", "Prepared", "RunScores", "ShardFrames", "get_mode"]
