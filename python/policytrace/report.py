"""``report.html``: one self-contained, offline page for a run folder (inline SVG, no scripts)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import polars as pl

from .errors import InvalidValueError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:left}
th{background:#f6f6f6} .num{text-align:right;font-variant-numeric:tabular-nums} .muted{color:#777;font-size:.85rem}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1.5rem} .card{background:#fafafa;border:1px solid #eee;padding:.8rem 1rem;border-radius:6px}
.flag{color:#b00020;font-weight:600}
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _table(frame: pl.DataFrame, floats: int = 4) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    rows = []
    for r in frame.iter_rows():
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append(f"<td class=num>{v:.{floats}g}</td>")
            elif isinstance(v, bool):
                cells.append(f"<td>{'<span class=flag>yes</span>' if v else 'no'}</td>")
            else:
                cells.append(f"<td>{_esc(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _bars(labels: list[str], values: np.ndarray, width: int = 1000) -> str:
    h, pad = 18, 420
    top = float(np.abs(values).max()) or 1.0
    mid = pad + (width - pad) / 2
    half = (width - pad) / 2 - 60
    out = [f'<svg width="{width}" height="{h * len(values) + 20}" role="img">']
    out.append(f'<line x1="{mid}" y1="0" x2="{mid}" y2="{h * len(values)}" stroke="#999"/>')
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = i * h
        w = abs(v) / top * half
        x = mid if v >= 0 else mid - w
        color = "#c0392b" if v > 0 else "#2471a3"
        out.append(f'<text x="0" y="{y + 13}" font-size="11">{_esc(lab[:70])}</text>')
        out.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{h - 6}" fill="{color}"/>')
        out.append(f'<text x="{(mid + w + 4) if v >= 0 else (mid - w - 4):.1f}" y="{y + 13}" font-size="10" '
                   f'text-anchor="{"start" if v >= 0 else "end"}">{v:.3g}</text>')
    out.append("</svg>")
    return "".join(out)


def _scatter(x: np.ndarray, y: np.ndarray, groups: list[str], title_x: str, title_y: str, size: int = 460) -> str:
    palette = ["#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#f1c40f"]
    levels = sorted(set(groups))
    pad = 50
    lim = float(max(np.abs(x).max(initial=0), np.abs(y).max(initial=0))) or 1.0

    def sx(v):
        return pad + (v / lim + 1) / 2 * (size - 2 * pad)

    def sy(v):
        return size - pad - (v / lim + 1) / 2 * (size - 2 * pad)

    out = [f'<svg width="{size + 160}" height="{size}" role="img">',
           f'<line x1="{sx(-lim)}" y1="{sy(0)}" x2="{sx(lim)}" y2="{sy(0)}" stroke="#bbb"/>',
           f'<line x1="{sx(0)}" y1="{sy(-lim)}" x2="{sx(0)}" y2="{sy(lim)}" stroke="#bbb"/>',
           f'<text x="{size / 2}" y="{size - 10}" font-size="12" text-anchor="middle">{_esc(title_x)}</text>',
           f'<text x="14" y="{size / 2}" font-size="12" transform="rotate(-90 14 {size / 2})" text-anchor="middle">{_esc(title_y)}</text>',
           f'<text x="{pad}" y="20" font-size="10" fill="#777">axes: ±{lim:.3g}</text>']
    for xi, yi, g in zip(x, y, groups):
        c = palette[levels.index(g) % len(palette)]
        out.append(f'<circle cx="{sx(xi):.1f}" cy="{sy(yi):.1f}" r="4" fill="{c}" fill-opacity=".75"><title>{_esc(g)}</title></circle>')
    for i, g in enumerate(levels):
        c = palette[i % len(palette)]
        out.append(f'<circle cx="{size + 10}" cy="{30 + 18 * i}" r="5" fill="{c}"/>'
                   f'<text x="{size + 20}" y="{34 + 18 * i}" font-size="11">{_esc(g)}</text>')
    out.append("</svg>")
    return "".join(out)


def _heatmap(mat: np.ndarray, rows: list[str], cols: list[str], cell: int = 14) -> str:
    top = float(np.abs(mat).max()) or 1.0
    left, head = 150, 70
    out = [f'<svg width="{left + cell * len(cols) + 10}" height="{head + cell * len(rows) + 10}" role="img">']
    for j, c in enumerate(cols):
        x = left + j * cell + cell / 2
        out.append(f'<text x="{x}" y="{head - 4}" font-size="9" transform="rotate(-60 {x} {head - 4})">{_esc(c)}</text>')
    for i, r in enumerate(rows):
        y = head + i * cell
        out.append(f'<text x="0" y="{y + cell - 3}" font-size="9">{_esc(r[:26])}</text>')
        for j in range(len(cols)):
            v = mat[i, j] / top
            color = f"rgb(255,{int(255 * (1 - v))},{int(255 * (1 - v))})" if v >= 0 else f"rgb({int(255 * (1 + v))},{int(255 * (1 + v))},255)"
            out.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="{color}"><title>{mat[i, j]:.3g}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _line(xs: np.ndarray, ys: np.ndarray, mark: float, title_x: str, title_y: str, w: int = 460, h: int = 220) -> str:
    """A log-x line plot (the GCV λ path), with the chosen λ marked."""
    ok = np.isfinite(ys)
    if ok.sum() < 2:
        return "<p class=muted>(λ was given; no GCV path)</p>"
    lx, yv = np.log10(xs[ok]), ys[ok]
    pad = 45

    def sx(v):
        return pad + (v - lx.min()) / (lx.max() - lx.min() or 1) * (w - 2 * pad)

    def sy(v):
        return h - pad - (v - yv.min()) / (yv.max() - yv.min() or 1) * (h - 2 * pad)

    pts = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(lx, yv))
    m = np.log10(mark)
    return (f'<svg width="{w}" height="{h}" role="img"><polyline points="{pts}" fill="none" stroke="#2471a3" stroke-width="2"/>'
            f'<line x1="{sx(m):.1f}" y1="{pad / 2}" x2="{sx(m):.1f}" y2="{h - pad}" stroke="#c0392b" stroke-dasharray="4"/>'
            f'<text x="{sx(m) + 4:.1f}" y="{pad / 2 + 10}" font-size="11" fill="#c0392b">λ = {mark:.3g}</text>'
            f'<text x="{w / 2}" y="{h - 8}" font-size="12" text-anchor="middle">{_esc(title_x)}</text>'
            f'<text x="12" y="{h / 2}" font-size="12" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{_esc(title_y)}</text>'
            f'<text x="{pad}" y="{h - pad + 14}" font-size="10">{xs[ok].min():.2g}</text>'
            f'<text x="{w - pad}" y="{h - pad + 14}" font-size="10" text-anchor="end">{xs[ok].max():.2g}</text></svg>')


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    needed = ["manifest.json", "policy.parquet", "features.parquet", "probes.parquet", "pairs.parquet", "pair_features.parquet"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise InvalidValueError(f"{run_dir} is not a finished run folder (missing {', '.join(missing)}); run `policytrace run` first")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    policy = pl.read_parquet(run_dir / "policy.parquet")
    features = pl.read_parquet(run_dir / "features.parquet")
    probes = pl.read_parquet(run_dir / "probes.parquet")
    pairs = pl.read_parquet(run_dir / "pairs.parquet")
    pf = pl.read_parquet(run_dir / "pair_features.parquet")
    config = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").exists() else ""
    lam_path = ""
    if (run_dir / "policy.json").exists():
        pj = json.loads((run_dir / "policy.json").read_text())
        grid = np.array(pj.get("gcv_grid") or [], dtype=float)
        score = np.array([np.inf if v is None else v for v in (pj.get("gcv_score") or [])], dtype=float)
        if len(grid):
            lam_path = _line(grid, score, pj["lam"], "λ (log scale)", "GCV score")
    validation = ""
    if (run_dir / "validation.parquet").exists():
        v = pl.read_parquet(run_dir / "validation.parquet").select("method", "target", "lds", "ci_low", "ci_high", "subsets", "alpha")
        validation += ("<h2>Validation against retraining</h2><p class=muted>LDS: Spearman correlation, over random subsets "
                       "of the pairs really fine-tuned on, between the measured shift and the sum of each method's per-pair "
                       "scores (95 % bootstrap interval). See docs/validation.md for the methods.</p>" + _table(v, 3))
    if (run_dir / "removal.parquet").exists():
        validation += ("<h3>Top-k removal</h3><p class=muted>Drop of the shift when retraining without each method's top-k "
                       "pairs, against removing category-matched random pairs.</p>"
                       + _table(pl.read_parquet(run_dir / "removal.parquet").drop("removed"), 3))
    if (run_dir / "aggregates.parquet").exists():
        agg_v = (pl.read_parquet(run_dir / "aggregates.parquet").filter(pl.col("by") == "category")
                 .pivot(on="method", index="group", values="mean_z"))
        validation += ("<h3>Scores by pair category (mean z-score within each method)</h3>" + _table(agg_v, 2))
    if (run_dir / "planted.parquet").exists():
        validation += ("<h3>Planted mislabeled pairs</h3><p class=muted>Detection of harmless prompts answered with a refusal "
                       "and harmful prompts answered with compliance (AUC, precision at k = number planted).</p>"
                       + _table(pl.read_parquet(run_dir / "planted.parquet"), 3))

    pol = policy.join(features.select("feature_id", "group", "top_probes"), on="feature_id").sort("rank").head(25)
    bars = _bars([f"{r['feature_id']} · {r['label'] or ''}" for r in pol.iter_rows(named=True)], pol["coef"].to_numpy())
    fid = manifest.get("stages", {}).get("base", {}).get("fidelity", {})
    scatter = _scatter(pairs["score_x"].to_numpy(), pairs["score_y"].to_numpy(), pairs["label"].to_list(),
                       "ΔX pathway (Σ d_coef_x · coef)", "ΔY pathway (Σ d_coef_y · coef)")
    topf = pf.group_by("feature_id").agg(pl.col("d_coef").abs().mean().alias("m")).sort("m", descending=True).head(24)["feature_id"].to_list()
    order = pairs.sort("group", "label", "pair_id")
    sub = pf.filter(pl.col("feature_id").is_in(topf))
    piv = {(a, b): c for a, b, c in sub.select("pair_id", "feature_id", "alignment").iter_rows()}
    mat = np.array([[piv.get((p, f), 0.0) for f in topf] for p in order["pair_id"].to_list()])
    heat = _heatmap(mat, [f"{g} · {p}" for g, p in zip(order["group"], order["pair_id"])], [str(f) for f in topf])
    by_cat = probes.group_by("category", "harmful").agg(
        pl.len().alias("probes"), pl.col("y").mean().alias("mean_y"), pl.col("y_pred").mean().alias("mean_y_pred"),
    ).sort("category", "harmful")
    agg = pairs.group_by("group", "label").agg(
        pl.len().alias("pairs"), pl.col("score").mean().alias("mean_score"), pl.col("dy_mean").mean().alias("mean_dy"),
        pl.col("interference").mean().alias("interference_rate"),
    ).sort("group", "label")
    inter = pairs.filter(pl.col("interference")).join(
        features.select(pl.col("feature_id").alias("dominant_feature"), pl.col("label").alias("dominant_label")),
        on="dominant_feature", how="left").select("pair_id", "group", "label", "dominant_feature", "dominant_group",
                                                  "off_target_share", "dominant_label").sort("off_target_share", descending=True)
    topp = pairs.sort("score", descending=True).select("pair_id", "group", "label", "score", "score_x", "score_y", "dy_mean", "pred_dy_mean").head(15)
    base = manifest.get("stages", {}).get("base", {})
    q = base.get("sae_quality") or {}
    qtext = (f"SAE quality (default TopK SAE): FVU {q.get('fvu', float('nan')):.3f}, L0 {q.get('l0', float('nan')):.1f}, "
             f"dead {100 * q.get('dead_fraction', float('nan')):.1f}%, CE loss +{q.get('ce_delta', float('nan')):.3f} nats when spliced") if q else "SAE: user-supplied"
    fid_rows = "".join(f"<tr><td>{_esc(k)}</td><td class=num>{v:.3f}</td></tr>" for k, v in fid.items() if isinstance(v, float))
    fid_cats = "".join(f"<tr><td>{_esc(k)}</td><td class=num>{v:.3f}</td></tr>" for k, v in fid.get("r2_by_category", {}).items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>policytrace report</title><style>{_CSS}</style></head><body>
<h1>policytrace report</h1>
<p class=muted>{_esc(run_dir.resolve())} · {base.get('n_probes', '?')} probes · {pairs.height} pairs · {base.get('n_features', '?')} features · λ = {base.get('lam', float('nan')):.4g} · {_esc(qtext)}</p>
<p>Each training pair's update shifts the <b>symbolic policy</b> — a ridge regression of the behaviour score
(log-probability of a refusal opening) on SAE features. A pair's <b>score</b> is Σ<sub>k</sub> Δcoef<sub>k</sub>·coef<sub>k</sub>:
positive means the update pushes the policy further the way it already points (not that refusal rose everywhere;
see Δy). The ΔX pathway is the part due to changed feature activations, ΔY the part due to changed behaviour scores.</p>
<h2>The policy</h2>
<p class=muted>Top {pol.height} features by |coef| (standardized units); red raises the refusal score. Label: the feature's group (probe category where it is most active) and its top-activating probe.</p>
{bars}
<h2>Fidelity</h2>
<p class=muted>Behaviour score by probe category (y = log-probability of a refusal opening; y_pred = the policy's fit).</p>
{_table(by_cat)}
<div class=grid><div>{lam_path}</div><div class=muted>The regularization path: generalized cross-validation score of the ridge policy over the λ grid; the dashed line is the λ used.</div></div>
<div class=grid><table>{fid_rows}</table><table><tr><th>probe category</th><th>held-out R²</th></tr>{fid_cats}</table></div>
<p class=muted>{fid.get('folds', '?')}-fold cross-validation with the policy's λ. r2_heldout against r2_mean_baseline (predicting the training mean);
auc_heldout_harmful: does the held-out prediction rank harmful probes above harmless ones (0.5 = chance), beside the same for the measured score;
accuracy_heldout: a threshold on the predicted score (fit on the training folds) classifying harmful vs harmless, against always answering the larger class.</p>
<h2>Pathways per pair</h2>
<div class=grid><div>{scatter}</div><div class=card>{_table(topp)}</div></div>
<h2>Pair × feature alignment</h2>
<p class=muted>Δcoef·coef for the {len(topf)} features moved most; rows are pairs grouped by category and label; red aligns with the policy, blue opposes it.</p>
{heat}
<h2>By category</h2>
{_table(agg)}
<h2>Interference</h2>
<p class=muted>Pairs whose largest coefficient shift lands on a feature of another category ({inter.height} of {pairs.height}).</p>
{_table(inter.head(40))}
{validation}
<h2>Configuration</h2><pre>{_esc(config)}</pre>
</body></html>"""
    out = run_dir / "report.html"
    from .config import write_atomic

    write_atomic(out, doc)
    return out
