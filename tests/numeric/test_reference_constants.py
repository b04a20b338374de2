"""The float64 reference shares the core's constants (it imports them from the extension), and
it is not part of the public API."""

from __future__ import annotations

import inspect

import policytrace as pt
from policytrace import _core
from policytrace.numeric import _backend, _reference

SHARED = ("PIVOT_RATIO_MIN", "REFIT_TOLERANCE", "GCV_GRID_POINTS", "GCV_GRID_LO", "GCV_GRID_HI")


def test_reference_reads_the_cores_constants():
    for name in SHARED:
        assert getattr(_reference, name) is getattr(_core, name), name
    assert _backend.MAX_THREADS is _core.MAX_THREADS


def test_reference_is_not_public():
    assert not hasattr(pt, "reference")
    for fn in (pt.decompose, pt.fit_policy, pt.feature_stats, pt.select_features, pt.interference, pt.Attributor):
        params = inspect.signature(fn).parameters
        assert "backend" not in params and "_backend" in params, fn.__name__
