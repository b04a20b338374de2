"""The report's sections and drill-down panels, each a function of the run (:class:`RunView`)."""

from __future__ import annotations

import numpy as np
import polars as pl

from . import svg
from .html import RunView, esc, fmt, slug, table

PAIR_LINK = {"pair_id": "pair"}
FEATURE_LINK = {"feature_id": "feature", "dominant_feature": "feature"}


def warnings(v: RunView) -> str:
    items = v.base.get("warnings") or []
    if not items:
        return ""
    return "".join(f"<div class=warn><b>Check this before trusting the attributions:</b> {esc(w)}.</div>" for w in items)


def summary(v: RunView) -> str:
    """What the pairs did to the behaviour, in its own units, and how much the features carry."""
    b, pr = v.behaviour, v.pairs
    by_label = pr.group_by("label").agg(
        pl.len().alias("pairs"), pl.col("dy_mean").mean().alias("mean_change"),
        pl.col("pred_dy_mean").mean().alias("mediated"), pl.col("direct_dy").mean().alias("direct"),
        pl.col("mediated_r2").median().alias("median_mediated_r2"),
        (pl.col("suspicion") > 0).sum().alias("contradicting_label"),
    ).sort("label")
    total_dy, total_med = float(pr["dy_mean"].sum()), float(pr["pred_dy_mean"].sum())
    share = total_med / total_dy if abs(total_dy) > 1e-12 else float("nan")
    by_cat = v.pair_behaviour.group_by("probe_group").agg(
        pl.col("dy_mean").mean().alias("mean_change"), pl.col("mediated_dy").mean().alias("mediated"),
        pl.col("direct_dy").mean().alias("direct")).sort("probe_group")
    by_cat = by_cat.with_columns((pl.col("mediated") / pl.col("mean_change")).alias("mediated_share"))
    return f"""<h2 id=summary>What the pairs did to the {esc(b.score_name)}</h2>
<p>Each pair's one update changes the {esc(b.score_name)} ({esc(b.score_meaning)}) on the probes by
<b>dy_mean</b> (measured). <b>mediated</b> is the part the policy's SAE features carry (Σ<sub>k</sub> β<sub>k</sub>·mean ΔZ<sub>k</sub>,
same units), <b>direct</b> the rest. Over all pairs the features carry {fmt(share)} of the summed change
(Σ mediated / Σ dy_mean); <b>mediated_r2</b> says how well they match the change probe by probe (≤ 0: not at all).</p>
<div class=grid><div>{table(by_label)}</div><div>{table(by_cat.rename({"probe_group": "probe category"}))}</div></div>"""


def curator(v: RunView) -> str:
    cols = ["pair_id", "group", "label", "dy_mean", "pred_dy_mean", "suspicion", "suspicion_reason"]
    frame = v.pairs.sort("suspicion", descending=True, nulls_last=True).select(cols).rename(
        {"group": "category", "pred_dy_mean": "mediated", "suspicion_reason": "reason"})
    widths = {"pair_id": "9%", "category": "12%", "label": "9%", "dy_mean": "7%", "mediated": "7%",
              "suspicion": "7%", "reason": "49%"}
    return f"""<h2 id=curator>The curator's ranking</h2>
<p><b>suspicion</b>: how strongly the pair's measured effect contradicts what its label intends
({esc(v.behaviour.lowering_label)} pairs that raise the score, {esc(v.behaviour.raising_label)} pairs that lower it),
in units of the pairs' robust spread; above 0 the pair works against its label. <code>policytrace curate RUN_DIR --drop K
--out FILE</code> writes the pair file without the top K. Click a pair for its drill-down.</p>
{table(frame, tid="pairs-table", links=PAIR_LINK, widths=widths, filterable=True)}"""


def alignment(v: RunView) -> tuple[str, int]:
    pr, pf = v.pairs, v.pair_features
    if pf.height == 0:
        top = pr.sort("score", descending=True).select("pair_id", "label", "score", "score_x", "score_y", "dy_mean").head(15)
        return (f"<h2 id=alignment>Policy alignment (SMDA's pair score)</h2><p class=muted>Per-feature shifts were not "
                f"computed (gradient mode without gradient.per_feature); the pair scores:</p>{table(top, links=PAIR_LINK)}", 0)
    scatter = svg.scatter(pr["score_x"].to_numpy(), pr["score_y"].to_numpy(), pr["label"].to_list(),
                          "ΔX pathway (Σ d_coef_x · coef)", "ΔY pathway (Σ d_coef_y · coef)")
    top = pr.sort("score", descending=True).select("pair_id", "label", "score", "score_x", "score_y", "dy_mean").head(15)
    topf = (pf.group_by("feature_id").agg(pl.col("d_coef").abs().mean().alias("m"))
            .sort("m", descending=True).head(24)["feature_id"].to_list())
    order = pr.sort("group", "label", "pair_id")
    piv = {(a, b): c for a, b, c in pf.filter(pl.col("feature_id").is_in(topf))
           .select("pair_id", "feature_id", "alignment").iter_rows()}
    mat = np.array([[piv.get((p, f), 0.0) for f in topf] for p in order["pair_id"].to_list()])
    heat = svg.heatmap(mat, [f"{g} · {p}" for g, p in zip(order["group"], order["pair_id"])], [str(f) for f in topf])
    text = f"""<h2 id=alignment>Policy alignment (SMDA's pair score)</h2>
<p>A pair's <b>score</b> = Σ<sub>k</sub> Δcoef<sub>k</sub>·coef<sub>k</sub> (the paper's ΔW·W): positive when the update pushes the
symbolic policy further the way it already points. It measures alignment with the policy, not the behaviour change itself
(see dy_mean above; docs/validation.md compares both against retraining). The ΔX pathway is the part due to changed
feature activations, ΔY the part due to changed scores.</p>
<div class=grid><div>{scatter}</div><div>{table(top, links=PAIR_LINK)}</div></div>
<h3>Pair × feature alignment</h3><p class=muted>Δcoef·coef for the {len(topf)} features moved most; rows are pairs by category and label; red aligns with the policy, blue opposes it.</p>
{heat}"""
    return text, len(topf)


def policy(v: RunView) -> str:
    b = v.behaviour
    pol = v.policy.join(v.features.select("feature_id", "group"), on="feature_id").sort("rank")
    bars = svg.bars([f"{r['feature_id']} · {r['label'] or ''}" for r in pol.head(25).iter_rows(named=True)],
                    pol.head(25)["coef"].to_numpy())
    moved = v.pair_features.group_by("feature_id").agg(pl.col("d_coef").abs().mean().alias("mean_abs_d_coef"),
                                                       pl.col("mediated_dy").sum().alias("mediated_total"))
    frame = pol.join(moved, on="feature_id", how="left").select(
        "feature_id", "label", "coef", "group", "mean_abs_d_coef", "mediated_total")
    widths = {"feature_id": "9%", "label": "45%", "coef": "9%", "group": "15%", "mean_abs_d_coef": "11%",
              "mediated_total": "11%"}
    return f"""<h2 id=policy>The policy</h2>
<p class=muted>Top {min(25, pol.height)} of {pol.height} features by |coef| (standardized units); red {esc(b.raise_word)}.
Label: the feature's group (probe category where it is most active) and its top-activating probe. Click a feature for its drill-down.</p>
{bars}
{table(frame, tid="features-table", links=FEATURE_LINK, widths=widths, filterable=True)}"""


def fidelity(v: RunView) -> str:
    b, fid = v.behaviour, v.base.get("fidelity", {})
    by_cat = v.probes.group_by("category", b.flag).agg(
        pl.len().alias("probes"), pl.col("y").mean().alias("mean_y"), pl.col("y_pred").mean().alias("mean_y_pred"),
    ).sort("category", b.flag)
    rows = pl.DataFrame({"measure": [k for k, x in fid.items() if isinstance(x, float)],
                         "value": [x for x in fid.values() if isinstance(x, float)]})
    cats = pl.DataFrame({"probe category": list(fid.get("r2_by_category", {})),
                         "held-out R²": list(fid.get("r2_by_category", {}).values())}, strict=False)
    pos, neg = b.sides
    return f"""<h2 id=fidelity>Fidelity</h2>
<p class=muted>{esc(b.score_name.capitalize())} by probe category ({esc(b.score_meaning)}; y_pred = the policy's fit).</p>
{table(by_cat)}
<div class=grid><div>{_lam_path(v)}</div><div class=muted>The regularization path: generalized cross-validation score of the ridge policy over the λ grid; the dashed line is the λ used.</div></div>
<div class=grid><div>{table(rows)}</div><div>{table(cats)}</div></div>
<p class=muted>{fid.get('folds', '?')}-fold cross-validation with the policy's λ. r2_heldout against r2_mean_baseline (predicting the training mean);
accuracy_heldout_high_y: the held-out prediction telling probes above the training median score from the rest, against the majority class;
auc_heldout_{esc(b.flag)}: does the held-out prediction rank {esc(pos)} probes above {esc(neg)} ones (0.5 = chance), beside the same for the measured score;
accuracy_heldout: a threshold on the prediction classifying {esc(pos)} vs {esc(neg)}, against always answering the larger class.
SAE FVU on the pooled probe activations: {fmt(v.base.get('probe_fvu'))}.</p>"""


def _lam_path(v: RunView) -> str:
    if not v.rd.file("policy.json").exists():
        return ""
    pj = v.rd.read_json("policy.json")
    grid = np.array(pj.get("gcv_grid") or [], dtype=float)
    score = np.array([np.inf if s is None else s for s in (pj.get("gcv_score") or [])], dtype=float)
    return svg.line(grid, score, pj["lam"], "λ (log scale)", "GCV score") if len(grid) else ""


def interference(v: RunView) -> str:
    g, pr, b = v.groups, v.pairs, v.behaviour
    if "interference_significant" not in pr.columns:
        return ("<h2 id=interference>Interference, against chance</h2><p class=muted>Not computed: this run has no "
                "per-feature shifts (gradient mode without <code>gradient.per_feature = true</code>).</p>")
    sig = pr.filter(pl.col("interference_significant")).height
    side_sig = pr.filter(pl.col("side_interference_significant")).height if "side_interference_significant" in pr.columns else 0
    cols = [c for c in ("pair_id", "group", "label", "off_target_share", "off_target_chance", "off_target_p",
                        "interference_significant", "side_off_target_share", "side_off_target_chance", "side_off_target_p",
                        "side_interference_significant", "dominant_feature") if c in pr.columns]
    either = pl.col("interference_significant")
    if "side_interference_significant" in pr.columns:
        either = either | pl.col("side_interference_significant")
    flagged = pr.filter(either).select(cols)
    return f"""<h2 id=interference>Interference, against chance</h2>
<p>A pair's intended features are those of its own probe category (or, second grouping, its own {esc(pos_neg(b))} side).
Its <b>off-target share</b> (Σ|d_coef| on other features / Σ|d_coef|) is compared with the share expected if feature groups
were assigned at random (<b>off_target_chance</b> = 1 − m/K, with m of the K features in its group), by a permutation test;
a pair is flagged only when the excess is significant after Benjamini–Hochberg at 5 % across pairs:
{sig} of {pr.height} pairs by category, {side_sig} by side. Per pair group below: how often the dominant feature is not intended,
against its chance rate (binomial test).</p>
{table(g)}
{table(flagged.head(60), links=PAIR_LINK | {"dominant_feature": "feature"}) if flagged.height else "<p class=muted>No pair interferes beyond chance.</p>"}"""


def pos_neg(b) -> str:
    return f"{b.sides[0]}/{b.sides[1]}"


def validation(v: RunView) -> str:
    out = ""
    val = v.optional("validation.parquet")
    if val is not None:
        out += ("<h2 id=validation>Validation against retraining</h2><p class=muted>LDS: Spearman correlation, over random "
                "subsets of the pairs really fine-tuned on, between the measured shift and the sum of each method's per-pair "
                "scores (95 % bootstrap interval). See docs/validation.md for the methods.</p>"
                + table(val.select("method", "target", "lds", "ci_low", "ci_high", "subsets", "alpha")))
    rem = v.optional("removal.parquet")
    if rem is not None:
        out += ("<h3>Top-k removal</h3><p class=muted>Drop of the shift when retraining without each method's top-k pairs, "
                "against removing category-matched random pairs.</p>" + table(rem.drop("removed")))
    planted = v.optional("planted.parquet")
    if planted is not None:
        out += (f"<h3>Planted mislabeled pairs</h3><p class=muted>Detection of {esc(v.behaviour.planted_text)} "
                "(AUC, precision at k = number planted).</p>" + table(planted))
    return out


def pair_panels(v: RunView) -> str:
    data = {r["id"]: r for r in v.pair_data.iter_rows(named=True)}
    fl = v.features.select("feature_id", "label")
    pf = v.pair_features.join(fl, on="feature_id", how="left")
    beh = v.pair_behaviour
    out = []
    for r in v.pairs.iter_rows(named=True):
        pid = r["pair_id"]
        d = data.get(pid, {})
        feats = (pf.filter(pl.col("pair_id") == pid).with_columns(pl.col("alignment").abs().alias("_a"))
                 .sort("_a", descending=True).head(12))
        bars = (svg.bars([f"{f} · {lab or ''}" for f, lab in zip(feats["feature_id"], feats["label"])],
                         feats["alignment"].to_numpy(), width=520, pad=250, chars=40)
                if feats.height else "<p class=muted>no per-feature shifts in this run</p>")
        per_cat = beh.filter(pl.col("pair_id") == pid).select("probe_group", "dy_mean", "mediated_dy", "direct_dy")
        kv = {
            "mode": r.get("mode", "engine"),
            "label · category": f"{r['label']} · {r['group']}", "suspicion": f"{fmt(r.get('suspicion'))} — {r.get('suspicion_reason', '')}",
            "behaviour change (dy_mean)": fmt(r["dy_mean"]), "mediated / direct": f"{fmt(r['pred_dy_mean'])} / {fmt(r['direct_dy'])}",
            "mediated share · R²": f"{fmt(r['mediated_share'])} · {fmt(r['mediated_r2'])}",
            "SMDA score (x / y)": f"{fmt(r['score'])} ({fmt(r['score_x'])} / {fmt(r['score_y'])})",
        }
        if "off_target_chance" in r:
            kv["off-target share vs chance"] = (f"{fmt(r['off_target_share'])} vs {fmt(r['off_target_chance'])} "
                                                f"(p {fmt(r['off_target_p'])}{', significant' if r['interference_significant'] else ''})")
        dom = r.get("dominant_feature")
        kv_html = "".join(f"<div>{esc(k)}</div><div>{esc(x) if k != 'behaviour change (dy_mean)' else x}</div>" for k, x in kv.items())
        dom_link = f'<a href="#feature-{slug(dom)}">{esc(dom)}</a>' if dom is not None else "–"
        out.append(f"""<section class=panel id="pair-{slug(pid)}"><h3>Pair {esc(pid)}</h3>
<div class=kv>{kv_html}<div>dominant feature</div><div>{dom_link}</div></div>
<p class=muted>Prompt</p><div class=text>{esc(d.get('prompt', ''))}</div>
<p class=muted>Response</p><div class=text>{esc(d.get('response', ''))}</div>
<div class=grid><div><h3>Behaviour change by probe category</h3>{table(per_cat)}</div>
<div><h3>Pathways: the features it moves most (Δcoef·coef)</h3>{bars}</div></div>
{table(feats.select("feature_id", "label", "d_coef_x", "d_coef_y", "alignment", "mediated_dy"), links=FEATURE_LINK)}
<p class=muted><a href="#curator">back to the ranking</a></p></section>""")
    return "".join(out)


def feature_panels(v: RunView) -> str:
    pol = v.policy.select("feature_id", "coef", "coef_raw", "rank")
    probes = {r["id"]: r for r in v.probes.iter_rows(named=True)}
    pf = v.pair_features.join(v.pairs.select("pair_id", "label"), on="pair_id", how="left")
    out = []
    for r in v.features.join(pol, on="feature_id").iter_rows(named=True):
        fid = r["feature_id"]
        ids = [i.strip() for i in (r["top_probes"] or "").split(",") if i.strip()]
        tops = pl.DataFrame({"probe": ids, "prompt": [probes.get(i, {}).get("prompt", "") for i in ids],
                             "y": [probes.get(i, {}).get("y") for i in ids]}, strict=False)
        movers = (pf.filter(pl.col("feature_id") == fid).with_columns(pl.col("d_coef").abs().alias("_m"))
                  .sort("_m", descending=True).head(10).select("pair_id", "label", "d_coef_x", "d_coef_y", "alignment",
                                                                "mediated_dy"))
        kv = {"label": r["label"], "coefficient (rank)": f"{r['coef']:.4g} ({r['rank']})", "group": r["group"],
              "selection score": fmt(r["score"]), "active on probes": f"{r['n_active']} ({fmt(r['frac_active'])})"}
        kv_html = "".join(f"<div>{esc(k)}</div><div>{esc(x)}</div>" for k, x in kv.items())
        out.append(f"""<section class=panel id="feature-{slug(fid)}"><h3>Feature {esc(fid)}</h3>
<div class=kv>{kv_html}</div>
<h3>Top-activating probes</h3>{table(tops, widths={"probe": "14%", "prompt": "72%", "y": "14%"})}
<h3>Pairs that move it most (ΔX and ΔY parts)</h3>{table(movers, links=PAIR_LINK)}
<p class=muted><a href="#policy">back to the policy</a></p></section>""")
    return "".join(out)
