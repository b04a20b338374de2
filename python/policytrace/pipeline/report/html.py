"""``report.html``: one self-contained, offline page for a run folder (inline SVG, no scripts).

Each section is a function of the run's frames; the page is their concatenation. Wording comes
from the run's behaviour (``policytrace.behaviours``), never spelled here.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ...behaviours import Behaviour, get as get_behaviour
from ..rundir import RunDir
from . import svg

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:left}
th{background:#f6f6f6} .num{text-align:right;font-variant-numeric:tabular-nums} .muted{color:#777;font-size:.85rem}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1.5rem} .card{background:#fafafa;border:1px solid #eee;padding:.8rem 1rem;border-radius:6px}
.flag{color:#b00020;font-weight:600}
"""


def esc(x) -> str:
    return html.escape(str(x))


def table(frame: pl.DataFrame, floats: int = 4) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for r in frame.iter_rows():
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append(f"<td class=num>{v:.{floats}g}</td>")
            elif isinstance(v, bool):
                cells.append(f"<td>{'<span class=flag>yes</span>' if v else 'no'}</td>")
            else:
                cells.append(f"<td>{esc(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


@dataclass(frozen=True)
class RunView:
    """What the report reads from a finished run folder."""

    rd: RunDir
    manifest: dict
    behaviour: Behaviour
    policy: pl.DataFrame
    features: pl.DataFrame
    probes: pl.DataFrame
    pairs: pl.DataFrame
    pair_features: pl.DataFrame

    @property
    def base(self) -> dict:
        return self.manifest.get("stages", {}).get("base", {})

    def optional(self, name: str) -> pl.DataFrame | None:
        return self.rd.read_parquet(name) if self.rd.file(name).exists() else None


def open_run(run_dir: str | Path) -> RunView:
    rd = RunDir(run_dir)
    manifest = rd.complete()
    behaviour = get_behaviour(manifest.get("stages", {}).get("base", {}).get("behaviour", "refusal"))
    return RunView(rd, manifest, behaviour, *(rd.read_parquet(f"{n}.parquet") for n in
                                              ("policy", "features", "probes", "pairs", "pair_features")))


def _lam_path(v: RunView) -> str:
    if not v.rd.file("policy.json").exists():
        return ""
    pj = v.rd.read_json("policy.json")
    grid = np.array(pj.get("gcv_grid") or [], dtype=float)
    score = np.array([np.inf if s is None else s for s in (pj.get("gcv_score") or [])], dtype=float)
    return svg.line(grid, score, pj["lam"], "λ (log scale)", "GCV score") if len(grid) else ""


def _validation(v: RunView) -> str:
    out = ""
    val = v.optional("validation.parquet")
    if val is not None:
        val = val.select("method", "target", "lds", "ci_low", "ci_high", "subsets", "alpha")
        out += ("<h2>Validation against retraining</h2><p class=muted>LDS: Spearman correlation, over random subsets "
                "of the pairs really fine-tuned on, between the measured shift and the sum of each method's per-pair "
                "scores (95 % bootstrap interval). See docs/validation.md for the methods.</p>" + table(val, 3))
    rem = v.optional("removal.parquet")
    if rem is not None:
        out += ("<h3>Top-k removal</h3><p class=muted>Drop of the shift when retraining without each method's top-k "
                "pairs, against removing category-matched random pairs.</p>" + table(rem.drop("removed"), 3))
    agg = v.optional("aggregates.parquet")
    if agg is not None:
        agg_v = agg.filter(pl.col("by") == "category").pivot(on="method", index="group", values="mean_z")
        out += "<h3>Scores by pair category (mean z-score within each method)</h3>" + table(agg_v, 2)
    planted = v.optional("planted.parquet")
    if planted is not None:
        out += (f"<h3>Planted mislabeled pairs</h3><p class=muted>Detection of {esc(v.behaviour.planted_text)} "
                "(AUC, precision at k = number planted).</p>" + table(planted, 3))
    return out


def _quality_text(v: RunView) -> str:
    q = v.base.get("sae_quality") or {}
    if not q:
        return "SAE: user-supplied"
    return (f"SAE quality (default TopK SAE): FVU {q.get('fvu', float('nan')):.3f}, L0 {q.get('l0', float('nan')):.1f}, "
            f"dead {100 * q.get('dead_fraction', float('nan')):.1f}%, CE loss +{q.get('ce_delta', float('nan')):.3f} nats "
            "when spliced")


def _heat(v: RunView) -> tuple[str, int]:
    pf, pairs = v.pair_features, v.pairs
    topf = (pf.group_by("feature_id").agg(pl.col("d_coef").abs().mean().alias("m"))
            .sort("m", descending=True).head(24)["feature_id"].to_list())
    order = pairs.sort("group", "label", "pair_id")
    sub = pf.filter(pl.col("feature_id").is_in(topf))
    piv = {(a, b): c for a, b, c in sub.select("pair_id", "feature_id", "alignment").iter_rows()}
    mat = np.array([[piv.get((p, f), 0.0) for f in topf] for p in order["pair_id"].to_list()])
    rows = [f"{g} · {p}" for g, p in zip(order["group"], order["pair_id"])]
    return svg.heatmap(mat, rows, [str(f) for f in topf]), len(topf)


def _sections(v: RunView) -> str:
    b, pairs, features = v.behaviour, v.pairs, v.features
    pol = v.policy.join(features.select("feature_id", "group", "top_probes"), on="feature_id").sort("rank").head(25)
    bars = svg.bars([f"{r['feature_id']} · {r['label'] or ''}" for r in pol.iter_rows(named=True)], pol["coef"].to_numpy())
    fid = v.base.get("fidelity", {})
    scatter = svg.scatter(pairs["score_x"].to_numpy(), pairs["score_y"].to_numpy(), pairs["label"].to_list(),
                          "ΔX pathway (Σ d_coef_x · coef)", "ΔY pathway (Σ d_coef_y · coef)")
    heat, n_top = _heat(v)
    by_cat = v.probes.group_by("category", b.flag).agg(
        pl.len().alias("probes"), pl.col("y").mean().alias("mean_y"), pl.col("y_pred").mean().alias("mean_y_pred"),
    ).sort("category", b.flag)
    agg = pairs.group_by("group", "label").agg(
        pl.len().alias("pairs"), pl.col("score").mean().alias("mean_score"), pl.col("dy_mean").mean().alias("mean_dy"),
        pl.col("interference").mean().alias("interference_rate"),
    ).sort("group", "label")
    inter = pairs.filter(pl.col("interference")).join(
        features.select(pl.col("feature_id").alias("dominant_feature"), pl.col("label").alias("dominant_label")),
        on="dominant_feature", how="left").select("pair_id", "group", "label", "dominant_feature", "dominant_group",
                                                  "off_target_share", "dominant_label").sort("off_target_share", descending=True)
    topp = pairs.sort("score", descending=True).select("pair_id", "group", "label", "score", "score_x", "score_y",
                                                       "dy_mean", "pred_dy_mean").head(15)
    fid_rows = "".join(f"<tr><td>{esc(k)}</td><td class=num>{x:.3f}</td></tr>" for k, x in fid.items() if isinstance(x, float))
    fid_cats = "".join(f"<tr><td>{esc(k)}</td><td class=num>{'–' if x is None else f'{x:.3f}'}</td></tr>"
                       for k, x in fid.get("r2_by_category", {}).items())
    pos, neg = b.sides
    return f"""<h2>The policy</h2>
<p class=muted>Top {pol.height} features by |coef| (standardized units); red {esc(b.raise_word)}. Label: the feature's group (probe category where it is most active) and its top-activating probe.</p>
{bars}
<h2>Fidelity</h2>
<p class=muted>{esc(b.score_name.capitalize())} by probe category ({esc(b.score_meaning)}; y_pred = the policy's fit).</p>
{table(by_cat)}
<div class=grid><div>{_lam_path(v)}</div><div class=muted>The regularization path: generalized cross-validation score of the ridge policy over the λ grid; the dashed line is the λ used.</div></div>
<div class=grid><table>{fid_rows}</table><table><tr><th>probe category</th><th>held-out R²</th></tr>{fid_cats}</table></div>
<p class=muted>{fid.get('folds', '?')}-fold cross-validation with the policy's λ. r2_heldout against r2_mean_baseline (predicting the training mean);
auc_heldout_{esc(b.flag)}: does the held-out prediction rank {esc(pos)} probes above {esc(neg)} ones (0.5 = chance), beside the same for the measured score;
accuracy_heldout: a threshold on the predicted score (fit on the training folds) classifying {esc(pos)} vs {esc(neg)}, against always answering the larger class.</p>
<h2>Pathways per pair</h2>
<div class=grid><div>{scatter}</div><div class=card>{table(topp)}</div></div>
<h2>Pair × feature alignment</h2>
<p class=muted>Δcoef·coef for the {n_top} features moved most; rows are pairs grouped by category and label; red aligns with the policy, blue opposes it.</p>
{heat}
<h2>By category</h2>
{table(agg)}
<h2>Interference</h2>
<p class=muted>Pairs whose largest coefficient shift lands on a feature of another category ({inter.height} of {pairs.height}).</p>
{table(inter.head(40))}
{_validation(v)}"""


def render(v: RunView) -> str:
    b, base = v.behaviour, v.base
    config = v.rd.file("config.toml").read_text() if v.rd.file("config.toml").exists() else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>policytrace report</title><style>{CSS}</style></head><body>
<h1>policytrace report</h1>
<p class=muted>{esc(v.rd.path.resolve())} · {esc(b.name)} · {base.get('n_probes', '?')} probes · {v.pairs.height} pairs · {base.get('n_features', '?')} features · λ = {base.get('lam', float('nan')):.4g} · {esc(_quality_text(v))}</p>
<p>Each training pair's update shifts the <b>symbolic policy</b> — a ridge regression of the behaviour score
({esc(b.score_meaning)}) on SAE features. A pair's <b>score</b> is Σ<sub>k</sub> Δcoef<sub>k</sub>·coef<sub>k</sub>:
positive means the update pushes the policy further the way it already points (not that the behaviour rose everywhere;
see Δy). The ΔX pathway is the part due to changed feature activations, ΔY the part due to changed behaviour scores.</p>
{_sections(v)}
<h2>Configuration</h2><pre>{esc(config)}</pre>
</body></html>"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` for a finished run; returns its path."""
    v = open_run(run_dir)
    v.rd.write("report.html", render(v))
    return v.rd.file("report.html")


__all__ = ["write_report"]
