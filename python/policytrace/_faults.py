"""Fault injection for the crash tests: kill this process with SIGKILL at a named point.

``POLICYTRACE_FAULT="<point>"`` (or ``"<point>:<n>"``, the n-th time the point is reached,
counting from 1) makes :func:`checkpoint` send SIGKILL to its own process (only in the torchrun rank
``POLICYTRACE_FAULT_RANK`` when that is set), exactly as an OOM
killer or a pre-empted node would: no ``finally`` runs, no file is closed. The tests use it
to prove that a run killed at any of these points resumes to byte-identical outputs. Unset,
a checkpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def checkpoint(point: str) -> None:
    spec = os.environ.get("POLICYTRACE_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    only = os.environ.get("POLICYTRACE_FAULT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
