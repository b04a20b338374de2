"""report.html renders in a real browser (headless Chromium from Debian's `chromium`, which CI
installs) at 1280 px: the page's own self-check passes (nothing overflows, the pair and feature
drill-downs open, the curator table sorts and filters), and the screenshots show a painted page
and, at a pair's anchor, exactly that pair's panel. Every Chromium call must exit 0. Skipped where
no Chromium is on PATH."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sae_lens")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")]
HEADLESS = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=4000"]
PANEL_BORDER = (0x24, 0x71, 0xA3)  # .panel's border in report.css; also the blue of the charts
BAR_RED = (0xC0, 0x39, 0x2B)  # svg.RED: bars that raise the score, scatter points


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.report import write_report
    from policytrace.pipeline.run import execute

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    tmp = tmp_path_factory.mktemp("report")
    model = write_tiny_model(tmp / "model")
    probes, pairs = write_tiny_data(tmp)
    # k = 8 active latents: the tiny run then selects features of both signs (both bar colours)
    execute(cfgmod.resolve(tiny_config(model, probes, pairs, tmp / "cache", sae={"train_k": 8})), tmp / "run",
            log=lambda m: None, progress=False)
    return write_report(tmp / "run")


def chromium(*args: str) -> str:
    """Run headless Chromium; a crash or a refused flag fails the test instead of passing blank."""
    done = subprocess.run(HEADLESS + list(args), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) as an (h, w, 3) array: zlib
    plus the five row filters (PNG spec, section 9), so the test needs no imaging library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, head = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + n])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    w, h, depth, colour, _, _, interlace = head
    assert depth == 8 and colour in (2, 6) and interlace == 0, head
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, w * bpp + 1)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = out[0] * 0
    for y in range(h):
        out[y] = _unfilter(int(raw[y, 0]), raw[y, 1:], prev, bpp)
        prev = out[y]
    return out.reshape(h, w, bpp)[:, :, :3]


def _unfilter(kind: int, line: np.ndarray, up: np.ndarray, bpp: int) -> np.ndarray:
    if kind == 0:
        return line
    if kind == 1:  # Sub: a running sum per channel, mod 256 (uint8 wraps)
        return np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind == 2:  # Up
        return line + up
    cur, above = bytearray(line.tobytes()), up.tobytes()  # Average and Paeth depend on the left byte
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = above[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 255
            continue
        c = above[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return np.frombuffer(bytes(cur), dtype=np.uint8)


def runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive row indices grouped as (first, last)."""
    out: list[list[int]] = []
    for r in rows.tolist():
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return [(a, b) for a, b in out]


def screenshot(tmp_path, name: str, url: str, height: int) -> np.ndarray:
    png = tmp_path / f"{name}.png"
    chromium(f"--screenshot={png}", f"--window-size=1280,{height}", url)
    img = decode_png(png.read_bytes())
    assert img.shape == (height, 1280, 3), img.shape
    return img


def ink_rows(img: np.ndarray) -> np.ndarray:
    """Per row: does anything darker than a light grey appear (text, rules, charts)?"""
    return (img.min(axis=2) < 200).any(axis=1)


def colour_count(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Per row: how many pixels have exactly this colour."""
    return (img == np.array(rgb, dtype=np.uint8)).all(axis=2).sum(axis=1)


def test_report_lays_out_at_1280_and_drilldowns_open(report):
    dom = chromium("--window-size=1280,900", "--dump-dom", report.as_uri() + "#selftest")
    found = re.search(r'<pre id="selftest-result">([^<]*)</pre>', dom)
    assert found and found.group(1), "the page's self-test did not run"
    result = json.loads(found.group(1))
    assert result["width"] == 1280 and result["page_width"] == 1280 and result["overflow"] == [], result
    assert result["panels"] == {"pair": "opens", "feature": "opens"}, result
    assert result["sorted"] is True and result["filtered"] is True, result
    assert "The curator's ranking" in dom and "Interference, against chance" in dom and "<svg" in dom


def test_report_paints_its_top(report, tmp_path):
    img = screenshot(tmp_path, "top", report.as_uri(), 2400)
    ink = ink_rows(img)
    assert ink[:40].any(), "nothing painted at the top (the nav)"
    assert ink.mean() > 0.4, f"only {ink.mean():.0%} of the rows show anything"
    # The policy's bars and the alignment scatter are drawn in both colours within the first 2400 px.
    assert colour_count(img, BAR_RED).sum() > 1000 and colour_count(img, PANEL_BORDER).sum() > 1000
    # No drill-down is open without its anchor.
    assert not (colour_count(img, PANEL_BORDER) > 1000).any()


def test_report_paints_the_anchored_pair_panel(report, tmp_path):
    # Headless Chromium paints an anchored page blank once it scrolls, so the drill-down shot
    # uses a window taller than the page (the panel opens in place, nothing scrolls).
    img = screenshot(tmp_path, "pair", report.as_uri() + "#pair-pair-alpha-1", 9000)
    ink = ink_rows(img)
    assert ink[:40].any(), "the top is blank: is the page taller than the window, so it scrolled?"
    assert ink.mean() > 0.3, f"only {ink.mean():.0%} of the rows show anything"
    # Exactly one panel is open: its top and bottom borders are the only full-width lines of the
    # border colour, with the panel's content between them.
    borders = runs(np.flatnonzero(colour_count(img, PANEL_BORDER) > 1000))
    assert len(borders) == 2, borders
    top, bottom = borders[0][1] + 1, borders[1][0]
    assert bottom - top > 300, borders
    assert ink[top:bottom].mean() > 0.3, "the open panel is empty"
    assert (colour_count(img[top:bottom], (0xFB, 0xFD, 0xFF)) > 0).mean() > 0.9, "no panel background inside"


def test_report_is_self_contained(report):
    text = report.read_text()
    assert "http://" not in text and "https://" not in text.replace("https://huggingface", "")
    assert "<script src" not in text and "<link" not in text


def test_feature_drilldown_shows_top_tokens_and_contexts(report):
    """At a feature's anchor the browser shows its logit-lens tokens, its activation by probe
    category and side, and its top-activating token contexts (feature_contexts.parquet)."""
    import polars as pl

    contexts = pl.read_parquet(report.parent / "feature_contexts.parquet")
    features = pl.read_parquet(report.parent / "features.parquet")
    fid = contexts["feature_id"][0]
    dom = chromium("--window-size=1280,900", "--dump-dom", report.as_uri() + f"#feature-{fid}")
    panel = dom[dom.index(f'id="feature-{fid}"'):]
    panel = panel[: panel.index("</section>")]
    assert "Top output tokens (logit lens" in panel and 'class="lens-token"' in panel
    lens = features.filter(pl.col("feature_id") == fid)["lens_tokens"][0].to_list()
    assert len(lens) == 8 and panel.count('class="lens-token"') == len(lens)
    assert "Activation by probe category and side" in panel
    assert "Top-activating contexts" in panel
    mine = contexts.filter(pl.col("feature_id") == fid)
    assert panel.count('class="context"') == mine.height and panel.count("ctx-centre") == mine.height
    assert f"{mine['source'][0]} {mine['item_id'][0]} · token {mine['position'][0]}" in panel
