"""``report.html``: one self-contained, offline page for a run folder, to read and to explore.

It leads with what is faithful to the model: each pair's measured behaviour change, the part the
policy's features mediate, and the curator's suspicion ranking; SMDA's alignment score follows as
the policy-alignment measure it is. Tables sort (click a header) and filter (type above them);
every pair and feature opens a panel (``#pair-<id>``, ``#feature-<id>``; plain anchors and
``:target``, so links work without scripts) with its drill-down. Inline SVG and a few lines of
inline script, nothing fetched. Opening ``report.html#selftest`` makes the page check its own
layout (no horizontal overflow at the window's width, drill-downs open) and write the result into
``#selftest-result`` — what the browser test reads. Wording comes from the run's behaviour.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ...behaviours import Behaviour, get as get_behaviour
from ..rundir import RunDir

CSS = """
*{box-sizing:border-box} body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:1.5rem 1.2rem}
h1{font-size:1.6rem;margin:.2rem 0} h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd} h3{font-size:1rem}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #eee;padding:.4rem 1.2rem;z-index:2;font-size:.9rem}
nav a{margin-right:1rem}
table{border-collapse:collapse;font-size:.82rem;margin:.5rem 0;width:100%;table-layout:fixed}
td,th{padding:.25rem .45rem;border-bottom:1px solid #eee;text-align:left;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
th{background:#f6f6f6;cursor:pointer;user-select:none;white-space:normal;overflow-wrap:anywhere;vertical-align:bottom} th.sorted-asc::after{content:" ▲"} th.sorted-desc::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.wrap{white-space:normal}
.muted{color:#666;font-size:.85rem} .flag{color:#b00020;font-weight:600}
.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1.5rem}
.card{background:#fafafa;border:1px solid #eee;padding:.8rem 1rem;border-radius:6px}
.warn{background:#fff4e5;border:1px solid #f0b45a;padding:.7rem 1rem;border-radius:6px;margin:.8rem 0}
.warn b{color:#8a4b00}
.filter{width:16rem;padding:.25rem .4rem;font-size:.85rem;margin:.3rem 0}
.panel{display:none;border:2px solid #2471a3;border-radius:8px;padding:.6rem 1rem 1rem;margin:1rem 0;background:#fbfdff}
.panel:target{display:block} .panel h3{margin-top:.3rem}
.kv{display:grid;grid-template-columns:12rem minmax(0,1fr);gap:.15rem .8rem;font-size:.86rem}
.kv div:nth-child(odd){color:#666}
.text{white-space:pre-wrap;background:#f4f4f4;padding:.4rem .6rem;border-radius:4px;font-size:.85rem;max-height:12rem;overflow:auto}
svg{max-width:100%;height:auto}
pre{white-space:pre-wrap;font-size:.8rem}
"""

SCRIPT = r"""
function sortTable(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th);
 const asc=!th.classList.contains('sorted-asc');t.querySelectorAll('th').forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
 th.classList.add(asc?'sorted-asc':'sorted-desc');const rows=[...t.tBodies[0].rows];
 const key=r=>{const c=r.cells[i];const v=c.dataset.v!==undefined?c.dataset.v:c.textContent;const n=parseFloat(v);return isNaN(n)?v:n};
 rows.sort((a,b)=>{const x=key(a),y=key(b);return (x<y?-1:x>y?1:0)*(asc?1:-1)});rows.forEach(r=>t.tBodies[0].appendChild(r))}
function filterTable(inp){const t=document.getElementById(inp.dataset.table),q=inp.value.toLowerCase();
 [...t.tBodies[0].rows].forEach(r=>{r.style.display=r.textContent.toLowerCase().includes(q)?'':'none'})}
document.addEventListener('click',e=>{if(e.target.tagName==='TH'&&e.target.closest('table.sortable'))sortTable(e.target)});
document.addEventListener('input',e=>{if(e.target.classList.contains('filter'))filterTable(e.target)});
function selftest(){const out={width:window.innerWidth,page_width:document.documentElement.scrollWidth,overflow:[],panels:{}};
 if(document.documentElement.scrollWidth>window.innerWidth+1)out.overflow.push('page');
 document.querySelectorAll('table,svg,.kv,.text').forEach((el,i)=>{const r=el.getBoundingClientRect();
  if(r.right>window.innerWidth+1)out.overflow.push((el.id||el.tagName)+'#'+i+' right='+Math.round(r.right))});
 for(const kind of ['pair','feature']){const a=document.querySelector('a[href^="#'+kind+'-"]');if(!a){out.panels[kind]='no link';continue}
  const id=a.getAttribute('href').slice(1);location.hash=id;const p=document.getElementById(id);
  out.panels[kind]=p&&getComputedStyle(p).display!=='none'?'opens':'does not open';
  if(p){const r=p.getBoundingClientRect();if(r.right>window.innerWidth+1)out.overflow.push(id+' right='+Math.round(r.right))}}
 const th=document.querySelector('table.sortable th:nth-child(2)');if(th){th.click();out.sorted=th.classList.contains('sorted-asc')}
 document.getElementById('selftest-result').textContent=JSON.stringify(out)}
if(location.hash==='#selftest')window.addEventListener('load',selftest);
"""


def esc(x) -> str:
    return html.escape(str(x))


def slug(x) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(x))


def fmt(v, floats: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "<span class=flag>yes</span>" if v else "no"
    if isinstance(v, float):
        return f"{v:.{floats}g}"
    return esc(v)


def table(frame: pl.DataFrame, floats: int = 3, tid: str | None = None, links: dict | None = None,
          widths: dict | None = None, filterable: bool = False) -> str:
    """A sortable table; ``links`` maps a column to the panel kind its values open."""
    links, widths = links or {}, widths or {}
    cols = "".join(f'<col style="width:{widths[c]}">' if c in widths else "<col>" for c in frame.columns)
    head = "".join(f"<th title='{esc(c)}'>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for r in frame.iter_rows(named=True):
        cells = []
        for c, v in r.items():
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            shown = fmt(v, floats)
            if c in links and v is not None:
                shown = f'<a href="#{links[c]}-{slug(v)}">{esc(v)}</a>'
            title = "" if num else f" title='{esc(v)}'"
            data = f" data-v='{v}'" if num and v is not None else ""
            cells.append(f"<td{' class=num' if num else ''}{data}{title}>{shown}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    idattr = f" id='{tid}'" if tid else ""
    box = (f"<input class=filter data-table='{tid}' placeholder='filter rows…' aria-label='filter'>"
           if filterable and tid else "")
    return f"{box}<table class=sortable{idattr}><colgroup>{cols}</colgroup><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


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
    pair_behaviour: pl.DataFrame
    pair_data: pl.DataFrame
    groups: pl.DataFrame

    @property
    def base(self) -> dict:
        return self.manifest.get("stages", {}).get("base", {})

    def optional(self, name: str) -> pl.DataFrame | None:
        return self.rd.read_parquet(name) if self.rd.file(name).exists() else None


def open_run(run_dir: str | Path) -> RunView:
    rd = RunDir(run_dir)
    manifest = rd.complete()
    behaviour = get_behaviour(manifest.get("stages", {}).get("base", {}).get("behaviour", "refusal"))
    names = ("policy", "features", "probes", "pairs", "pair_features", "pair_behaviour", "pair_data",
             "interference_groups")
    return RunView(rd, manifest, behaviour, *(rd.read_parquet(f"{n}.parquet") for n in names))
