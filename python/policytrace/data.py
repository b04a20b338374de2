"""Moved to :mod:`policytrace.pipeline.data` (this alias stays for one release)."""

import warnings

from .pipeline.data import Dataset, load_dataset, load_pairs, load_probes, shipped_path  # noqa: F401

warnings.warn("policytrace.data moved to policytrace.pipeline.data", DeprecationWarning, stacklevel=2)
