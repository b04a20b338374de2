"""Moved to :mod:`policytrace.model.update` (this alias stays for one release)."""

import warnings

from .model.chat import pair_tokens  # noqa: F401
from .model.config import UpdateCfg as UpdateConfig  # noqa: F401
from .model.update import UpdateEngine, add_lora, selected_names  # noqa: F401

warnings.warn("policytrace.engine moved to policytrace.model.update", DeprecationWarning, stacklevel=2)
