"""The whole page: the sections in reading order, the drill-down panels, the configuration."""

from __future__ import annotations

from pathlib import Path

from . import sections as sec
from .html import CSS, SCRIPT, RunView, esc, fmt, open_run


def render(v: RunView) -> str:
    b, base = v.behaviour, v.base
    config = v.rd.file("config.toml").read_text() if v.rd.file("config.toml").exists() else ""
    q = base.get("sae_quality") or {}
    qtext = (f"default TopK SAE: FVU {fmt(q.get('fvu'))} on its training tokens, L0 {fmt(q.get('l0'))}, dead "
             f"{fmt(100 * q.get('dead_fraction', float('nan')))}%, CE loss +{fmt(q.get('ce_delta'))} nats when spliced"
             if q else "SAE: user-supplied")
    align, _ = sec.alignment(v)
    nav = " ".join(f'<a href="#{i}">{t}</a>' for i, t in (
        ("summary", "Behaviour change"), ("curator", "Curator's ranking"), ("policy", "Policy & features"),
        ("alignment", "Policy alignment"), ("interference", "Interference"), ("fidelity", "Fidelity"),
        ("validation", "Validation"), ("config", "Config")))
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>policytrace report · {esc(b.name)}</title><style>{CSS}</style></head><body>
<nav>{nav}</nav><main>
<h1>policytrace report · {esc(b.name)}</h1>
<p class=muted>{esc(v.rd.path.resolve())} · {base.get('n_probes', '?')} probes · {v.pairs.height} pairs · {base.get('n_features', '?')} features · λ = {fmt(base.get('lam'))} · {esc(qtext)}</p>
{sec.warnings(v)}
<p>Which training pairs moved the model's {esc(b.score_name)}, through which SAE features? The sections lead with the
measured behaviour change and the pairs whose effect contradicts their label; the symbolic policy (a ridge regression of the
score on SAE features) and SMDA's alignment score follow.</p>
{sec.summary(v)}
{sec.curator(v)}
{sec.policy(v)}
{align}
{sec.interference(v)}
{sec.fidelity(v)}
{sec.validation(v)}
<h2 id=drilldowns>Drill-downs</h2><p class=muted>A pair or feature link opens its panel here.</p>
{sec.pair_panels(v)}
{sec.feature_panels(v)}
<h2 id=config>Configuration</h2><pre>{esc(config)}</pre>
<pre id=selftest-result></pre>
</main><script>{SCRIPT}</script></body></html>"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` for a finished run; returns its path."""
    v = open_run(run_dir)
    v.rd.write("report.html", render(v))
    return v.rd.file("report.html")
