"""Inline SVG charts for the report: bars, scatter, heatmap, line (no scripts, no network)."""

from __future__ import annotations

import html

import numpy as np


def _esc(x) -> str:
    return html.escape(str(x))


def _open(w, h) -> str:
    """An <svg> that scales with its container (viewBox), never clipped."""
    return f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'


def bars(labels: list[str], values: np.ndarray, width: int = 1000, pad: int = 420, chars: int = 70) -> str:
    h = 18
    top = float(np.abs(values).max()) or 1.0
    mid = pad + (width - pad) / 2
    half = (width - pad) / 2 - 60
    out = [_open(width, h * len(values) + 20)]
    out.append(f'<line x1="{mid}" y1="0" x2="{mid}" y2="{h * len(values)}" stroke="#999"/>')
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = i * h
        w = abs(v) / top * half
        x = mid if v >= 0 else mid - w
        color = "#c0392b" if v > 0 else "#2471a3"
        out.append(f'<text x="0" y="{y + 13}" font-size="11">{_esc(lab[:chars])}</text>')
        out.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{h - 6}" fill="{color}"/>')
        out.append(f'<text x="{(mid + w + 4) if v >= 0 else (mid - w - 4):.1f}" y="{y + 13}" font-size="10" '
                   f'text-anchor="{"start" if v >= 0 else "end"}">{v:.3g}</text>')
    out.append("</svg>")
    return "".join(out)


def scatter(x: np.ndarray, y: np.ndarray, groups: list[str], title_x: str, title_y: str, size: int = 460) -> str:
    palette = ["#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#f1c40f"]
    levels = sorted(set(groups))
    pad = 50
    lim = float(max(np.abs(x).max(initial=0), np.abs(y).max(initial=0))) or 1.0

    def sx(v):
        return pad + (v / lim + 1) / 2 * (size - 2 * pad)

    def sy(v):
        return size - pad - (v / lim + 1) / 2 * (size - 2 * pad)

    out = [_open(size + 160, size),
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


def heatmap(mat: np.ndarray, rows: list[str], cols: list[str], cell: int = 14) -> str:
    """Rows labelled in full: the left margin grows with the longest label (about 5.5 px per
    character at 9 px), so "privacy_surveillance · pair-0123" is not cut."""
    top = float(np.abs(mat).max()) if mat.size else 1.0
    top = top or 1.0
    left, head = 12 + int(5.5 * max((len(r) for r in rows), default=10)), 70
    out = [_open(left + cell * len(cols) + 10, head + cell * len(rows) + 10)]
    for j, c in enumerate(cols):
        x = left + j * cell + cell / 2
        out.append(f'<text x="{x}" y="{head - 4}" font-size="9" transform="rotate(-60 {x} {head - 4})">{_esc(c)}</text>')
    for i, r in enumerate(rows):
        y = head + i * cell
        out.append(f'<text x="0" y="{y + cell - 3}" font-size="9">{_esc(r)}</text>')
        for j in range(len(cols)):
            v = mat[i, j] / top
            color = f"rgb(255,{int(255 * (1 - v))},{int(255 * (1 - v))})" if v >= 0 else f"rgb({int(255 * (1 + v))},{int(255 * (1 + v))},255)"
            out.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="{color}"><title>{_esc(r)} · {_esc(cols[j])}: {mat[i, j]:.3g}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def line(xs: np.ndarray, ys: np.ndarray, mark: float, title_x: str, title_y: str, w: int = 460, h: int = 220) -> str:
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
    return (f'{_open(w, h)}<polyline points="{pts}" fill="none" stroke="#2471a3" stroke-width="2"/>'
            f'<line x1="{sx(m):.1f}" y1="{pad / 2}" x2="{sx(m):.1f}" y2="{h - pad}" stroke="#c0392b" stroke-dasharray="4"/>'
            f'<text x="{sx(m) + 4:.1f}" y="{pad / 2 + 10}" font-size="11" fill="#c0392b">λ = {mark:.3g}</text>'
            f'<text x="{w / 2}" y="{h - 8}" font-size="12" text-anchor="middle">{_esc(title_x)}</text>'
            f'<text x="12" y="{h / 2}" font-size="12" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{_esc(title_y)}</text>'
            f'<text x="{pad}" y="{h - pad + 14}" font-size="10">{xs[ok].min():.2g}</text>'
            f'<text x="{w - pad}" y="{h - pad + 14}" font-size="10" text-anchor="end">{xs[ok].max():.2g}</text></svg>')
