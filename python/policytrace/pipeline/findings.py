"""What a researcher reads off a finished run, computed over all pairs at the merge (so nothing
depends on how pairs were batched): interference against chance under two groupings, and the
curator's suspicion ranking.

* **Interference against chance.** A feature's *category* group is the probe category where it
  is most active; its *side* is the side of the behaviour's flag where it is more active
  (the behaviour's two sides). A pair's intended features are those of its own category (or
  side). The off-target share is compared with its chance value under a random assignment of
  feature groups (:func:`policytrace.numeric.interference.against_chance`), and a pair is
  flagged only when the excess is significant after Benjamini–Hochberg across pairs. The
  dominant-feature rate per pair group is compared with its chance rate ``1 − m/K`` by a
  binomial test (``interference_groups.parquet``).
* **Suspicion.** :meth:`policytrace.behaviours.Behaviour.suspicion`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..numeric.frames import PAIRS_SCHEMA, Schema, nullable
from ..numeric.interference import against_chance, group_rates
from .stages import BaseState

FDR = 0.05
N_PERM = 4000

FINDINGS_SCHEMA: Schema = {
    "off_target_chance": pl.Float64, "off_target_excess": pl.Float64, "off_target_p": pl.Float64,
    "interference_chance": pl.Float64, "interference_significant": pl.Boolean,
}
"""The columns interference against chance adds to ``pairs`` (by probe category)."""
SIDE_FINDINGS_SCHEMA: Schema = {
    **{f"side_{c}": t for c, t in FINDINGS_SCHEMA.items()}, "side_off_target_share": pl.Float64,
    "side_interference": pl.Boolean,
}
"""The same by the behaviour's side, when every pair and enough probes carry the flag."""
SUSPICION_SCHEMA: Schema = {"suspicion": pl.Float64, "suspicion_raw": pl.Float64, "suspicion_reason": pl.String}


def merged_pairs_schema(per_feature: bool, sides: bool) -> Schema:
    """``pairs.parquet``: a shard's columns, then the findings the merge could compute (none
    without per-feature shifts), then the curator's suspicion."""
    findings = {**FINDINGS_SCHEMA, **(SIDE_FINDINGS_SCHEMA if sides else {})} if per_feature else {}
    return {**PAIRS_SCHEMA, **findings, **SUSPICION_SCHEMA}


def _d_matrix(pf: pl.DataFrame, pair_ids: list, feature_ids: np.ndarray) -> np.ndarray:
    """The (P, K) d_coef matrix in pair and policy-feature order."""
    pos = {f: j for j, f in enumerate(feature_ids.tolist())}
    row = {p: i for i, p in enumerate(pair_ids)}
    d = np.zeros((len(pair_ids), len(feature_ids)))
    ids, feats, vals = pf["pair_id"].to_list(), pf["feature_id"].to_list(), pf["d_coef"].to_numpy()
    d[[row[i] for i in ids], [pos[f] for f in feats]] = vals
    return d


def feature_sides(state: BaseState) -> list[str] | None:
    """Each feature's side of the behaviour's flag: where its mean activation is higher."""
    flag = state.inputs.flag
    if flag is None or flag.all() or not flag.any():
        return None
    X = state.features.X
    on, off = X[flag].mean(axis=0), X[~flag].mean(axis=0)
    pos, neg = state.inputs.behaviour.sides
    return [pos if a > b else neg for a, b in zip(on, off)]


def _columns(prefix: str, res: dict, dominant_intended: np.ndarray | None) -> dict:
    cols = {
        f"{prefix}off_target_chance": res["chance"],
        f"{prefix}off_target_excess": res["excess"],
        f"{prefix}off_target_p": res["p"],
        f"{prefix}interference_chance": res["dominant_chance"],
        f"{prefix}interference_significant": res["significant"],
    }
    if dominant_intended is not None:
        cols[f"{prefix}off_target_share"] = res["share"]
        cols[f"{prefix}interference"] = ~dominant_intended
    return {k: (nullable(v).alias(k) if np.asarray(v).dtype.kind == "f" else pl.Series(k, v)) for k, v in cols.items()}


def interference_findings(state: BaseState, pf: pl.DataFrame, pairs: pl.DataFrame, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``pairs`` with the chance-corrected interference columns, and the per-group table."""
    ids = pairs["pair_id"].to_list()
    fids = state.policy.feature_ids
    d = _d_matrix(pf, ids, fids)
    cat = against_chance(d, state.features.groups, pairs["group"].to_list(), N_PERM, seed, FDR)
    out = pairs.with_columns(**_columns("", cat, None))
    groups = group_rates(pairs["group"].to_list(), pairs["interference"].to_numpy(), cat["dominant_chance"], FDR)
    tables = [groups.with_columns(pl.lit("category").alias("grouping"))]
    sides = feature_sides(state)
    flag_of = dict(zip(state.inputs.pairs["id"].to_list(), state.inputs.pairs[state.inputs.behaviour.flag].to_list()))
    pair_flag = [flag_of.get(i) for i in ids]
    if sides is not None and None not in pair_flag:
        names = state.inputs.behaviour.sides
        pair_side = [names[0] if f else names[1] for f in pair_flag]
        res = against_chance(d, sides, pair_side, N_PERM, seed + 1, FDR)
        dom = np.abs(d).argmax(axis=1)
        intended = np.array([sides[j] == s for j, s in zip(dom, pair_side)])
        out = out.with_columns(**_columns("side_", res, intended))
        side_groups = group_rates(pair_side, ~intended, res["dominant_chance"], FDR)
        tables.append(side_groups.with_columns(pl.lit("side").alias("grouping")))
    order = ["grouping", "group", "n_pairs", "interference_rate", "chance_rate", "excess", "p_value", "significant"]
    return out, pl.concat(tables).select(order)


def suspicion_findings(state: BaseState, pairs: pl.DataFrame) -> pl.DataFrame:
    flag = state.inputs.behaviour.flag
    frame = pairs.join(state.inputs.pairs.select(pl.col("id").alias("pair_id"), flag), on="pair_id", how="left")
    return pairs.join(state.inputs.behaviour.suspicion(frame), on="pair_id", how="left")


def side_means(dy: np.ndarray, flag: np.ndarray | None) -> dict[str, pl.Series]:
    """Mean Δy per pair over the flagged and the other probes (null without a flag)."""
    names = ("dy_on_flagged", "dy_on_unflagged")
    if flag is None or not flag.any() or flag.all():
        return {n: pl.Series(n, [None] * len(dy), dtype=pl.Float64) for n in names}
    return {n: pl.Series(n, dy[:, m].mean(axis=1)) for n, m in zip(names, (flag, ~flag))}


# Below these the run says so prominently (docs/design.md, "Findings").
FVU_POOR = 0.5  # on the probes' pooled activations: relative to the between-probe variance
CE_DELTA_POOR = 0.5  # nats
MARGIN = 0.02


def gates(state: BaseState) -> list[str]:
    """Warnings a reader must see before trusting the attributions: a policy that does not
    beat its baselines on held-out probes, or an SAE that reconstructs poorly."""
    out = []
    f = state.fit.fidelity
    if f["r2_heldout"] <= f["r2_mean_baseline"] + MARGIN:
        out.append(f"the policy does not predict the {state.inputs.behaviour.score_name} on held-out probes "
                   f"(R² {f['r2_heldout']:.2f} against {f['r2_mean_baseline']:.2f} for the mean): its pathways "
                   "describe noise. Add probes, try another sae.layer or features.k, or a better SAE")
    if f["accuracy_heldout_high_y"] <= f["accuracy_majority_high_y"] + MARGIN:
        out.append(f"the policy does not tell high-{state.inputs.behaviour.score_name} probes from the rest on "
                   f"held-out probes (accuracy {f['accuracy_heldout_high_y']:.2f} against "
                   f"{f['accuracy_majority_high_y']:.2f} for the majority class)")
    fvu = state.features.probe_fvu
    if fvu is not None and fvu > FVU_POOR:
        out.append(f"the SAE's reconstruction misses {100 * fvu:.0f}% of how the probes' activations differ from "
                   f"one another (FVU on the pooled probe activations {fvu:.2f} > {FVU_POOR}): the policy's features "
                   "may miss what drives the behaviour. Train the SAE longer (sae.train_steps), larger "
                   "(sae.train_d_sae), or name a better one")
    q = state.model.sae_quality or {}
    if q.get("ce_delta", 0.0) > CE_DELTA_POOR:
        out.append(f"splicing the SAE's reconstruction raises the next-token loss by {q['ce_delta']:.2f} nats "
                   f"(> {CE_DELTA_POOR}): the SAE distorts the model; train it longer or larger")
    return out
