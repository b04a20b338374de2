"""policytrace: which training examples made a fine-tuned language model adopt a behaviour,
and through which interpretable SAE features (Symbolic Mechanistic Data Attribution)."""

from . import errors, reference
from .decomposition import Attributor, decompose, interference
from .errors import PolicytraceError
from .features import feature_stats, select_features, selected_columns
from .policy import Policy, fit_policy

__version__ = "0.1.0"

__all__ = [
    "Attributor",
    "Policy",
    "PolicytraceError",
    "decompose",
    "errors",
    "feature_stats",
    "fit_policy",
    "interference",
    "reference",
    "select_features",
    "selected_columns",
]
