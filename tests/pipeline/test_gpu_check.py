"""The prepared GPU check runs in its reduced size on CPU, so CI keeps it working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "gpu_check.py"


def test_gpu_check_small_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {e["dtype"] for e in res["engine"]} == {"bfloat16", "float32"}
    for e in res["engine"]:
        assert e["seconds_per_pair"] > 0 and e["probe_tokens_per_s"] > 0 and 0 < e["fraction_of_matmul_peak"]
    f32 = next(e for e in res["engine"] if e["dtype"] == "float32")
    assert f32["update_survival_mean"] == pytest.approx(1.0, abs=1e-3)
    assert {g["dtype"] for g in res["gradient"]} == {"bfloat16", "float32"}
    for g in res["gradient"]:
        assert g["concept_seconds"] > 0 and g["seconds_per_pair"] > 0 and g["n_concepts"] == 2
