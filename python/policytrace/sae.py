"""Moved to :mod:`policytrace.model.sae` and :mod:`policytrace.model.sae_train` (this alias
stays for one release)."""

import warnings

from .model.sae import SaeReader, load_sae  # noqa: F401
from .model.sae_train import default_sae, sae_quality, train_topk_sae  # noqa: F401

warnings.warn("policytrace.sae moved to policytrace.model.sae", DeprecationWarning, stacklevel=2)
