"""Mediation across layers (``sae.layers``): which layer's SAE features carry the pairs'
behaviour change.

The base pass reads every listed layer in the same forwards (:func:`.stages.base_pass`); each
other layer gets its features and policy by the run's own rules (:func:`.stages.layer_fits`).
Per pair, each layer's mediated change ``mean_j ΔZ_j·β`` is measured beside the main layer's:
in engine mode from the post-update probe pass, which reads every layer at once
(:func:`.stages.pair_delta`); in gradient mode from one more concept per layer (its policy's
``mediated_dy``, :func:`.modes.gradient.concept_list`). The shards' ``pair_layers`` frames are
merged into ``pair_layers.parquet``, and :func:`curve` summarizes them per layer into
``layers.parquet`` (policy fidelity, the SAE's FVU on the probes, the mediated share of the
summed change and its R² across pairs); the manifest names the best layer. A one-layer run
writes none of this.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from ..numeric.frames import LAYERS_SCHEMA, build, pair_layers_frame
from ..numeric.mediation import layer_summary, pair_mediated
from .stages import BaseState, PairDelta

BEST_BY = "mediated_share closest to 1"
"""The curve's best layer: the one whose features carry the most of the summed change, a share
above 1 (the features predict more change than there was) counting as far from 1 as the same
amount below it: the largest ``1 − |1 − share|``."""


def curve_layers(state: BaseState) -> list[int]:
    """The curve's layers, sorted (the main one among them)."""
    return sorted([state.cfg.sae.layer, *[lf.layer for lf in state.layers]])


def engine_pair_layers(state: BaseState, ids: Sequence[str], pairs: pl.DataFrame,
                       deltas: Sequence[PairDelta]) -> pl.DataFrame:
    """A shard's ``pair_layers`` in engine mode: the main layer's values are the pairs frame's
    (``pred_dy_mean``, ``mediated_r2``), the others' from each pair's ΔX at that layer."""
    order = curve_layers(state)
    main = {p: (d, m, r) for p, d, m, r in pairs.select("pair_id", "dy_mean", "pred_dy_mean", "mediated_r2")
            .iter_rows()}
    med = np.zeros((len(ids), len(order)))
    r2 = np.zeros((len(ids), len(order)))
    dy = np.array([main[i][0] for i in ids], dtype=np.float64)
    for row, (pid, d) in enumerate(zip(ids, deltas)):
        for col, layer in enumerate(order):
            if layer == state.cfg.sae.layer:
                _, m, r = main[pid]
                med[row, col], r2[row, col] = m, np.nan if r is None else r
                continue
            k = [lf.layer for lf in state.layers].index(layer)
            pol = state.layers[k].policy
            med[row, col], r2[row, col] = pair_mediated(d.dX_layers[k], d.dy, pol.coef, pol.scale)
    return pair_layers_frame(list(ids), order, dy, med, r2)


def gradient_pair_layers(state: BaseState, ids: Sequence[str], col: dict[str, np.ndarray]) -> pl.DataFrame:
    """A shard's ``pair_layers`` in gradient mode, from the concept values ``col``: the main
    layer's ``mediated_dy`` and each other layer's ``mediated_dy@<layer>`` (first order; no
    probe-by-probe R²)."""
    order = curve_layers(state)
    med = np.stack([col["mediated_dy"] if layer == state.cfg.sae.layer else col[layer_concept(layer)]
                    for layer in order], axis=1)
    return pair_layers_frame(list(ids), order, col["dy_mean"], med, None)


def layer_concept(layer: int) -> str:
    """Gradient mode's name of another layer's mediated-change concept."""
    return f"mediated_dy@{layer}"


def curve(state: BaseState, pair_layers: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """``layers.parquet`` and the manifest's facts (the best layer and each layer's share)."""
    rows = []
    fits = {lf.layer: (lf.features, lf.fit, lf.sae_quality) for lf in state.layers}
    fits[state.cfg.sae.layer] = (state.features, state.fit, state.model.sae_quality)
    for layer in curve_layers(state):
        feats, fit, quality = fits[layer]
        part = pair_layers.filter(pl.col("layer") == layer).sort("pair_id")
        point = layer_summary(part["dy_mean"].to_numpy(), part["mediated_dy"].to_numpy())
        pair_r2 = part["mediated_r2"].drop_nulls()
        rows.append({"layer": layer, "main": layer == state.cfg.sae.layer, "n_features": len(feats.columns),
                     "lam": float(fit.policy.lam), "r2_heldout": fit.fidelity.get("r2_heldout"),
                     "r2_mean_baseline": fit.fidelity.get("r2_mean_baseline"), "probe_fvu": feats.probe_fvu,
                     "sae_fvu": (quality or {}).get("fvu"), "n_pairs": part.height, **point,
                     "median_pair_r2": float(pair_r2.median()) if pair_r2.len() else None})
    shares = [r["mediated_share"] for r in rows]
    finite = [i for i, v in enumerate(shares) if np.isfinite(v)]
    best = rows[max(finite, key=lambda i: 1.0 - abs(1.0 - shares[i]))]["layer"] if finite else None
    for r in rows:
        r["best"] = r["layer"] == best
    frame = build(LAYERS_SCHEMA, {k: _nullable([r[k] for r in rows]) if LAYERS_SCHEMA[k] == pl.Float64
                                  else [r[k] for r in rows] for k in LAYERS_SCHEMA}, len(rows))
    facts = {"best_layer": best, "by": BEST_BY, "main_layer": state.cfg.sae.layer,
             "mediated_share": {str(r["layer"]): _fact(r["mediated_share"]) for r in rows},
             "mediated_r2": {str(r["layer"]): _fact(r["mediated_r2"]) for r in rows},
             "r2_heldout": {str(r["layer"]): _fact(r["r2_heldout"]) for r in rows}}
    return frame, facts


def _nullable(values: list) -> pl.Series:
    return pl.Series([None if v is None or not np.isfinite(v) else float(v) for v in values], dtype=pl.Float64)


def _fact(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
