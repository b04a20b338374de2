import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# Test helpers (_helpers.py, _tiny.py) live beside this file; the layer folders import them.
sys.path.insert(0, str(Path(__file__).parent))

_LAYER_MARKERS = {"model": "model", "pipeline": "model", "train": "model"}


def pytest_collection_modifyitems(config, items):
    """Tests under tests/model and tests/pipeline need torch and build models: mark them
    ``model`` so ``pytest -m "not model"`` runs the numeric layer alone."""
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in _LAYER_MARKERS:
            item.add_marker(getattr(pytest.mark, _LAYER_MARKERS[layer]))
