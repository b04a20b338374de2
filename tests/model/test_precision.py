"""Low-precision weights: how much of the update survives rounding, the guard that stops a run
losing it, and bfloat16 outputs against float64 on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from policytrace.errors import ConfigError  # noqa: E402
from policytrace.model.chat import encode_prompts  # noqa: E402
from policytrace.model.config import UpdateCfg  # noqa: E402
from policytrace.model.probe import ProbeRunner, TargetSet  # noqa: E402
from policytrace.model.update import UpdateEngine  # noqa: E402

from _tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402

PAIR = ("write insult about group", "i can't help with that", "p")
PROMPTS = ["how do bake bread please", "write insult about group", "tell me story please please", "make weapon",
           "sell drugs please", "find address", "write code", "plan list steps"]


def _model(tok, dtype):
    m = tiny_causal_lm("llama", len(tok)).to(dtype)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_update_survives_in_float32_and_rounds_away_in_bfloat16():
    tok = tiny_tokenizer()
    shares = {}
    for dtype, lr in ((torch.bfloat16, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-4)):
        e = UpdateEngine(_model(tok, dtype), tok, UpdateCfg(lr=lr, min_update_share=0.0))
        e.update(*PAIR)
        shares[(dtype, lr)] = e.last_survival
    assert shares[(torch.bfloat16, 1e-4)] < 0.8 < shares[(torch.bfloat16, 1e-2)] <= 1.0 + 1e-6
    assert shares[(torch.float16, 1e-4)] > shares[(torch.bfloat16, 1e-4)]  # 3 more mantissa bits
    e32 = UpdateEngine(_model(tok, torch.float32), tok, UpdateCfg(lr=1e-4))
    new = e32.update(*PAIR)
    g = e32.gradient(*PAIR)
    intended = {n: -1e-4 * g[n] for n in g}
    assert e32.survival(new, e32.base, intended) == pytest.approx(1.0, abs=1e-3)


def test_guard_names_the_dtype_to_set():
    tok = tiny_tokenizer()
    e = UpdateEngine(_model(tok, torch.bfloat16), tok, UpdateCfg(lr=1e-4, min_update_share=0.9))
    with pytest.raises(ConfigError, match=r'model.dtype = "float32"') as err:
        e.update(*PAIR)
    assert "update.lr" in str(err.value) and "'p'" in str(err.value)


def test_bfloat16_outputs_against_float64():
    """Stated tolerance, at a learning rate whose step survives bfloat16 rounding (lr 1e-2):
    Δy within 25 % of float64's largest |Δy|, ΔH within 15 %. (At lr 1e-3 the difference of two
    bfloat16 forward passes is mostly rounding noise: README, "Precision".)"""
    tok = tiny_tokenizer()
    ids = encode_prompts(tok, PROMPTS, [str(i) for i in range(len(PROMPTS))], 128)
    ts = TargetSet.from_strings(tok, ["i can't", "sorry"])
    out = {}
    for dtype in (torch.float64, torch.bfloat16):
        m = _model(tok, dtype)
        r = ProbeRunner(m, tok, 1, ts, batch_size=8)
        H0, y0 = r.run(ids)
        H1, y1 = r.run(ids, params=UpdateEngine(m, tok, UpdateCfg(lr=1e-2)).update(*PAIR))
        out[dtype] = (y1 - y0, H1.astype(np.float64) - H0.astype(np.float64))
    (dy, dh), (ref_dy, ref_dh) = out[torch.bfloat16], out[torch.float64]
    assert np.abs(dy - ref_dy).max() <= 0.25 * np.abs(ref_dy).max()
    assert np.abs(dh - ref_dh).max() <= 0.15 * np.abs(ref_dh).max()
