"""Shared fixtures for the tests in tests/model: the tiny tokenizer, model, encoded probes and target sets."""

# The package and torch are imported inside the fixtures, so that without torch this conftest
# still loads and modules guarded by ``pytest.importorskip("torch")`` skip instead of erroring.

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tok():
    from _model_helpers import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from _model_helpers import build_model

    return build_model(len(tok))


@pytest.fixture(scope="module")
def prompt_ids(tok):
    from _model_helpers import PROMPTS

    from policytrace.model.chat import encode_prompts

    return encode_prompts(tok, PROMPTS, [f"p{i}" for i in range(len(PROMPTS))], 128)


@pytest.fixture(scope="module")
def tset(tok):
    from _model_helpers import TARGETS

    from policytrace.model.probe import TargetSet

    return TargetSet.from_strings(tok, TARGETS)


@pytest.fixture(scope="module")
def tset_anti(tok):
    from _model_helpers import ANTI, TARGETS

    from policytrace.model.probe import TargetSet

    return TargetSet.from_strings(tok, TARGETS, ANTI)
