"""Shared constants, builders and naive reference computations for the tests in tests/model."""

# Everything runs on a tiny randomly initialised Llama (3 blocks, d = 32) with a word-level
# tokenizer and a ChatML chat template built here, offline, in float64 where a comparison has to
# be tight. Each fast path of the package (KV-cache prefix sharing, batched continuation scoring,
# ``functional_call`` parameter swaps, ``torch.func.grad`` updates) is checked against the
# plainest possible computation: full forward passes of the model on prompt + target, and
# ``loss.backward()`` + a hand-written optimizer step on a deep copy of the model.

from __future__ import annotations

import hashlib

import numpy as np
import torch

from policytrace.model.probe import TargetSet

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
    """H is ref (float64): kept in float64 for a float64 model (to rounding of the batched
    computation), else rounded to float32, up to one float32 ulp."""
    assert H.dtype in (np.float32, np.float64)
    eps = np.finfo(H.dtype).eps * (1 if H.dtype == np.float32 else 1e4)
    np.testing.assert_allclose(H, ref, rtol=eps, atol=eps * np.abs(ref).max(), err_msg=what)


def params_of(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


def digest(model) -> str:
    h = hashlib.sha256()
    for n, p in model.state_dict(keep_vars=True).items():
        h.update(n.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()

