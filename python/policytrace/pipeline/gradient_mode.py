"""Gradient mode moved to :mod:`policytrace.pipeline.modes.gradient` (one of the run modes behind
:class:`policytrace.pipeline.modes.Mode`); these names stay importable from here."""

from __future__ import annotations

from .modes.gradient import (GradientMode, GradientSetup, concept_list, concept_values, explain, frames,
                             pair_scores, pair_vectors, setup, state_concept_gradients, store_key)

__all__ = ["GradientMode", "GradientSetup", "concept_list", "concept_values", "explain", "frames", "pair_scores",
           "pair_vectors", "setup", "state_concept_gradients", "store_key"]
