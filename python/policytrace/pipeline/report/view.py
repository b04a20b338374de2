"""The report's view layer: every number the page shows, computed from a run's frames
(:class:`~.frames.RunFrames`) into plain data: dataclasses of strings, floats, tuples and
:mod:`.tables` (no markup). The templates only lay this out, and
``tests/pipeline/test_report_view.py`` checks it value by value. The drill-down panels are in
:mod:`.panels`. docs/design.md, module table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from ...numeric.mediation import ZERO_CHANGE
from . import panels
from .frames import RunFrames
from .panels import FeaturePanel, PairPanel
from .tables import (FEATURE_LINK, MISSING, PAIR_LINK, Bars, Curve, Heatmap, LinePath, Scatter, Table, finite, fmt,
                     table)


@dataclass(frozen=True)
class Wording:
    """The behaviour's words the prose needs."""

    name: str
    score_name: str
    score_meaning: str
    raising_label: str
    lowering_label: str
    raise_word: str
    flag: str
    positive_side: str
    negative_side: str
    planted_text: str


@dataclass(frozen=True)
class Header:
    run_path: str
    n_probes: str
    n_pairs: int
    n_features: str
    lam: str
    sae: str
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Summary:
    by_label: Table
    by_category: Table
    mediated_share: float
    """Σ mediated / Σ dy_mean over all pairs (NaN when the summed change is 0)."""
    mediated_share_text: str


@dataclass(frozen=True)
class PolicyView:
    bars: Bars
    table: Table
    shown: int
    total: int


@dataclass(frozen=True)
class AlignmentView:
    top: Table
    scatter: Scatter | None
    """None when the run has no per-feature shifts (then there is no heatmap either)."""
    heatmap: Heatmap | None
    n_features: int


@dataclass(frozen=True)
class InterferenceView:
    computed: bool
    significant: int = 0
    side_significant: int = 0
    n_pairs: int = 0
    groups: Table | None = None
    flagged: Table | None = None


@dataclass(frozen=True)
class FidelityView:
    by_category: Table
    lam_path: LinePath | None
    measures: Table
    r2_by_category: Table
    folds: str
    probe_fvu: str


@dataclass(frozen=True)
class ValidationView:
    lds: Table | None
    removal: Table | None
    planted: Table | None

    @property
    def ran(self) -> bool:
        return any(t is not None for t in (self.lds, self.removal, self.planted))


@dataclass(frozen=True)
class LayersView:
    """Mediation across layers: per layer of the curve, the policy's fidelity, the SAE's FVU on
    the probes and how much of the pairs' behaviour change its features carry."""

    table: Table
    curve: Curve
    best_layer: str
    best_share: str
    main_layer: str
    main_share: str
    first_order: bool
    """No pair has a probe-by-probe R² (gradient mode's first-order mediated changes)."""


@dataclass(frozen=True)
class ReportView:
    wording: Wording
    header: Header
    summary: Summary
    curator: Table
    policy: PolicyView
    alignment: AlignmentView
    interference: InterferenceView
    fidelity: FidelityView
    validation: ValidationView
    pair_panels: tuple[PairPanel, ...]
    feature_panels: tuple[FeaturePanel, ...]
    config: str
    repairs: Table | None = None
    """The repairs the folder holds (`policytrace repair`), or None."""
    layers: LayersView | None = None
    """The mediation curve of a run with ``sae.layers``, or None."""


def report_view(run: RunFrames) -> ReportView:
    """Everything the page shows, in reading order."""
    return ReportView(
        wording(run), header(run), summary(run), curator(run), policy(run), alignment(run), interference(run),
        fidelity(run), validation(run), panels.pair_panels(run), panels.feature_panels(run), run.config_text,
        repairs(run), layers(run))


def wording(run: RunFrames) -> Wording:
    b = run.behaviour
    return Wording(b.name, b.score_name, b.score_meaning, b.raising_label, b.lowering_label, b.raise_word, b.flag,
                   b.sides[0], b.sides[1], b.planted_text)


def sae_text(quality: dict | None) -> str:
    """One line on the SAE: the default one's measured quality, or that the user supplied it."""
    if not quality:
        return "SAE: user-supplied"
    q = quality
    dead = 100 * q["dead_fraction"] if finite(q.get("dead_fraction")) else None
    ce = f"{q['ce_delta']:+.3g}" if finite(q.get("ce_delta")) else MISSING
    return (f"default TopK SAE: FVU {fmt(q.get('fvu'))} on its training tokens, L0 {fmt(q.get('l0'))}, "
            f"dead {fmt(dead)}%, CE loss {ce} nats when spliced")


def header(run: RunFrames) -> Header:
    base = run.base
    return Header(str(run.path), str(base.get("n_probes", "?")), run.pairs.height, str(base.get("n_features", "?")),
                  fmt(base.get("lam")), sae_text(base.get("sae_quality")), warnings(run))


def warnings(run: RunFrames) -> tuple[str, ...]:
    """The base stage's quality and load warnings, then every output column left empty."""
    empty = run.manifest.get("stages", {}).get("pairs", {}).get("empty_columns") or []
    said = [f"pairs.parquet column '{c}' is empty for every pair" for c in empty]
    return tuple(run.base.get("warnings") or ()) + tuple(said)


def summary(run: RunFrames) -> Summary:
    """What the pairs did to the behaviour, in its own units, and how much the features carry."""
    pr = run.pairs
    by_label = pr.group_by("label").agg(
        pl.len().alias("pairs"), pl.col("dy_mean").mean().alias("mean_change"),
        pl.col("pred_dy_mean").mean().alias("mediated"), pl.col("direct_dy").mean().alias("direct"),
        pl.col("mediated_r2").median().alias("median_mediated_r2"),
        (pl.col("suspicion") > 0).sum().alias("contradicting_label"),
    ).sort("label")
    total_dy, total_med = float(pr["dy_mean"].sum()), float(pr["pred_dy_mean"].sum())
    share = total_med / total_dy if abs(total_dy) > ZERO_CHANGE else float("nan")
    by_cat = run.pair_behaviour.group_by("probe_group").agg(
        pl.col("dy_mean").mean().alias("mean_change"), pl.col("mediated_dy").mean().alias("mediated"),
        pl.col("direct_dy").mean().alias("direct")).sort("probe_group")
    by_cat = by_cat.with_columns((pl.col("mediated") / pl.col("mean_change")).alias("mediated_share"))
    return Summary(table(by_label), table(by_cat.rename({"probe_group": "probe category"})), share, fmt(share))


def curator(run: RunFrames) -> Table:
    """The pairs by suspicion, most suspicious first (ties by id, so the order is reproducible)."""
    cols = ["pair_id", "group", "label", "dy_mean", "pred_dy_mean", "suspicion", "suspicion_reason"]
    frame = run.pairs.sort(["suspicion", "pair_id"], descending=[True, False], nulls_last=True).select(cols)
    frame = frame.rename({"group": "category", "pred_dy_mean": "mediated", "suspicion_reason": "reason"})
    return table(frame, links=PAIR_LINK, tid="pairs-table", filterable=True)


def policy(run: RunFrames) -> PolicyView:
    """The policy's features by rank, with how much the pairs move each."""
    pol = run.policy.join(run.features.select("feature_id", "group"), on="feature_id").sort("rank")
    top = pol.head(25)
    bars = Bars(tuple(f"{f} · {lab or ''}" for f, lab in zip(top["feature_id"], top["label"])),
                tuple(float(c) for c in top["coef"]))
    moved = run.pair_features.group_by("feature_id").agg(pl.col("d_coef").abs().mean().alias("mean_abs_d_coef"),
                                                         pl.col("mediated_dy").sum().alias("mediated_total"))
    frame = pol.join(moved, on="feature_id", how="left").select(
        "feature_id", "label", "coef", "group", "mean_abs_d_coef", "mediated_total")
    return PolicyView(bars, table(frame, links=FEATURE_LINK, tid="features-table", filterable=True), top.height,
                      pol.height)


def top_scores(pairs: pl.DataFrame) -> pl.DataFrame:
    return (pairs.sort(["score", "pair_id"], descending=[True, False])
            .select("pair_id", "label", "score", "score_x", "score_y", "dy_mean").head(15))


def moved_features(pair_features: pl.DataFrame, k: int = 24) -> list:
    """The ``k`` features with the largest mean |d_coef| over pairs (ties by id)."""
    m = pair_features.group_by("feature_id").agg(pl.col("d_coef").abs().mean().alias("m"))
    return m.sort(["m", "feature_id"], descending=[True, False]).head(k)["feature_id"].to_list()


def alignment(run: RunFrames) -> AlignmentView:
    """SMDA's pair score: the two pathways per pair and the pair × feature alignment."""
    pr, pf = run.pairs, run.pair_features
    top = table(top_scores(pr), links=PAIR_LINK)
    if pf.height == 0:
        return AlignmentView(top, None, None, 0)
    scatter = Scatter(tuple(pr["score_x"].to_list()), tuple(pr["score_y"].to_list()), tuple(pr["label"].to_list()),
                      "ΔX pathway (Σ d_coef_x · coef)", "ΔY pathway (Σ d_coef_y · coef)")
    topf = moved_features(pf)
    order = pr.sort("group", "label", "pair_id")
    cell = {(p, f): a for p, f, a in pf.filter(pl.col("feature_id").is_in(topf))
            .select("pair_id", "feature_id", "alignment").iter_rows()}
    values = tuple(tuple(cell.get((p, f), 0.0) for f in topf) for p in order["pair_id"])
    heat = Heatmap(values, tuple(f"{g} · {p}" for g, p in zip(order["group"], order["pair_id"])),
                   tuple(str(f) for f in topf))
    return AlignmentView(top, scatter, heat, len(topf))


INTERFERENCE_COLUMNS = ("pair_id", "group", "label", "off_target_share", "off_target_chance", "off_target_p",
                        "interference_significant", "side_off_target_share", "side_off_target_chance",
                        "side_off_target_p", "side_interference_significant", "dominant_feature")


def interference(run: RunFrames) -> InterferenceView:
    """Pairs whose off-target share exceeds chance (by category or by side), and per pair group
    how often the dominant feature is not the intended one."""
    pr = run.pairs
    if "interference_significant" not in pr.columns:
        return InterferenceView(False)
    either = pl.col("interference_significant")
    side = 0
    if "side_interference_significant" in pr.columns:
        either = either | pl.col("side_interference_significant")
        side = pr.filter(pl.col("side_interference_significant")).height
    flagged = pr.filter(either).select([c for c in INTERFERENCE_COLUMNS if c in pr.columns])
    return InterferenceView(True, pr.filter(pl.col("interference_significant")).height, side, pr.height,
                            table(run.groups),
                            table(flagged.head(60), links=PAIR_LINK | {"dominant_feature": "feature"})
                            if flagged.height else None)


def lam_path(policy_json: dict) -> LinePath | None:
    """The GCV path from policy.json (None when the run has no grid)."""
    grid = [float(x) for x in policy_json.get("gcv_grid") or []]
    if not grid:
        return None
    score = [math.inf if s is None else float(s) for s in policy_json.get("gcv_score") or []]
    return LinePath(tuple(grid), tuple(score), float(policy_json["lam"]), "λ (log scale)", "GCV score")


def fidelity(run: RunFrames) -> FidelityView:
    """How well the policy fits: by probe category, held-out measures, the λ path."""
    flag, fid = run.behaviour.flag, run.base.get("fidelity", {})
    by_cat = run.probes.group_by("category", flag).agg(
        pl.len().alias("probes"), pl.col("y").mean().alias("mean_y"), pl.col("y_pred").mean().alias("mean_y_pred"),
    ).sort("category", flag)
    scalars = {k: x for k, x in fid.items() if isinstance(x, float)}
    measures = pl.DataFrame({"measure": list(scalars), "value": list(scalars.values())},
                            schema={"measure": pl.String, "value": pl.Float64})
    r2 = fid.get("r2_by_category", {})
    cats = pl.DataFrame({"probe category": list(r2), "held-out R²": list(r2.values())},
                        schema={"probe category": pl.String, "held-out R²": pl.Float64})
    return FidelityView(table(by_cat), lam_path(run.policy_json), table(measures), table(cats),
                        str(fid.get("folds", "?")), fmt(run.base.get("probe_fvu")))


def validation(run: RunFrames) -> ValidationView:
    """The tables `policytrace validate` wrote, where it ran."""
    lds = run.validation.select("method", "target", "lds", "ci_low", "ci_high", "subsets", "alpha") \
        if run.validation is not None else None
    removal = run.removal.drop("removed") if run.removal is not None else None
    return ValidationView(None if lds is None else table(lds), None if removal is None else table(removal),
                          None if run.planted is None else table(run.planted))


REPAIR_COLUMNS = {
    "repair": "repair", "method": "method", "pairs": "pairs", "probe_set": "probes",
    "finetune_change": "fine-tune's change", "moved_back": "moved back", "fraction_back": "share of the change",
    "controls_mean": "random: mean", "controls_sd": "random: sd", "controls_min": "random: min",
    "controls_max": "random: max", "ratio": "ratio to random", "finetuned_kept_loss": "kept-pair loss before",
    "kept_loss": "kept-pair loss after", "finetuned_heldout_loss": "held-out loss before",
    "heldout_loss": "held-out loss after",
}


def repairs(run: RunFrames) -> Table | None:
    """Each repair's move of the behaviour back towards the base model beside the band of its
    random controls (same method, same size, same categories), and what it cost."""
    if run.repairs is None:
        return None
    cols = [c for c in REPAIR_COLUMNS if c in run.repairs.columns]
    return table(run.repairs.select(cols).rename({c: REPAIR_COLUMNS[c] for c in cols}), floats=4)


LAYER_COLUMNS = {
    "layer": "layer", "n_features": "features", "r2_heldout": "policy held-out R²",
    "r2_mean_baseline": "mean baseline R²", "probe_fvu": "SAE FVU (probes)", "mediated_sum": "Σ mediated",
    "dy_sum": "Σ dy_mean", "mediated_share": "mediated share", "mediated_r2": "R² across pairs",
    "median_pair_r2": "median pair R²", "main": "main", "best": "best",
}


def layers(run: RunFrames) -> LayersView | None:
    """The mediation curve (layers.parquet), best and main layers named; None without one."""
    lay = run.layers
    if lay is None or lay.height == 0:
        return None
    lay = lay.sort("layer")
    facts = run.manifest.get("stages", {}).get("layers", {})
    best = lay.filter(pl.col("best"))
    main = lay.filter(pl.col("main"))

    def share(frame: pl.DataFrame) -> str:
        return fmt(frame["mediated_share"][0]) if frame.height else MISSING

    def series(col: str) -> tuple[float, ...]:
        return tuple(math.nan if v is None else float(v) for v in lay[col].to_list())

    curve = Curve(tuple(float(v) for v in lay["layer"]),
                  (("mediated share", series("mediated_share")), ("R² across pairs", series("mediated_r2")),
                   ("policy held-out R²", series("r2_heldout"))),
                  float(best["layer"][0]) if best.height else None, "decoder layer", "share / R²")
    cols = [c for c in LAYER_COLUMNS if c in lay.columns]
    named = facts.get("best_layer", best["layer"][0] if best.height else None)
    best_layer = MISSING if named is None else str(named)
    return LayersView(table(lay.select(cols).rename({c: LAYER_COLUMNS[c] for c in cols}), tid="layers-table"),
                      curve, best_layer, share(best), str(main["layer"][0]) if main.height else MISSING, share(main),
                      lay["median_pair_r2"].null_count() == lay.height)
