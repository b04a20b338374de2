"""Pick the compiled core or the numpy reference; both expose the same functions."""

from __future__ import annotations

import os
from types import ModuleType

from ..errors import InvalidValueError

BACKENDS = ("rust", "numpy")


def backend(name: str) -> ModuleType:
    if name == "rust":
        from .. import _core

        return _core
    if name == "numpy":
        from . import reference

        return reference
    raise InvalidValueError(f"`backend` '{name}' is not one of {BACKENDS}")


def threads(n: int | None) -> int:
    """Thread budget for the core: explicit, else POLICYTRACE_NUM_THREADS, else all cores (0)."""
    if n is None:
        env = os.environ.get("POLICYTRACE_NUM_THREADS")
        if env is None:
            return 0
        try:
            n = int(env)
        except ValueError as e:
            raise InvalidValueError(f"POLICYTRACE_NUM_THREADS={env!r} is not an integer") from e
    if n < 0:
        raise InvalidValueError(f"`threads` = {n} must be >= 0 (0 = all cores)")
    return int(n)
