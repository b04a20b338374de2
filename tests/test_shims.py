"""The old flat module paths still import for this release, with a deprecation warning."""

from __future__ import annotations

import importlib
import sys

import pytest

SHIMS = {"policytrace.probe": "ProbeRunner", "policytrace.engine": "UpdateEngine", "policytrace.sae": "SaeReader",
         "policytrace.data": "load_dataset"}


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_old_module_paths_warn_and_work(name):
    pytest.importorskip("torch")
    pytest.importorskip("sae_lens")
    sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match="moved to policytrace"):
        mod = importlib.import_module(name)
    assert hasattr(mod, SHIMS[name])
