"""Layer 1, the numeric method over the compiled core: feature statistics and selection, the
symbolic policy, its pathway decomposition, interference, fidelity and rank metrics.

Never imports torch; everything here works on arrays a user already has. See docs/design.md.
"""

from .decompose import PAIR_FEATURE_COLUMNS, Attributor, decompose
from .features import feature_stats, select_features, selected_columns
from .interference import interference, summarize_interference
from .policy import Policy, fit_policy

__all__ = [
    "PAIR_FEATURE_COLUMNS",
    "Attributor",
    "Policy",
    "decompose",
    "feature_stats",
    "fit_policy",
    "interference",
    "select_features",
    "selected_columns",
    "summarize_interference",
]
