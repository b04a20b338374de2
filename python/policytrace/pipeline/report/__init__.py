"""The run report, ``report.html``: one self-contained, offline page for a run folder.

:mod:`.frames` reads the run folder, :mod:`.view` (with :mod:`.panels` and :mod:`.tables`)
computes everything shown as plain data, :mod:`.svg` draws the inline charts, and :mod:`.page`
lays it out through the Jinja templates in ``templates/`` with the CSS and JS of ``static/``.
See docs/design.md (module table) and the page's own description in ``templates/page.html.j2``.
"""

from .page import write_report

__all__ = ["write_report"]
