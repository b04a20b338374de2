"""The probe pass (TargetSet, ProbeRunner): scores and pooled block outputs equal naive full forwards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from policytrace.errors import ConfigError, InvalidValueError
from policytrace.model.chat import encode_prompts, format_prompt
from policytrace.model.probe import ProbeRunner, TargetSet

from _helpers import expect
from _model_helpers import (
    ANTI,
    LAYER,
    N_LAYERS,
    PROMPTS,
    TIGHT,
    assert_f32_of,
    build_tokenizer,
    digest,
    naive_pooled,
    naive_scores,
    params_of,
)

# --------------------------------------------------------------------------------------
# the tiny fixture itself
# --------------------------------------------------------------------------------------


def test_fixture_tokenizer_and_template(tok):
    ids = format_prompt(tok, "Tell me a story")
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[:2] == ["<|im_start|>", "system"]  # default system message
    assert toks[-2:] == ["<|im_start|>", "assistant"]  # generation prompt
    assert "<unk>" not in toks
    assert toks.count("<|im_end|>") == 2
    assert len(tok("I cannot help", add_special_tokens=False)["input_ids"]) == 3


# --------------------------------------------------------------------------------------
# probe pass == naive full forwards
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("anti", [False, True], ids=["targets", "log-odds"])
def test_scores_equal_naive_float64_tight(model, tok, prompt_ids, tset, tset_anti, anti):
    ts = tset_anti if anti else tset
    _, y = ProbeRunner(model, tok, LAYER, ts).run(prompt_ids)
    np.testing.assert_allclose(y, naive_scores(model, prompt_ids, ts), rtol=0, atol=TIGHT)


@pytest.mark.parametrize("anti", [False, True], ids=["targets", "log-odds"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_scores_equal_naive(model, tok, prompt_ids, tset, tset_anti, anti, share_prefix):
    """Same check at float32-logit tolerance (the tight float64 check is above); any wrong position, mask,
    cache or target token would be off by far more (scores differ by O(0.1) across probes)."""
    ts = tset_anti if anti else tset
    _, y = ProbeRunner(model, tok, LAYER, ts, batch_size=2, share_prefix=share_prefix).run(prompt_ids)
    ref = naive_scores(model, prompt_ids, ts)
    assert y.dtype == np.float64 and y.shape == (len(PROMPTS),)
    assert np.ptp(ref) > 0.05
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6)


def test_scores_log_odds_is_difference(model, tok, prompt_ids, tset, tset_anti):
    _, y_t = ProbeRunner(model, tok, LAYER, tset).run(prompt_ids)
    _, y_a = ProbeRunner(model, tok, LAYER, TargetSet.from_strings(tok, ANTI)).run(prompt_ids)
    _, y = ProbeRunner(model, tok, LAYER, tset_anti).run(prompt_ids)
    np.testing.assert_allclose(y, y_t - y_a, rtol=0, atol=1e-12)


def test_single_token_target_is_next_token_logprob(model, tok, prompt_ids):
    ts = TargetSet.from_strings(tok, ["sorry"])
    _, y = ProbeRunner(model, tok, LAYER, ts).run(prompt_ids)
    sid = tok.convert_tokens_to_ids("sorry")
    with torch.no_grad():
        ref = [float(model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)[sid]) for ids in prompt_ids]
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("pooling", ["last", "eot", "mean", "max"])
def test_pooled_H_equals_naive_block_output(model, tok, prompt_ids, tset, pooling):
    runner = ProbeRunner(model, tok, LAYER, tset, pooling=pooling, eot_token="<|im_end|>", batch_size=2)
    H, _ = runner.run(prompt_ids)
    assert H.shape == (len(PROMPTS), 32)
    ref = naive_pooled(model, tok, prompt_ids, LAYER, pooling)
    assert_f32_of(H, ref, pooling)
    # and not the block input (hidden_states[LAYER])
    wrong = naive_pooled(model, tok, prompt_ids, LAYER - 1, pooling)
    assert np.abs(H - wrong).max() > 1e-2


def test_pooled_H_last_block(model, tok, prompt_ids, tset):
    bare = copy.deepcopy(model)
    bare.model.norm = torch.nn.Identity()
    H, _ = ProbeRunner(model, tok, N_LAYERS - 1, tset).run(prompt_ids)
    with torch.no_grad():
        ref = torch.stack(
            [bare(torch.tensor([ids]), output_hidden_states=True).hidden_states[N_LAYERS][0, -1] for ids in prompt_ids]
        ).numpy()
    assert_f32_of(H, ref)


def test_single_probe(model, tok, tset_anti):
    ids = encode_prompts(tok, ["plan a trip"], ["only"], 128)
    for pooling in ("last", "eot"):
        H, y = ProbeRunner(model, tok, LAYER, tset_anti, pooling=pooling, eot_token="<|im_end|>").run(ids)
        assert_f32_of(H, naive_pooled(model, tok, ids, LAYER, pooling), pooling)
        np.testing.assert_allclose(y, naive_scores(model, ids, tset_anti), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------
# batching, padding and prefix sharing change nothing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["last", "eot", "mean", "max"])
@pytest.mark.parametrize("pad", ["<pad>", "<|im_end|>"], ids=["pad", "pad=eos"])
def test_batching_and_prefix_sharing_invariance(model, prompt_ids, tset_anti, pooling, pad):
    tok = build_tokenizer(pad_token=pad)
    results = []
    for bs in (1, 3, len(prompt_ids)):
        for share in (True, False):
            runner = ProbeRunner(
                model, tok, LAYER, tset_anti, pooling=pooling, eot_token="<|im_end|>", batch_size=bs, share_prefix=share
            )
            results.append(((bs, share), *runner.run(prompt_ids)))
    (_, H0, y0) = results[0]
    for key, H, y in results[1:]:
        np.testing.assert_allclose(y, y0, rtol=0, atol=TIGHT, err_msg=f"y {key}")
        np.testing.assert_allclose(H, H0, rtol=4 * np.finfo(np.float32).eps, atol=1e-6, err_msg=f"H {key}")


def test_probe_order_is_kept(model, tok, prompt_ids, tset_anti):
    runner = ProbeRunner(model, tok, LAYER, tset_anti, batch_size=2)
    H, y = runner.run(prompt_ids)
    perm = [3, 0, 4, 2, 1]
    Hp, yp = runner.run([prompt_ids[i] for i in perm])
    np.testing.assert_allclose(yp, y[perm], rtol=0, atol=TIGHT)
    np.testing.assert_allclose(Hp, H[perm], rtol=4 * np.finfo(np.float32).eps, atol=1e-6)


def test_duplicate_probes_score_the_same(model, tok, prompt_ids, tset_anti):
    ids = [prompt_ids[1], prompt_ids[3], prompt_ids[1]]
    H, y = ProbeRunner(model, tok, LAYER, tset_anti, batch_size=3).run(ids)
    np.testing.assert_allclose(y[0], y[2], rtol=0, atol=TIGHT)
    np.testing.assert_allclose(H[0], H[2], rtol=4 * np.finfo(np.float32).eps, atol=1e-6)


# --------------------------------------------------------------------------------------
# params= swaps the weights and nothing else
# --------------------------------------------------------------------------------------


def test_params_own_weights_bit_identical(model, tok, prompt_ids, tset_anti):
    for pooling in ("last", "mean"):
        runner = ProbeRunner(model, tok, LAYER, tset_anti, pooling=pooling, batch_size=2)
        H0, y0 = runner.run(prompt_ids)
        H1, y1 = runner.run(prompt_ids, params=params_of(model))
        assert np.array_equal(H0, H1) and np.array_equal(y0, y1), pooling


def _perturbed(model, names=None, scale=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        if names is None or n in names:
            out[n] = p.detach() + scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return out


def _model_with(model, params):
    c = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in c.named_parameters():
            if n in params:
                p.copy_(params[n])
    return c


@pytest.mark.parametrize("subset", ["all", "embeddings", "mlp"])
def test_params_perturbed_equal_deep_copy(model, tok, prompt_ids, tset_anti, subset):
    names = None
    if subset == "embeddings":  # tied to lm_head: the swap must follow the tie
        names = {"model.embed_tokens.weight"}
    elif subset == "mlp":
        names = {n for n, _ in model.named_parameters() if ".mlp." in n}
    params = _perturbed(model, names)
    before = digest(model)
    for pooling in ("last", "max"):
        H, y = ProbeRunner(model, tok, LAYER, tset_anti, pooling=pooling, batch_size=2).run(prompt_ids, params=params)
        c = _model_with(model, params)
        Hc, yc = ProbeRunner(c, tok, LAYER, tset_anti, pooling=pooling, batch_size=2).run(prompt_ids)
        np.testing.assert_allclose(y, yc, rtol=0, atol=TIGHT, err_msg=pooling)
        np.testing.assert_allclose(H, Hc, rtol=4 * np.finfo(np.float32).eps, atol=1e-6, err_msg=pooling)
        H0, y0 = ProbeRunner(model, tok, LAYER, tset_anti, pooling=pooling).run(prompt_ids)
        assert np.abs(y - y0).max() > 1e-3  # the perturbation is visible
    assert digest(model) == before


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_error_probe_too_long(tok):
    expect(
        InvalidValueError,
        lambda: encode_prompts(tok, ["hi", "please " * 80], ["short-one", "long-one"], 64),
        "long-one",
        "64",
    )


def test_error_eot_missing_names_probe(model, tok, prompt_ids, tset):
    runner = ProbeRunner(model, tok, LAYER, tset, pooling="eot", eot_token="<|spare|>")
    expect(InvalidValueError, lambda: runner.run(prompt_ids[:2], probe_ids=["alpha", "beta"]), "alpha")
    ids = [prompt_ids[0], [t for t in prompt_ids[1] if t != tok.convert_tokens_to_ids("<|im_end|>")]]
    runner = ProbeRunner(model, tok, LAYER, tset, pooling="eot", eot_token="<|im_end|>")
    expect(InvalidValueError, lambda: runner.run(ids, probe_ids=["alpha", "beta"]), "beta")


def test_error_config(model, tok, tset):
    expect(ConfigError, lambda: ProbeRunner(model, tok, LAYER, tset, pooling="median"), "median")
    expect(ConfigError, lambda: ProbeRunner(model, tok, LAYER, tset, pooling="eot"), "eot_token")
    expect(ConfigError, lambda: ProbeRunner(model, tok, LAYER, tset, pooling="eot", eot_token="<nope>"), "<nope>")
    expect(ConfigError, lambda: TargetSet.from_strings(tok, []), "targets")
    expect(ConfigError, lambda: TargetSet.from_strings(tok, ["sorry", "   "]), "tokenizes to nothing")
    expect(ConfigError, lambda: TargetSet.from_strings(tok, ["I", "I cannot"]), "prefix")
    expect(ConfigError, lambda: TargetSet.from_strings(tok, ["sorry"], ["here", "here is"]), "anti_targets")
    # equal targets are one sequence, not a prefix error
    assert len(TargetSet.from_strings(tok, ["sorry", "SORRY"]).targets) == 1


@pytest.mark.parametrize(
    "share_prefix",
    [
        True,
        False,
    ],
)
def test_empty_probe_list(model, tok, tset, share_prefix):
    """No probes: empty results in the model's width and precision (float64 here), not an error."""
    runner = ProbeRunner(model, tok, LAYER, tset, share_prefix=share_prefix)
    H, y = runner.run([])
    assert H.shape == (0, 32) and y.shape == (0,)
    assert H.dtype == np.float64 and y.dtype == np.float64
