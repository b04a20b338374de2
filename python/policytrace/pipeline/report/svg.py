"""Inline SVG charts for the report: bars, scatter, heatmap, line (no scripts, no network).

Each chart takes the view layer's plain data (:mod:`.tables`) and returns
:class:`markupsafe.Markup`: the only markup the templates receive ready-made. Every element is
written with ``Markup(...).format(...)``, which escapes each argument, so a label or title cannot
break out of its element whatever it contains. docs/design.md, module table.
"""

from __future__ import annotations

import math

import numpy as np
from markupsafe import Markup

from .tables import Bars, Curve, Heatmap, LinePath, Scatter

RED, BLUE = "#c0392b", "#2471a3"
PALETTE = (RED, BLUE, "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#f1c40f")


def _svg(w: float, h: float, parts: list[Markup]) -> Markup:
    """An <svg> that scales with its container (viewBox), never clipped."""
    head = Markup('<svg width="{0}" height="{1}" viewBox="0 0 {0} {1}" role="img">').format(w, h)
    return head + Markup("").join(parts) + Markup("</svg>")


def chart(data, **layout) -> Markup:
    """The chart for one of the view layer's chart values (what the templates call)."""
    draw = {Bars: bars, Scatter: scatter, Heatmap: heatmap, LinePath: line, Curve: curve}[type(data)]
    return draw(data, **layout)


def bars(data: Bars, width: int = 1000, pad: int = 420, chars: int = 70) -> Markup:
    """One bar per label, right of the axis for positive values (red), left for negative."""
    h, values = 18, np.asarray(data.values, dtype=float)
    top = float(np.abs(values).max(initial=0)) or 1.0
    mid = pad + (width - pad) / 2
    half = (width - pad) / 2 - 60
    out = [Markup('<line x1="{0}" y1="0" x2="{0}" y2="{1}" stroke="#999"/>').format(mid, h * len(values))]
    for i, (lab, v) in enumerate(zip(data.labels, values)):
        y, w = i * h, abs(v) / top * half
        x = mid if v >= 0 else mid - w
        out.append(Markup('<text x="0" y="{}" font-size="11">{}</text>').format(y + 13, lab[:chars]))
        out.append(Markup('<rect x="{:.1f}" y="{}" width="{:.1f}" height="{}" fill="{}"/>').format(
            x, y + 3, w, h - 6, RED if v > 0 else BLUE))
        out.append(Markup('<text x="{:.1f}" y="{}" font-size="10" text-anchor="{}">{:.3g}</text>').format(
            (mid + w + 4) if v >= 0 else (mid - w - 4), y + 13, "start" if v >= 0 else "end", v))
    return _svg(width, h * len(values) + 20, out)


def scatter(data: Scatter, size: int = 460) -> Markup:
    """Points coloured by group, on symmetric axes through zero, with a legend."""
    x, y = np.asarray(data.x, dtype=float), np.asarray(data.y, dtype=float)
    levels = sorted(set(data.groups))
    pad = 50
    lim = float(max(np.abs(x).max(initial=0), np.abs(y).max(initial=0))) or 1.0

    def sx(v):
        return pad + (v / lim + 1) / 2 * (size - 2 * pad)

    def sy(v):
        return size - pad - (v / lim + 1) / 2 * (size - 2 * pad)

    out = [Markup('<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#bbb"/>').format(sx(-lim), sy(0), sx(lim), sy(0)),
           Markup('<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#bbb"/>').format(sx(0), sy(-lim), sx(0), sy(lim)),
           Markup('<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>').format(
               size / 2, size - 10, data.title_x),
           Markup('<text x="14" y="{0}" font-size="12" transform="rotate(-90 14 {0})" text-anchor="middle">{1}'
                  '</text>').format(size / 2, data.title_y),
           Markup('<text x="{}" y="20" font-size="10" fill="#777">axes: ±{:.3g}</text>').format(pad, lim)]
    for xi, yi, g in zip(x, y, data.groups):
        out.append(Markup('<circle cx="{:.1f}" cy="{:.1f}" r="4" fill="{}" fill-opacity=".75"><title>{}</title>'
                          '</circle>').format(sx(xi), sy(yi), PALETTE[levels.index(g) % len(PALETTE)], g))
    for i, g in enumerate(levels):
        out.append(Markup('<circle cx="{}" cy="{}" r="5" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>')
                   .format(size + 10, 30 + 18 * i, PALETTE[i % len(PALETTE)], size + 20, 34 + 18 * i, g))
    return _svg(size + 160, size, out)


def _shade(v: float) -> str:
    """White at 0, red towards +1, blue towards −1."""
    if v >= 0:
        return f"rgb(255,{int(255 * (1 - v))},{int(255 * (1 - v))})"
    return f"rgb({int(255 * (1 + v))},{int(255 * (1 + v))},255)"


def heatmap(data: Heatmap, cell: int = 14) -> Markup:
    """Rows labelled in full: the left margin grows with the longest label (about 5.5 px per
    character at 9 px), so "privacy_surveillance · pair-0123" is not cut."""
    mat = np.asarray(data.values, dtype=float).reshape(len(data.rows), len(data.cols))
    top = float(np.abs(mat).max()) if mat.size else 1.0
    top = top or 1.0
    left, head = 12 + int(5.5 * max((len(r) for r in data.rows), default=10)), 70
    out = []
    for j, c in enumerate(data.cols):
        x = left + j * cell + cell / 2
        out.append(Markup('<text x="{0}" y="{1}" font-size="9" transform="rotate(-60 {0} {1})">{2}</text>')
                   .format(x, head - 4, c))
    for i, r in enumerate(data.rows):
        y = head + i * cell
        out.append(Markup('<text x="0" y="{}" font-size="9">{}</text>').format(y + cell - 3, r))
        for j, c in enumerate(data.cols):
            out.append(Markup('<rect x="{0}" y="{1}" width="{2}" height="{2}" fill="{3}"><title>{4} · {5}: {6:.3g}'
                              '</title></rect>').format(left + j * cell, y, cell, _shade(mat[i, j] / top), r, c,
                                                        mat[i, j]))
    return _svg(left + cell * len(data.cols) + 10, head + cell * len(data.rows) + 10, out)


def line(data: LinePath, w: int = 460, h: int = 220) -> Markup:
    """A log-x line plot (the GCV λ path), with the chosen λ marked. Needs ``data.drawable``."""
    pts_ok = [(x, y) for x, y in zip(data.xs, data.ys) if math.isfinite(y) and x > 0]
    xs = np.array([p[0] for p in pts_ok])
    lx, yv = np.log10(xs), np.array([p[1] for p in pts_ok])
    pad = 45

    def sx(v):
        return pad + (v - lx.min()) / (lx.max() - lx.min() or 1) * (w - 2 * pad)

    def sy(v):
        return h - pad - (v - yv.min()) / (yv.max() - yv.min() or 1) * (h - 2 * pad)

    m = math.log10(data.mark)
    out = [Markup('<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>').format(
               " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(lx, yv)), BLUE),
           Markup('<line x1="{0:.1f}" y1="{1}" x2="{0:.1f}" y2="{2}" stroke="{3}" stroke-dasharray="4"/>').format(
               sx(m), pad / 2, h - pad, RED),
           Markup('<text x="{:.1f}" y="{}" font-size="11" fill="{}">λ = {:.3g}</text>').format(
               sx(m) + 4, pad / 2 + 10, RED, data.mark),
           Markup('<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>').format(w / 2, h - 8, data.title_x),
           Markup('<text x="12" y="{0}" font-size="12" transform="rotate(-90 12 {0})" text-anchor="middle">{1}'
                  '</text>').format(h / 2, data.title_y),
           Markup('<text x="{}" y="{}" font-size="10">{:.2g}</text>').format(pad, h - pad + 14, xs.min()),
           Markup('<text x="{}" y="{}" font-size="10" text-anchor="end">{:.2g}</text>').format(
               w - pad, h - pad + 14, xs.max())]
    return _svg(w, h, out)


def curve(data: Curve, w: int = 520, h: int = 240) -> Markup:
    """Lines over the layers (linear x), zero and one drawn, the best layer marked; a value
    outside ``lo``..``hi`` is drawn at the edge (its tooltip gives the value)."""
    pad, xs = 45, np.asarray(data.xs, dtype=float)
    x0, x1 = float(xs.min()), float(xs.max())

    def sx(v):
        return pad + (v - x0) / ((x1 - x0) or 1) * (w - 2 * pad - 110)

    def sy(v):
        v = min(max(v, data.lo), data.hi)
        return h - pad - (v - data.lo) / (data.hi - data.lo) * (h - 2 * pad)

    out = []
    for ref in (0.0, 1.0):
        out.append(Markup('<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#ccc"/>').format(
            pad, sy(ref), w - pad - 110, sy(ref)))
        out.append(Markup('<text x="{}" y="{:.1f}" font-size="10" text-anchor="end">{:g}</text>').format(
            pad - 4, sy(ref) + 3, ref))
    if data.mark is not None:
        out.append(Markup('<line x1="{0:.1f}" y1="{1}" x2="{0:.1f}" y2="{2}" stroke="{3}" stroke-dasharray="4"/>')
                   .format(sx(data.mark), pad / 2, h - pad, RED))
    for i, (name, ys) in enumerate(data.series):
        colour = PALETTE[(i + 1) % len(PALETTE)]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) >= 2:
            out.append(Markup('<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>').format(
                " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts), colour))
        for a, b in pts:
            out.append(Markup('<circle cx="{:.1f}" cy="{:.1f}" r="3.5" fill="{}"><title>{} at layer {:g}: {:.3g}'
                              '</title></circle>').format(sx(a), sy(b), colour, name, a, b))
        out.append(Markup('<text x="{}" y="{}" font-size="11" fill="{}">{}</text>').format(
            w - pad - 100, 30 + 16 * i, colour, name))
    for x in xs:
        out.append(Markup('<text x="{:.1f}" y="{}" font-size="10" text-anchor="middle">{:g}</text>').format(
            sx(x), h - pad + 14, x))
    out.append(Markup('<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>').format(
        (w - 110) / 2, h - 8, data.title_x))
    out.append(Markup('<text x="12" y="{0}" font-size="12" transform="rotate(-90 12 {0})" text-anchor="middle">{1}'
                      '</text>').format(h / 2, data.title_y))
    return _svg(w, h, out)
