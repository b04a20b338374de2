"""Moved to :mod:`policytrace.model.probe` (this alias stays for one release)."""

import warnings

from .model.chat import encode_prompts, format_prompt  # noqa: F401
from .model.probe import POOLINGS, ProbeRunner, TargetSet  # noqa: F401

warnings.warn("policytrace.probe moved to policytrace.model.probe", DeprecationWarning, stacklevel=2)
