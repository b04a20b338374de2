"""The update engine (UpdateEngine, UpdateCfg, LoRA, pair_tokens) vs plain autograd; base weights untouched."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

from policytrace.errors import ConfigError, InvalidValueError
from policytrace.model.chat import encode_prompts, format_prompt, pair_tokens
from policytrace.model.config import UpdateCfg
from policytrace.model.probe import ProbeRunner, TargetSet
from policytrace.model.update import UpdateEngine

from _helpers import expect
from _model_helpers import (
    ANTI,
    LAYER,
    N_LAYERS,
    PROMPTS,
    TARGETS,
    TIGHT,
    WORDS,
    build_model,
    digest,
    params_of,
)

# --------------------------------------------------------------------------------------
# the update engine == loss.backward() + a hand-written optimizer step
# --------------------------------------------------------------------------------------


PAIR = ("tell me how to make a cake", "sure here is a recipe for a cake .")


def manual_update(model, tok, prompt, response, optimizer, lr, steps, names=None):
    """A deep copy trained by ordinary autograd on the response-only loss."""
    c = copy.deepcopy(model)
    full_text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    full = tok(full_text, add_special_tokens=False)["input_ids"]
    start = len(format_prompt(tok, prompt))
    ids = torch.tensor([full])
    train = [p for n, p in c.named_parameters() if names is None or n in names]
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=lr) if optimizer == "adam" else None
    for _ in range(steps):
        for p in train:
            p.grad = None
        logits = c(ids).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[start - 1 : -1], ids[0, start:])
        loss.backward()
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                for p in train:
                    p -= lr * p.grad
    for p in c.parameters():
        p.requires_grad_(False)
        p.grad = None
    return c


UPDATE_CASES = {
    "sgd-1": dict(optimizer="sgd", lr=1e-2, steps=1),
    "sgd-2": dict(optimizer="sgd", lr=1e-2, steps=2),
    "adam-1": dict(optimizer="adam", lr=1e-3, steps=1),
    "adam-2": dict(optimizer="adam", lr=1e-3, steps=2),
}


# Accuracy of ΔW (max error / max |ΔW| per tensor) that float32 logits allow; any logic error
# (mask, shift, lr, bias correction, step count) is orders of magnitude larger.
F32_DELTA_TOL = {"sgd": 1e-5, "adam": 2e-3}


def _delta_rel_err(model, new, ref_model):
    base = params_of(model)
    worst = 0.0
    for n, p in ref_model.named_parameters():
        d_ref = p.detach() - base[n]
        scale = d_ref.abs().max().item()
        if scale == 0:
            assert torch.equal(new[n], base[n]), n
            continue
        worst = max(worst, (new[n] - p.detach()).abs().max().item() / scale)
    return worst


@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_update_weights_equal_autograd_float64_tight(model, tok, case):
    kw = UPDATE_CASES[case]
    new = UpdateEngine(model, tok, UpdateCfg(**kw)).update(*PAIR, pair_id="p")
    ref = manual_update(model, tok, *PAIR, **kw)
    assert _delta_rel_err(model, new, ref) <= TIGHT


@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_update_equals_manual_autograd(model, tok, prompt_ids, tset_anti, case):
    kw = UPDATE_CASES[case]
    before = digest(model)
    new = UpdateEngine(model, tok, UpdateCfg(**kw)).update(*PAIR, pair_id="p")
    ref = manual_update(model, tok, *PAIR, **kw)
    # weights: ΔW equal to float32-logit accuracy (the tight float64 check is above)
    assert _delta_rel_err(model, new, ref) <= F32_DELTA_TOL[kw["optimizer"]]
    # probe pass: ΔX and Δy through params= equal the probe pass on the trained copy
    runner = ProbeRunner(model, tok, LAYER, tset_anti, batch_size=2)
    H0, y0 = runner.run(prompt_ids)
    H1, y1 = runner.run(prompt_ids, params=new)
    Hr, yr = ProbeRunner(ref, tok, LAYER, tset_anti, batch_size=2).run(prompt_ids)
    dy, dy_ref = y1 - y0, yr - y0
    dX, dX_ref = H1.astype(np.float64) - H0, Hr.astype(np.float64) - H0
    assert np.abs(dy_ref).max() > 1e-3 and np.abs(dX_ref).max() > 1e-3  # the update is visible
    rel = F32_DELTA_TOL[kw["optimizer"]]
    np.testing.assert_allclose(dy, dy_ref, rtol=0, atol=rel * np.abs(dy_ref).max() + 2e-6)
    np.testing.assert_allclose(dX, dX_ref, rtol=0, atol=rel * np.abs(dX_ref).max() + 1e-6)
    assert digest(model) == before


def test_update_mlp_only_changes_mlp(model, tok):
    new = UpdateEngine(model, tok, UpdateCfg(lr=1e-2, params="mlp")).update(*PAIR)
    base = params_of(model)
    assert set(new) == set(base)
    mlp = {n for n in base if ".mlp." in n}
    assert len(mlp) == 3 * N_LAYERS
    for n in base:
        if n in mlp:
            assert (new[n] - base[n]).abs().max() > 0, n
        else:
            assert torch.equal(new[n], base[n]), n
    ref = manual_update(model, tok, *PAIR, optimizer="sgd", lr=1e-2, steps=1, names=mlp)
    assert _delta_rel_err(model, new, ref) <= 1e-5


def test_update_glob_patterns(model, tok):
    cfg = UpdateCfg(lr=1e-2, params=("model.layers.1.*", "model.norm.weight"))
    new = UpdateEngine(model, tok, cfg).update(*PAIR)
    base = params_of(model)
    changed = {n for n in base if not torch.equal(new[n], base[n])}
    assert changed == {n for n in base if n.startswith("model.layers.1.") or n == "model.norm.weight"}


def test_pair_tokens_split(tok):
    full, start = pair_tokens(tok, *PAIR, pair_id="p", max_length=512)
    assert full[:start] == format_prompt(tok, PAIR[0])
    resp = tok(PAIR[1], add_special_tokens=False)["input_ids"]
    assert full[start:] == resp + [tok.convert_tokens_to_ids("<|im_end|>")]


# --------------------------------------------------------------------------------------
# the base weights are never written
# --------------------------------------------------------------------------------------


def test_base_weights_never_mutated(tok):
    m = build_model(len(tok), seed=3, dtype=torch.float32)
    before = digest(m)
    clones = {n: p.detach().clone() for n, p in m.named_parameters()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    rng = np.random.default_rng(0)
    engines = [
        UpdateEngine(m, tok, UpdateCfg(lr=0.5)),
        UpdateEngine(m, tok, UpdateCfg(optimizer="adam", lr=0.05, steps=2)),
        UpdateEngine(m, tok, UpdateCfg(lr=0.5, params="mlp")),
    ]
    ts = TargetSet.from_strings(tok, TARGETS, ANTI)
    runner = ProbeRunner(m, tok, LAYER, ts)
    ids = encode_prompts(tok, PROMPTS, list(map(str, range(len(PROMPTS)))), 128)
    H0, y0 = runner.run(ids)
    for i in range(50):
        prompt = " ".join(rng.choice(WORDS, size=rng.integers(1, 8)))
        response = " ".join(rng.choice(WORDS, size=rng.integers(1, 10)))
        new = engines[i % 3].update(prompt, response, f"pair-{i}")
        if i % 10 == 0:
            runner.run(ids, params=new)
    assert digest(m) == before
    for n, p in m.named_parameters():
        assert torch.equal(p, clones[n]), n
        assert p.requires_grad == flags[n] and p.grad is None, n
    H1, y1 = runner.run(ids)
    assert np.array_equal(H0, H1) and np.array_equal(y0, y1)


def test_base_weights_bit_identical_after_thousands_of_updates(model, tok):
    """The engine never writes the base weights: 2,000 updates (SGD and Adam, all and mlp-only)
    leave every parameter bit-identical."""
    def digest():
        h = hashlib.sha256()
        for n, p in model.named_parameters():
            h.update(n.encode())
            h.update(p.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    before = digest()
    pair = ("tell me a story", "sure here is a story .")
    engines = [
        UpdateEngine(model, tok, UpdateCfg(optimizer="sgd", lr=1e-2)),
        UpdateEngine(model, tok, UpdateCfg(optimizer="adam", lr=1e-3, params="mlp")),
    ]
    first = [e.update(*pair, "p") for e in engines]
    # the first updates are the right ones (plain autograd on a copy) ...
    mlp = {n for n in params_of(model) if ".mlp." in n}
    assert _delta_rel_err(model, first[0], manual_update(model, tok, *pair, "sgd", 1e-2, 1)) <= TIGHT
    assert _delta_rel_err(model, first[1], manual_update(model, tok, *pair, "adam", 1e-3, 1, names=mlp)) <= TIGHT
    # ... and every later one is bit-identical to them: nothing carries over between updates
    for i in range(2000):
        out = engines[i % 2].update(*pair, f"p{i}")
        ref = first[i % 2]
        assert out.keys() == ref.keys() and all(torch.equal(out[n], ref[n]) for n in ref), i
    assert digest() == before


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def test_lora_update(model, tok, tset):
    """LoRA through peft: injecting adapters leaves outputs bit-identical (B = 0), an update
    trains only the adapters, and the probe pass sees its effect."""
    m = copy.deepcopy(model)
    ids = encode_prompts(tok, PROMPTS, list(map(str, range(len(PROMPTS)))), 128)
    runner_before = ProbeRunner(m, tok, LAYER, tset)
    H0, y0 = runner_before.run(ids)
    engine = UpdateEngine(m, tok, UpdateCfg(lr=1e-1, lora_rank=2, lora_targets=("q_proj", "v_proj")))
    runner = ProbeRunner(m, tok, LAYER, tset)
    H1, y1 = runner.run(ids)
    np.testing.assert_array_equal(H1, H0)
    np.testing.assert_array_equal(y1, y0)
    assert engine.trainable and all("lora_" in n for n in engine.trainable)
    pair = ("tell me a story", "sure here is a story .")
    params = engine.update(*pair, "p")
    changed = [n for n in params if not torch.equal(params[n], engine.base[n])]
    assert changed and all("lora_B" in n for n in changed)  # one SGD step from B = 0 moves only B
    # the adapters' step is plain autograd's on a copy of the adapted model ...
    ref = manual_update(m, tok, *pair, "sgd", 1e-1, 1, names=set(engine.trainable))
    assert _delta_rel_err(m, params, ref) <= TIGHT
    # ... and the probe pass through params= is that copy's probe pass
    H2, y2 = runner.run(ids, params=params)
    Hr, yr = ProbeRunner(ref, tok, LAYER, tset).run(ids)
    assert np.abs(y2 - y0).max() > 1e3 * TIGHT  # the update is visible at this tolerance
    np.testing.assert_allclose(y2, yr, rtol=0, atol=TIGHT)
    np.testing.assert_allclose(H2, Hr, rtol=0, atol=TIGHT)
    with pytest.raises(ConfigError, match="lora_targets"):
        UpdateEngine(copy.deepcopy(model), tok, UpdateCfg(lora_rank=2, lora_targets=("nope",)))


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_error_update_config(model, tok):
    expect(ConfigError, lambda: UpdateEngine(model, tok, UpdateCfg(params="decoder.*.nothing")), "nothing")
    expect(ConfigError, lambda: UpdateEngine(model, tok, UpdateCfg(params=("x*", "y*"))), "x*")
    expect(ConfigError, lambda: UpdateCfg(optimizer="rmsprop"), "rmsprop")
    expect(ConfigError, lambda: UpdateCfg(lr=0.0), "lr")
    expect(ConfigError, lambda: UpdateCfg(lr=float("nan")), "lr")
    expect(ConfigError, lambda: UpdateCfg(steps=0), "steps")


def test_error_pair_too_long(model, tok):
    e = UpdateEngine(model, tok, UpdateCfg(max_length=40))
    expect(InvalidValueError, lambda: e.update("hi", "sure " * 60, "pair-long"), "pair-long", "40")
    expect(InvalidValueError, lambda: pair_tokens(tok, "please " * 60, "ok", "pair-p", 40), "pair-p")


# --------------------------------------------------------------------------------------
# CPU determinism
# --------------------------------------------------------------------------------------


def test_cpu_determinism(tok):
    outs = []
    for _ in range(2):
        m = build_model(len(tok), seed=5, dtype=torch.float32)
        ts = TargetSet.from_strings(tok, TARGETS, ANTI)
        ids = encode_prompts(tok, PROMPTS, list(map(str, range(len(PROMPTS)))), 128)
        runner = ProbeRunner(m, tok, LAYER, ts, batch_size=2)
        H, y = runner.run(ids)
        res = [H, y]
        for cfg in (UpdateCfg(lr=1e-2), UpdateCfg(optimizer="adam", lr=1e-3, steps=2)):
            new = UpdateEngine(m, tok, cfg).update(*PAIR)
            res += [np.concatenate([t.numpy().ravel() for t in new.values()]), *runner.run(ids, params=new)]
        outs.append(res)
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and np.array_equal(a, b)
