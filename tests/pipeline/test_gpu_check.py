"""The prepared GPU check runs in its reduced size on CPU, so CI keeps it working; every number
it reports is the quantity its name says (counts from the model and probe set it builds, rates
and ratios from its own timings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _llama_params(h, inter, layers, heads, kv_heads, vocab, **_) -> int:
    """Parameters of a bias-free Llama with tied embeddings: per block q, k, v, o, the gated MLP
    and two norms; then the final norm and the (shared) embedding."""
    kv = kv_heads * (h // heads)
    return vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + h


def test_gpu_check_small_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    gc = _script()
    s = gc.SMALL
    params = _llama_params(s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["num_attention_heads"],
                           s["num_key_value_heads"], s["vocab_size"])
    tokens = sum(len(i) for i in gc.probes(gc.tiny_tokenizer(), 32, 12))  # --small: 32 probes of 12 words
    cuda = torch.cuda.is_available()
    assert res["small"] is True
    if cuda:
        # float64 on both devices: only the order of summation differs
        assert set(res["cuda_against_cpu"]) == {"max_rel_diff_H", "max_rel_diff_y", "max_rel_diff_dH", "max_rel_diff_dy"}
        assert max(res["cuda_against_cpu"].values()) <= 1e-9, res["cuda_against_cpu"]
    else:
        assert res["cuda_against_cpu"] == "no CUDA device: skipped"
    peak = res["matmul_peak_tflops"]
    assert set(peak) == {"bfloat16", "float32"}
    assert [e["dtype"] for e in res["engine"]] == ["bfloat16", "float32"]
    for e in res["engine"]:
        assert (e["params"], e["probe_tokens"], e["n_probes"], e["n_pairs"]) == (params, tokens, 32, 2)
        assert e["probe_tokens_per_s"] == pytest.approx(tokens / e["base_pass_s"], rel=1e-12)
        assert e["probe_pass_tflops"] == pytest.approx(2 * params * tokens / e["base_pass_s"] / 1e12, rel=1e-12)
        assert e["fraction_of_matmul_peak"] == pytest.approx(e["probe_pass_tflops"] / peak[e["dtype"]], rel=1e-12)
        assert (e["peak_gpu_mib"] is None) == (not cuda)
    f32 = next(e for e in res["engine"] if e["dtype"] == "float32")
    assert f32["update_survival_mean"] == pytest.approx(1.0, abs=1e-3)
    assert [g["dtype"] for g in res["gradient"]] == ["bfloat16", "float32"]
    for g in res["gradient"]:
        e = next(x for x in res["engine"] if x["dtype"] == g["dtype"])
        assert g["n_concepts"] == 2
        assert g["concept_seconds_each"] * 2 == pytest.approx(g["concept_seconds"], rel=1e-12)
        assert g["marginal_speedup"] == pytest.approx(e["seconds_per_pair"] / g["seconds_per_pair"], rel=1e-12)
        assert g["break_even_pairs"] == pytest.approx(
            g["concept_seconds"] / max(e["seconds_per_pair"] - g["seconds_per_pair"], 1e-9), rel=1e-12)
        assert (g["peak_gpu_mib"] is None) == (not cuda)
