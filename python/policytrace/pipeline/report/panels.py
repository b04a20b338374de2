"""The report's drill-downs, as plain data: one panel per pair (``#pair-<id>``) and per policy
feature (``#feature-<id>``). Part of the view layer (:mod:`.view`); docs/design.md, module table.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .frames import RunFrames
from .tables import FEATURE_LINK, MISSING, PAIR_LINK, Bars, Link, Table, anchor, fmt, table


@dataclass(frozen=True)
class PairPanel:
    id: str
    anchor: str
    facts: tuple[tuple[str, str], ...]
    """(what, value) lines, in reading order."""
    dominant: Link | None
    prompt: str
    response: str
    trained: tuple[tuple[str, bool], ...]
    """The pair's chat tokens as text pieces, each with whether the loss trained on it (empty for
    a run folder written before the loss mask was recorded)."""
    trained_count: str
    turns: tuple[tuple[str, str, bool], ...]
    """A conversation's turns (role, content, trained?); empty for a flat prompt/response pair."""
    by_category: Table
    bars: Bars | None
    """The features the pair moves most (Δcoef·coef); None without per-feature shifts."""
    features: Table


@dataclass(frozen=True)
class Context:
    """One top-activating token in its window: (piece, activation, shade 0..1, is the token)."""

    where: str
    activation: str
    tokens: tuple[tuple[str, str, float, bool], ...]


@dataclass(frozen=True)
class FeaturePanel:
    id: str
    anchor: str
    facts: tuple[tuple[str, str], ...]
    top_probes: Table
    movers: Table
    lens: tuple[tuple[str, str], ...] = ()
    """The decoder direction's top output tokens through the unembedding, with their logits."""
    by_category: Table | None = None
    """Its mean activation per probe category and side."""
    contexts: tuple[Context, ...] = ()
    """Its top-activating token contexts over probes, pairs and the corpus."""


def _by(frame: pl.DataFrame, key: str) -> dict:
    """``frame`` split by ``key``: one pass instead of a filter per panel (240 pairs × K rows)."""
    return {k[0]: part for k, part in frame.partition_by(key, as_dict=True).items()}


def _largest(frame: pl.DataFrame, column: str, tie: str, n: int) -> pl.DataFrame:
    """The ``n`` rows of largest |column|; ties by ``tie`` so the page is reproducible."""
    return (frame.with_columns(pl.col(column).abs().alias("_abs"))
            .sort(["_abs", tie], descending=[True, False]).head(n).drop("_abs"))


def pair_facts(r: dict) -> tuple[tuple[str, str], ...]:
    """One pair's lines: label, suspicion, the measured change and its parts, SMDA's score and,
    where computed, its off-target share against chance."""
    facts = [
        ("mode", str(r.get("mode") or "engine")),
        ("label · category", f"{r['label']} · {r['group']}"),
        ("suspicion", f"{fmt(r.get('suspicion'))} — {r.get('suspicion_reason') or ''}"),
        ("behaviour change (dy_mean)", fmt(r["dy_mean"])),
        ("mediated / direct", f"{fmt(r['pred_dy_mean'])} / {fmt(r['direct_dy'])}"),
        ("mediated share · R²", f"{fmt(r['mediated_share'])} · {fmt(r['mediated_r2'])}"),
        ("SMDA score (x / y)", f"{fmt(r['score'])} ({fmt(r['score_x'])} / {fmt(r['score_y'])})"),
    ]
    if "off_target_chance" in r:
        significant = ", significant" if r.get("interference_significant") else ""
        facts.append(("off-target share vs chance", f"{fmt(r['off_target_share'])} vs {fmt(r['off_target_chance'])} "
                                                    f"(p {fmt(r['off_target_p'])}{significant})"))
    return tuple(facts)


def trained_tokens(d: dict) -> tuple[tuple[tuple[str, bool], ...], str]:
    """``pair_data``'s tokens with the loss mask over them, and "N of T tokens trained"."""
    pieces, mask = d.get("tokens") or [], d.get("loss_mask") or []
    if not pieces or len(pieces) != len(mask):
        return (), ""
    return tuple(zip(pieces, (bool(m) for m in mask))), f"{sum(bool(m) for m in mask)} of {len(mask)} tokens trained"


def conversation(d: dict) -> tuple[tuple[str, str, bool], ...]:
    """A chat pair's turns with the trained assistant turns marked (``train_turns`` indexes the
    messages); () for flat pairs."""
    msgs = d.get("messages") or []
    trained = set(d.get("train_turns") or [])
    return tuple((m.get("role", ""), m.get("content", ""), i in trained) for i, m in enumerate(msgs))


def pair_panels(run: RunFrames) -> tuple[PairPanel, ...]:
    """One panel per pair, in the order of pairs.parquet."""
    data = {r["id"]: r for r in run.pair_data.iter_rows(named=True)}
    pf = run.pair_features.join(run.features.select("feature_id", "label"), on="feature_id", how="left")
    feats_of, beh_of = _by(pf, "pair_id"), _by(run.pair_behaviour, "pair_id")
    out = []
    for r in run.pairs.iter_rows(named=True):
        pid = r["pair_id"]
        d = data.get(pid, {})
        feats = _largest(feats_of.get(pid, pf.clear()), "alignment", "feature_id", 12)
        bars = (Bars(tuple(f"{f} · {lab or ''}" for f, lab in zip(feats["feature_id"], feats["label"])),
                     tuple(float(a) for a in feats["alignment"])) if feats.height else None)
        per_cat = beh_of.get(pid, run.pair_behaviour.clear()).select("probe_group", "dy_mean", "mediated_dy",
                                                                    "direct_dy")
        dom = r.get("dominant_feature")
        out.append(PairPanel(
            str(pid), anchor("pair", pid), pair_facts(r),
            Link(str(dom), anchor("feature", dom)) if dom is not None else None,
            d.get("prompt") or "", d.get("response") or "", *trained_tokens(d), conversation(d), table(per_cat), bars,
            table(feats.select("feature_id", "label", "d_coef_x", "d_coef_y", "alignment", "mediated_dy"),
                  links=FEATURE_LINK)))
    return tuple(out)


def feature_facts(r: dict) -> tuple[tuple[str, str], ...]:
    coef = f"{r['coef']:.4g}" if r.get("coef") is not None else MISSING
    return (("label", str(r["label"] or "")), ("coefficient (rank)", f"{coef} ({r['rank']})"),
            ("group", str(r["group"])), ("selection score", fmt(r["score"])),
            ("active on probes", f"{r['n_active']} ({fmt(r['frac_active'])})"))


def top_probes(ids_text: str | None, probes: dict) -> Table:
    """A feature's top-activating probes (``top_probes`` is a comma-separated id list)."""
    ids = [i.strip() for i in (ids_text or "").split(",") if i.strip()]
    frame = pl.DataFrame({"probe": ids, "prompt": [probes.get(i, {}).get("prompt", "") for i in ids],
                          "y": [probes.get(i, {}).get("y") for i in ids]},
                         schema={"probe": pl.String, "prompt": pl.String, "y": pl.Float64})
    return table(frame)


def lens_pairs(r: dict) -> tuple[tuple[str, str], ...]:
    toks, logits = r.get("lens_tokens") or [], r.get("lens_logits") or []
    return tuple((t, f"{v:.3g}") for t, v in zip(toks, logits))


def category_table(r: dict) -> Table | None:
    rows = r.get("by_category")
    if not rows:
        return None
    frame = pl.DataFrame(rows, schema={"category": pl.String, "n": pl.Int64, "mean": pl.Float64,
                                       "mean_flagged": pl.Float64, "mean_unflagged": pl.Float64,
                                       "frac_active": pl.Float64})
    return table(frame)


def contexts_of(frame: pl.DataFrame | None) -> tuple[Context, ...]:
    if frame is None:
        return ()
    out = []
    for c in frame.sort("rank").iter_rows(named=True):
        acts = c["window_activations"] or []
        peak = max([c["activation"], *acts]) or 1.0
        centre = c["position"] - c["window_start"]
        toks = tuple((t, f"{a:.3g}", round(max(a, 0.0) / peak, 3), i == centre)
                     for i, (t, a) in enumerate(zip(c["window_tokens"], acts)))
        out.append(Context(f"{c['source']} {c['item_id']} · token {c['position']}", fmt(c["activation"]), toks))
    return tuple(out)


def feature_panels(run: RunFrames) -> tuple[FeaturePanel, ...]:
    """One panel per policy feature, in the order of features.parquet."""
    pol = run.policy.select("feature_id", "coef", "coef_raw", "rank")
    probes = {r["id"]: r for r in run.probes.iter_rows(named=True)}
    pf = run.pair_features.join(run.pairs.select("pair_id", "label"), on="pair_id", how="left")
    movers_of = _by(pf, "feature_id")
    contexts = _by(run.feature_contexts, "feature_id") if run.feature_contexts is not None else {}
    out = []
    for r in run.features.join(pol, on="feature_id").iter_rows(named=True):
        fid = r["feature_id"]
        movers = _largest(movers_of.get(fid, pf.clear()), "d_coef", "pair_id", 10).select(
            "pair_id", "label", "d_coef_x", "d_coef_y", "alignment", "mediated_dy")
        out.append(FeaturePanel(str(fid), anchor("feature", fid), feature_facts(r),
                                top_probes(r["top_probes"], probes), table(movers, links=PAIR_LINK),
                                lens_pairs(r), category_table(r), contexts_of(contexts.get(fid))))
    return tuple(out)
