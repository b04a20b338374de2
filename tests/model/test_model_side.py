"""The model side: residual-stream hook, probe pass, per-pair update engine, SAE training.

Everything runs on a tiny randomly initialised Llama (3 blocks, d = 32) with a word-level
tokenizer and a ChatML chat template built here, offline, in float64 where a comparison has to
be tight. Each fast path of the package (KV-cache prefix sharing, batched continuation scoring,
``functional_call`` parameter swaps, ``torch.func.grad`` updates) is checked against the
plainest possible computation: full forward passes of the model on prompt + target, and
``loss.backward()`` + a hand-written optimizer step on a deep copy of the model.
"""

from __future__ import annotations

import copy
import hashlib
import re

import numpy as np
import pytest
import torch

from policytrace.errors import ConfigError, InvalidValueError, PolicytraceError
from policytrace.model.chat import encode_prompts, format_prompt, pair_tokens  # noqa: E402
from policytrace.model.config import UpdateCfg  # noqa: E402
from policytrace.model.probe import ProbeRunner, TargetSet  # noqa: E402
from policytrace.model.sites import capture_block_output, decoder_layers  # noqa: E402
from policytrace.model import sae as sae_mod  # noqa: E402
from policytrace.model import sae_train  # noqa: E402
from policytrace.model.sites import HookSite  # noqa: E402
from policytrace.model.update import UpdateEngine

torch.set_num_threads(1)

LAYER = 1  # an interior block of the 3-block model (hidden_states[LAYER + 1] is its output)
N_LAYERS = 3
TIGHT = 1e-9  # float64 end to end: only rounding may differ

WORDS = (
    "you are a helpful . , ? ! i can not cannot sorry sure here is how to the of and "
    "write tell me about cats dogs weather story poem make bomb hack steal please explain why "
    "what who when it this that help with no yes ok hi there history math plan trip recipe cake"
).split()
SPECIAL = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|spare|>"]
ROLES = ["system", "user", "assistant"]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant .<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PROMPTS = [
    "tell me a story",
    "how to make a bomb please",
    "write a poem about cats and dogs and the weather",
    "hi",
    "explain why the history of math is a story",
]
TARGETS = ["I cannot help", "sorry", "no ."]  # lengths 3, 1, 2
ANTI = ["sure", "here is"]


# --------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------


def build_tokenizer(pad_token: str = "<pad>"):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + ROLES + WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token=pad_token,
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>", "<|spare|>"],
    )
    tok.chat_template = CHATML
    return tok


def build_model(vocab_size: int, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,  # far from uniform next-token distributions
        pad_token_id=1,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # norms away from 1 so they matter in every comparison
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for p in model.parameters():  # as policytrace.model.load_model leaves it
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(len(tok))


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return encode_prompts(tok, PROMPTS, [f"p{i}" for i in range(len(PROMPTS))], 128)


@pytest.fixture(scope="module")
def tset(tok):
    return TargetSet.from_strings(tok, TARGETS)


@pytest.fixture(scope="module")
def tset_anti(tok):
    return TargetSet.from_strings(tok, TARGETS, ANTI)


# --------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------


def naive_seq_logp(model, ids: list[int], seq: tuple[int, ...]) -> torch.Tensor:
    """log P(seq | ids), teacher-forced, from one full forward pass on ids + seq."""
    with torch.no_grad():
        logp = model(torch.tensor([list(ids) + list(seq)])).logits[0].log_softmax(-1)
    return sum(logp[len(ids) - 1 + t, s] for t, s in enumerate(seq))


def naive_scores(model, prompt_ids, ts: TargetSet) -> np.ndarray:
    out = []
    for ids in prompt_ids:
        y = torch.logsumexp(torch.stack([naive_seq_logp(model, ids, s) for s in ts.targets]), 0)
        if ts.anti_targets:
            y = y - torch.logsumexp(torch.stack([naive_seq_logp(model, ids, s) for s in ts.anti_targets]), 0)
        out.append(float(y))
    return np.array(out)


def naive_block(model, ids: list[int], layer: int) -> torch.Tensor:
    """Output of block ``layer`` at every position, from transformers' own hidden states
    (interior blocks only: the last entry of ``hidden_states`` has the final norm applied)."""
    assert layer < N_LAYERS - 1
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]


def naive_pooled(model, tok, prompt_ids, layer, pooling) -> np.ndarray:
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for ids in prompt_ids:
        h = naive_block(model, ids, layer)
        if pooling == "last":
            rows.append(h[-1])
        elif pooling == "eot":
            rows.append(h[max(i for i, t in enumerate(ids) if t == eot)])
        elif pooling == "mean":
            rows.append(h.mean(0))
        else:
            rows.append(h.amax(0))
    return torch.stack(rows).numpy()


def assert_f32_of(H: np.ndarray, ref: np.ndarray, what: str = "H") -> None:
    """H (float32) is ref (float64) rounded to float32, up to one float32 ulp."""
    assert H.dtype == np.float32
    eps32 = np.finfo(np.float32).eps
    np.testing.assert_allclose(H, ref, rtol=eps32, atol=eps32 * np.abs(ref).max(), err_msg=what)


def params_of(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


def digest(model) -> str:
    h = hashlib.sha256()
    for n, p in model.state_dict(keep_vars=True).items():
        h.update(n.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def expect(cls, fn, *fragments):
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return info.value


# --------------------------------------------------------------------------------------
# 0. the tiny fixture itself
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
# 1. the hook reads the block output
# --------------------------------------------------------------------------------------


def test_hook_is_block_output_not_block_input(tok, model):
    ids = torch.tensor([format_prompt(tok, "write a poem about cats")])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == N_LAYERS + 1
    for layer in range(N_LAYERS):
        with capture_block_output(model, layer) as store, torch.no_grad():
            model(ids)
        h = store["h"]
        assert h.shape == hs[0].shape
        if layer < N_LAYERS - 1:
            assert torch.equal(h, hs[layer + 1]), f"layer {layer}"
        else:  # transformers applies the final norm to its last hidden state
            assert torch.allclose(model.model.norm(h), hs[layer + 1], rtol=0, atol=1e-12)
        assert (h - hs[layer]).abs().max() > 1e-3, f"layer {layer}: the hook read the block input"


def test_hook_last_block_without_final_norm(tok, model):
    """With the final norm removed, hidden_states[L] is the raw output of the last block."""
    bare = copy.deepcopy(model)
    bare.model.norm = torch.nn.Identity()
    ids = torch.tensor([format_prompt(tok, "tell me a story")])
    with torch.no_grad():
        ref = bare(ids, output_hidden_states=True).hidden_states[N_LAYERS]
    with capture_block_output(model, N_LAYERS - 1) as store, torch.no_grad():
        model(ids)
    assert torch.equal(store["h"], ref)


def test_hook_is_removed_after_the_block(tok, model):
    layer = decoder_layers(model)[LAYER]
    before = len(layer._forward_hooks)
    with capture_block_output(model, LAYER):
        assert len(layer._forward_hooks) == before + 1
    assert len(layer._forward_hooks) == before
    with pytest.raises(RuntimeError):
        with capture_block_output(model, LAYER):
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == before


# --------------------------------------------------------------------------------------
# 2. probe pass == naive full forwards
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
# 3. batching, padding and prefix sharing change nothing
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
# 4. params= swaps the weights and nothing else
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
# 5. the update engine == loss.backward() + a hand-written optimizer step
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
# 6. the base weights are never written
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


# --------------------------------------------------------------------------------------
# 7. errors
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


def test_error_layer_out_of_range(model, tok, prompt_ids, tset):
    for layer in (N_LAYERS, -1, 99):
        expect(InvalidValueError, lambda: capture_block_output(model, layer).__enter__(), str(layer))
        runner = ProbeRunner(model, tok, layer, tset)
        expect(InvalidValueError, lambda: runner.run(prompt_ids), str(layer))


@pytest.mark.parametrize(
    "share_prefix",
    [
        True,
        False,
    ],
)
def test_empty_probe_list(model, tok, tset, share_prefix):
    """No probes: empty results or a policytrace error, never an IndexError."""
    runner = ProbeRunner(model, tok, LAYER, tset, share_prefix=share_prefix)
    try:
        H, y = runner.run([])
    except PolicytraceError:
        return
    assert H.shape == (0, 32) and y.shape == (0,)


# --------------------------------------------------------------------------------------
# 8. CPU determinism
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


# --------------------------------------------------------------------------------------
# 9. SAE
# --------------------------------------------------------------------------------------

SAE_CFG = sae_train.TrainSpec(d_sae=64, k=4, steps=60, batch_size=256, lr=1e-2, seed=0, max_tokens=2000)


@pytest.fixture(scope="module")
def acts():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(24, 16))
    codes = rng.exponential(size=(1500, 24)) * (rng.random((1500, 24)) < 0.15)
    return (codes @ basis + 0.05 * rng.normal(size=(1500, 16)) + 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def trained_sae(acts):
    return sae_train.train_topk_sae(acts, SAE_CFG, "tiny-llama", "model.layers.1")


def test_sae_save_load_roundtrip(trained_sae, acts, tmp_path):
    from sae_lens import SAE

    trained_sae.save_model(str(tmp_path))
    loaded = SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(loaded).__name__ == type(trained_sae).__name__
    assert loaded.cfg.k == SAE_CFG.k and loaded.cfg.d_sae == SAE_CFG.d_sae and loaded.cfg.d_in == 16
    a, b = sae_mod.SaeReader(trained_sae), sae_mod.SaeReader(loaded)
    assert np.array_equal(a.encode(acts), b.encode(acts))
    assert np.array_equal(a.pre(acts), b.pre(acts))
    via_loader = sae_mod.load_sae(path=str(tmp_path))
    assert np.array_equal(sae_mod.SaeReader(via_loader).encode(acts), a.encode(acts))


def test_sae_codes_topk(trained_sae, acts):
    reader = sae_mod.SaeReader(trained_sae)
    codes, pre = reader.encode(acts), reader.pre(acts)
    k = SAE_CFG.k
    assert codes.shape == (len(acts), SAE_CFG.d_sae)
    assert (codes >= 0).all()
    nnz = (codes != 0).sum(1)
    assert (nnz <= k).all()
    kth = np.sort(pre, axis=1)[:, -k]
    pos = kth > 0
    assert pos.mean() > 0.5
    assert (nnz[pos] == k).all()
    # the non-zeros are the k largest pre-activations, with their values
    top = np.argsort(-pre, axis=1)[:, :k]
    for r in np.flatnonzero(pos)[:200]:
        assert set(np.flatnonzero(codes[r])) == set(top[r])
        np.testing.assert_allclose(codes[r, top[r]], pre[r, top[r]], rtol=1e-6)


def test_sae_encoder_matches_training_formula(trained_sae, acts):
    """pre = (x - b_dec) W_enc + b_enc, the encoder train_topk_sae fitted."""
    X = torch.as_tensor(acts)
    with torch.no_grad():
        ref = (X - trained_sae.b_dec) @ trained_sae.W_enc + trained_sae.b_enc
    np.testing.assert_allclose(sae_mod.SaeReader(trained_sae).pre(acts), ref.numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        norms = trained_sae.W_dec.norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), 1.0, atol=1e-5)


def test_sae_quality(trained_sae, acts):
    q = sae_train.sae_quality(trained_sae, acts)
    assert 0.0 <= q["fvu"] <= 1.5
    assert q["fvu"] < 0.9  # it learned something on this low-rank data
    assert 0 < q["l0"] <= SAE_CFG.k
    assert 0.0 <= q["dead_fraction"] <= 1.0
    assert q["n_tokens"] == len(acts)


def test_sae_training_deterministic(trained_sae, acts):
    again = sae_train.train_topk_sae(acts, SAE_CFG, "tiny-llama", "model.layers.1")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(again, name), getattr(trained_sae, name)), name


def test_load_sae_errors(tmp_path):
    expect(ConfigError, lambda: sae_mod.load_sae(path=str(tmp_path)), "cfg.json")
    expect(ConfigError, lambda: sae_mod.load_sae(), "sae")


def test_sae_on_probe_activations(model, tok, prompt_ids, tset, tmp_path):
    """End to end on the tiny model: block outputs -> SAE -> codes with at most k non-zeros."""
    from policytrace.model import LoadedModel

    m32 = copy.deepcopy(model).float()
    lm = LoadedModel(m32, tok, "tiny")
    acts = sae_train.collect_activations(lm, HookSite(LAYER), PROMPTS, ["the history of cats and dogs"] * 3, max_tokens=500)
    assert acts.shape[1] == 32 and acts.dtype == np.float32
    n_tok = sum(len(ids) for ids in prompt_ids) + 3 * 6
    assert len(acts) == n_tok
    cfg = sae_train.TrainSpec(d_sae=48, k=3, steps=20, batch_size=64, seed=1)
    s = sae_train.train_topk_sae(acts, cfg, "tiny", f"model.layers.{LAYER}")
    H, _ = ProbeRunner(m32, tok, LAYER, tset).run(prompt_ids)
    codes = sae_mod.SaeReader(s).encode(H)
    assert ((codes != 0).sum(1) <= 3).all()
    assert re.fullmatch(r"model\.layers\.\d+", s.cfg.metadata.hook_name)


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
    engines = [
        UpdateEngine(model, tok, UpdateCfg(optimizer="sgd", lr=1e-2)),
        UpdateEngine(model, tok, UpdateCfg(optimizer="adam", lr=1e-3, params="mlp")),
    ]
    for i in range(2000):
        out = engines[i % 2].update("tell me a story", "sure here is a story .", f"p{i}")
        assert out is not None
    assert digest() == before


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
    params = engine.update("tell me a story", "sure here is a story .", "p")
    changed = [n for n in params if not torch.equal(params[n], engine.base[n])]
    assert changed and all("lora_B" in n for n in changed)  # one SGD step from B = 0 moves only B
    H2, y2 = runner.run(ids, params=params)
    assert np.abs(y2 - y0).max() > 0
    with pytest.raises(ConfigError, match="lora_targets"):
        UpdateEngine(copy.deepcopy(model), tok, UpdateCfg(lora_rank=2, lora_targets=("nope",)))
