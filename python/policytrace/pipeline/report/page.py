"""``report.html``: one self-contained, offline page for a run folder, to read and to explore.

It leads with what is faithful to the model: each pair's measured behaviour change, the part the
policy's features mediate, and the curator's suspicion ranking; SMDA's alignment score follows as
the policy-alignment measure it is. Tables sort (click a header) and filter (type above them);
every pair and feature opens a panel (``#pair-<id>``, ``#feature-<id>``; plain anchors and
``:target``, so links work without scripts) with its drill-down. Opening ``report.html#selftest``
makes the page check its own layout and controls and write the result into ``#selftest-result``,
which the browser test reads. Wording comes from the run's behaviour.

Here the Jinja templates (``templates/``, autoescaping on) lay out the view layer's plain data
(:mod:`.view`); the CSS and JS (``static/``) are included verbatim, nothing is fetched.
docs/design.md, module table.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

from ..rundir import RunDir
from . import svg
from .frames import open_run
from .view import ReportView, report_view

# Templates and static files are package data beside this module (maturin ships every file
# under python/policytrace), so the loader reads them from wherever the package is installed.
HERE = Path(__file__).parent


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one environment: every ``{{ }}`` is escaped (autoescape), a name the view does not
    provide is an error rather than an empty string, and ``chart`` (SVG markup built with
    escaping in :mod:`.svg`) is the only thing that arrives as ready markup."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["chart"] = svg.chart
    return env


def render(view: ReportView) -> str:
    """The page's HTML for a view (:func:`.view.report_view`)."""
    return environment().get_template("templates/page.html.j2").render(r=view)


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` for a finished run; returns its path."""
    view = report_view(open_run(run_dir))
    rd = RunDir(run_dir)
    rd.write("report.html", render(view))
    return rd.file("report.html")
