"""report.html renders in a real browser (headless Chromium from Debian's `chromium`, which CI
installs) at 1280 px: nothing overflows the page, the pair and feature drill-downs open, tables
sort. Skipped where no Chromium is on PATH."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

pytest.importorskip("torch")
pytest.importorskip("sae_lens")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")]
HEADLESS = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=4000"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.report import write_report
    from policytrace.pipeline.run import execute

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    tmp = tmp_path_factory.mktemp("report")
    model = write_tiny_model(tmp / "model")
    probes, pairs = write_tiny_data(tmp)
    execute(cfgmod.resolve(tiny_config(model, probes, pairs, tmp / "cache")), tmp / "run",
            log=lambda m: None, progress=False)
    return write_report(tmp / "run")


def test_report_lays_out_at_1280_and_drilldowns_open(report):
    dom = subprocess.run(HEADLESS + ["--window-size=1280,900", "--dump-dom", report.as_uri() + "#selftest"],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="selftest-result">([^<]*)</pre>', dom)
    assert found and found.group(1), "the page's self-test did not run"
    result = json.loads(found.group(1))
    assert result["width"] == 1280 and result["overflow"] == [], result
    assert result["panels"] == {"pair": "opens", "feature": "opens"} and result["sorted"] is True
    assert "The curator's ranking" in dom and "Interference, against chance" in dom and "<svg" in dom


def test_report_paints(report, tmp_path):
    # Headless Chromium paints an anchored page blank once it scrolls, so the drill-down shot
    # uses a window taller than the page (the panel opens in place, nothing scrolls).
    for name, url, height in (("top", report.as_uri(), 2400), ("pair", report.as_uri() + "#pair-pair-alpha-1", 9000)):
        png = tmp_path / f"{name}.png"
        subprocess.run(HEADLESS + [f"--screenshot={png}", f"--window-size=1280,{height}", url], capture_output=True,
                       timeout=120)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name  # painted, not blank


def test_report_is_self_contained(report):
    text = report.read_text()
    assert "http://" not in text and "https://" not in text.replace("https://huggingface", "")
    assert "<script src" not in text and "<link" not in text
