"""Pick the compiled core or the numpy reference; both expose the same functions."""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

from .._core import MAX_THREADS  # the core refuses more threads; one number for both
from ..errors import InvalidValueError

BACKENDS = ("rust", "numpy")


def backend(name: str) -> ModuleType:
    if name == "rust":
        from .. import _core

        return _core
    if name == "numpy":
        from . import _reference

        return _reference
    raise InvalidValueError(f"`backend` '{name}' is not one of {BACKENDS}")



def threads(n: int | None) -> int:
    """Thread budget for the core: explicit, else POLICYTRACE_NUM_THREADS, else all cores (0)."""
    name = "`threads`"
    if n is None:
        env = os.environ.get("POLICYTRACE_NUM_THREADS")
        if env is None:
            return 0
        name = "POLICYTRACE_NUM_THREADS"
        try:
            n = int(env)
        except ValueError as e:
            raise InvalidValueError(f"POLICYTRACE_NUM_THREADS={env!r} is not an integer") from e
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InvalidValueError(f"{name} = {n!r} must be an integer (0 = all cores)")
    if not 0 <= n <= MAX_THREADS:
        raise InvalidValueError(f"{name} = {n} must be between 0 (all cores) and {MAX_THREADS}")
    return int(n)


def available_cores() -> int:
    """What "all cores" (threads = 0) means for the core in this process (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
