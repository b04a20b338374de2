"""The output frames' schemas and the one builder every run mode feeds (docs/design.md, "Run
folder" and "Adding a mode").

A run writes, per shard and merged, three frames: ``pairs`` (one row per pair),
``pair_features`` (one row per pair and policy feature) and ``pair_behaviour`` (one row per pair
and probe category). Whatever computed the numbers (the exact engine, gradient mode, ...), they
reach a file only through the functions here, so every file of one kind has its schema's
columns, in its order, with its dtypes: a value a mode cannot give is null, never a missing
column. A schema is an ordered ``{column: polars dtype}``; :func:`empty` is its frame with no
rows.

Labels (``pair_id``, ``group``, ``dominant_group``, ``probe_group``) keep the caller's type, so
the numeric API takes integer pair ids; a run's are strings, as the schemas say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

Schema = Mapping[str, Any]  # column -> polars dtype, in column order

PAIR_FEATURES_SCHEMA: Schema = {
    "pair_id": pl.String, "feature_id": pl.Int64, "coef": pl.Float64, "d_coef": pl.Float64,
    "d_coef_x": pl.Float64, "d_coef_y": pl.Float64, "d_coef_xy": pl.Float64, "shapley_x": pl.Float64,
    "shapley_y": pl.Float64, "alignment": pl.Float64, "mediated_dy": pl.Float64,
}
PAIR_SUMMARY_SCHEMA: Schema = {
    "pair_id": pl.String, "group": pl.String, "score": pl.Float64, "score_x": pl.Float64, "score_y": pl.Float64,
    "dy_mean": pl.Float64, "pred_dy_mean": pl.Float64, "direct_dy": pl.Float64, "mediated_share": pl.Float64,
    "mediated_r2": pl.Float64, "dominant_feature": pl.Int64, "dominant_group": pl.String,
    "off_target_share": pl.Float64, "interference": pl.Boolean,
}
"""What :class:`~policytrace.numeric.Attributor` reports per pair."""
PAIRS_SCHEMA: Schema = {
    **PAIR_SUMMARY_SCHEMA, "label": pl.String, "mode": pl.String, "dy_on_flagged": pl.Float64,
    "dy_on_unflagged": pl.Float64,
}
"""A run's per-pair frame: the summary, the pair's label, the mode that scored it, and the mean Δy
on the behaviour's flagged and other probes (the merge appends the findings)."""
PAIR_BEHAVIOUR_SCHEMA: Schema = {
    "pair_id": pl.String, "probe_group": pl.String, "dy_mean": pl.Float64, "mediated_dy": pl.Float64,
    "direct_dy": pl.Float64,
}
INTERFERENCE_SCHEMA: Schema = {
    "group": pl.String, "feature_id": pl.Int64, "feature_group": pl.String, "n_pairs": pl.UInt32,
    "mean_d_coef": pl.Float64, "mean_abs_d_coef": pl.Float64, "n_dominant": pl.UInt32, "intended": pl.Boolean,
}
""":func:`~policytrace.numeric.interference.summarize_interference`'s pair group × feature table."""
INTERFERENCE_GROUPS_SCHEMA: Schema = {
    "grouping": pl.String, "group": pl.String, "n_pairs": pl.Int64, "interference_rate": pl.Float64,
    "chance_rate": pl.Float64, "excess": pl.Float64, "p_value": pl.Float64, "significant": pl.Boolean,
}
PAIR_LAYERS_SCHEMA: Schema = {
    "pair_id": pl.String, "layer": pl.Int64, "dy_mean": pl.Float64, "mediated_dy": pl.Float64,
    "mediated_share": pl.Float64, "mediated_r2": pl.Float64,
}
"""Mediation across layers (``sae.layers``): per pair and layer of the curve, the measured mean
Δy and the part that layer's policy's features carry (``mediated_r2`` probe by probe: null in
gradient mode)."""
LAYERS_SCHEMA: Schema = {
    "layer": pl.Int64, "main": pl.Boolean, "best": pl.Boolean, "n_features": pl.Int64, "lam": pl.Float64,
    "r2_heldout": pl.Float64, "r2_mean_baseline": pl.Float64, "probe_fvu": pl.Float64, "sae_fvu": pl.Float64,
    "n_pairs": pl.Int64, "dy_sum": pl.Float64, "mediated_sum": pl.Float64, "mediated_share": pl.Float64,
    "mediated_r2": pl.Float64, "median_pair_r2": pl.Float64,
}
"""``layers.parquet``: one row per layer of the curve (numeric/mediation.py ``layer_summary``)."""

LABELS = frozenset({"pair_id", "group", "dominant_group", "probe_group"})


def nullable(values: Any) -> pl.Series:
    """Floats with NaN (undefined) stored as null: NaN never reaches an output; inf is kept, so
    the run's finiteness check still sees it. Built from a list, not with a polars expression:
    expressions use polars' thread pool, which deadlocks in a forked child (the core must keep
    working under fork)."""
    return pl.Series([None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)],
                     dtype=pl.Float64)


def empty(schema: Schema) -> pl.DataFrame:
    """The schema's frame without rows (what the merge writes when no shard has the frame)."""
    return pl.DataFrame(schema=dict(schema))


def build(schema: Schema, columns: Mapping[str, Any], height: int) -> pl.DataFrame:
    """Exactly ``schema`` from ``columns`` (arrays, lists or Series of ``height`` values): a
    column not given is all null; labels keep their values' type unless all null."""
    extra = set(columns) - set(schema)
    if extra:
        raise KeyError(f"columns {sorted(extra)} are not in the schema")
    out = []
    for name, dtype in schema.items():
        v = columns.get(name)
        if v is None:
            out.append(pl.Series(name, [None] * height, dtype=dtype))
            continue
        s = v.alias(name) if isinstance(v, pl.Series) else pl.Series(
            name, v, dtype=None if name in LABELS else dtype, strict=False)
        out.append(s.cast(dtype) if s.dtype != dtype and (name not in LABELS or s.dtype == pl.Null) else s)
    return pl.DataFrame(out)


def pair_features_frame(pair_ids: Sequence[Any], feature_ids: np.ndarray, coef: np.ndarray, d_total: np.ndarray,
                        d_x: np.ndarray, d_y: np.ndarray, d_xy: np.ndarray, mediated: np.ndarray) -> pl.DataFrame:
    """``pair_features``, pair-major, from (P, K) shifts of the policy's scaled coefficients:
    ``d_total`` and its x-path, y-path and interaction parts, and each feature's mediated Δy.
    The Shapley split gives each path half the interaction; ``alignment = d_total · coef``."""
    p, k = d_total.shape
    c = np.broadcast_to(coef, (p, k))
    return build(PAIR_FEATURES_SCHEMA, {
        "pair_id": pl.Series("pair_id", list(pair_ids), strict=False).gather(np.repeat(np.arange(p), k)),
        "feature_id": np.tile(feature_ids, p), "coef": c.ravel(), "d_coef": d_total.ravel(),
        "d_coef_x": d_x.ravel(), "d_coef_y": d_y.ravel(), "d_coef_xy": d_xy.ravel(),
        "shapley_x": (d_x + d_xy / 2).ravel(), "shapley_y": (d_y + d_xy / 2).ravel(),
        "alignment": (d_total * c).ravel(), "mediated_dy": mediated.ravel(),
    }, p * k)


@dataclass(frozen=True)
class Dominance:
    """Per pair: the index of the feature with the largest |d_coef| (-1: none moved), and with
    feature and pair groups its group, the off-target share and the interference flag."""

    index: np.ndarray
    groups: Sequence[Any] | None = None
    """The group of every policy feature (``None``: not known, the last three are null)."""
    off_target_share: np.ndarray | None = None
    interference: np.ndarray | None = None


@dataclass(frozen=True)
class PairValues:
    """Per pair (P,) what every mode gives: SMDA's score and its two paths, the measured mean Δy
    and the part the features carry; NaN where undefined (stored as null)."""

    score: np.ndarray
    score_x: np.ndarray
    score_y: np.ndarray
    dy_mean: np.ndarray
    pred_dy_mean: np.ndarray
    direct_dy: np.ndarray
    mediated_share: np.ndarray
    mediated_r2: np.ndarray


def pair_summary_frame(pair_ids: Sequence[Any], groups: Sequence[Any] | None, values: PairValues,
                       feature_ids: np.ndarray, dominance: Dominance | None = None) -> pl.DataFrame:
    """The per-pair summary (:data:`PAIR_SUMMARY_SCHEMA`); no ``dominance``: those columns null."""
    p = len(pair_ids)
    cols: dict[str, Any] = {
        "pair_id": list(pair_ids), "group": list(groups) if groups is not None else None,
        "score": values.score, "score_x": values.score_x, "score_y": values.score_y, "dy_mean": values.dy_mean,
        "pred_dy_mean": values.pred_dy_mean, "direct_dy": values.direct_dy,
        "mediated_share": nullable(values.mediated_share), "mediated_r2": nullable(values.mediated_r2),
    }
    if dominance is not None:
        dom = dominance.index
        cols["dominant_feature"] = [int(feature_ids[j]) if j >= 0 else None for j in dom]
        if dominance.groups is not None:
            cols["dominant_group"] = [dominance.groups[j] if j >= 0 else None for j in dom]
            cols["off_target_share"] = np.asarray(dominance.off_target_share)
            cols["interference"] = np.asarray(dominance.interference, dtype=bool)
    return build(PAIR_SUMMARY_SCHEMA, cols, p)


def pairs_frame(summary: pl.DataFrame, labels: Sequence[str], mode: str, dy_on_flagged: np.ndarray | pl.Series | None,
                dy_on_unflagged: np.ndarray | pl.Series | None) -> pl.DataFrame:
    """A run's ``pairs`` frame (:data:`PAIRS_SCHEMA`): the summary with each pair's label, the
    mode's name, and the mean Δy on the flagged and other probes (``None``: no flag, null)."""
    p = summary.height
    side = {name: v if v is None or isinstance(v, pl.Series) else nullable(v)
            for name, v in (("dy_on_flagged", dy_on_flagged), ("dy_on_unflagged", dy_on_unflagged))}
    cols = dict(zip(summary.columns, summary.get_columns())) | side | {
        "label": list(labels), "mode": pl.Series("mode", [mode] * p, dtype=pl.String)}
    return build(PAIRS_SCHEMA, cols, p)


def pair_behaviour_frame(pair_ids: Sequence[Any], levels: Sequence[Any], dy_mean: np.ndarray,
                         mediated_dy: np.ndarray | None) -> pl.DataFrame:
    """``pair_behaviour``, probe-group-major: ``dy_mean`` and ``mediated_dy`` are (G, P) means
    over each level's probes (``mediated_dy`` ``None``: not given, it and ``direct_dy`` null)."""
    g, p = dy_mean.shape
    cols: dict[str, Any] = {"pair_id": [i for _ in levels for i in pair_ids],
                            "probe_group": [lv for lv in levels for _ in range(p)], "dy_mean": dy_mean.ravel()}
    if mediated_dy is not None:
        cols |= {"mediated_dy": mediated_dy.ravel(), "direct_dy": (dy_mean - mediated_dy).ravel()}
    return build(PAIR_BEHAVIOUR_SCHEMA, cols, g * p)


def pair_layers_frame(pair_ids: Sequence[Any], layers: Sequence[int], dy_mean: np.ndarray, mediated: np.ndarray,
                      r2: np.ndarray | None) -> pl.DataFrame:
    """``pair_layers``, pair-major: ``dy_mean`` (P,), ``mediated`` and ``r2`` (P, L) per pair and
    layer (``r2`` ``None``: not given, null)."""
    from .mediation import mediated_share

    p, n_layers = mediated.shape
    dy = np.repeat(np.asarray(dy_mean, dtype=np.float64), n_layers)
    cols: dict[str, Any] = {"pair_id": [i for i in pair_ids for _ in range(n_layers)],
                            "layer": np.tile(np.asarray(layers, dtype=np.int64), p), "dy_mean": dy,
                            "mediated_dy": mediated.ravel(), "mediated_share": nullable(mediated_share(mediated.ravel(), dy))}
    if r2 is not None:
        cols["mediated_r2"] = nullable(r2.ravel())
    return build(PAIR_LAYERS_SCHEMA, cols, p * n_layers)
