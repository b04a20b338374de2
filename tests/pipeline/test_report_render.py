"""report.html renders in a real browser (headless Chromium from Debian's `chromium`, which CI
installs); skipped where no Chromium is on PATH."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytest.importorskip("torch")
pytest.importorskip("sae_lens")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_report_renders_in_headless_chromium(tmp_path):
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.report import write_report
    from policytrace.pipeline.run import execute

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    probes, pairs = write_tiny_data(tmp_path)
    execute(cfgmod.resolve(tiny_config(model, probes, pairs, tmp_path / "cache")), tmp_path / "run",
            log=lambda m: None, progress=False)
    report = write_report(tmp_path / "run")
    png = tmp_path / "shot.png"
    # --dump-dom proves the page parses and lays out; the screenshot that it paints.
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "Pathways per pair" in dom.stdout and "<svg" in dom.stdout
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,2000", report.as_uri()], capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a painted page, not a blank one
