"""The loss mask of a pair (model/chat.py: one rule for flat and chat pairs) and the update
engine's masked loss: flat pairs give exactly the response-only tokens and update they always
did; chat pairs with a system prompt and several turns train on the chosen assistant turns
only, through the chat template; a template that hides which tokens are the assistant's stops
with an error naming the pair."""

from __future__ import annotations

import copy

import pytest
import torch

from policytrace.errors import InvalidValueError
from policytrace.model.chat import ChatPair, chat_pair_tokens, format_prompt, pair_tokens, token_pieces
from policytrace.model.config import UpdateCfg
from policytrace.model.update import UpdateEngine

from _helpers import expect
from _model_helpers import TIGHT, params_of

PAIR = ("tell me how to make a cake", "sure here is a recipe for a cake .")
CHAT = ChatPair("c1", (("system", "you are a helpful assistant ."), ("user", "tell me a story"),
                       ("assistant", "sure here is a story ."), ("user", "and a poem please"),
                       ("assistant", "here is a poem about cats .")), (4,))


def _old_pair_tokens(tok, prompt, response):
    """What pair_tokens computed before chat pairs: the literal previous code path."""
    prompt_ids = format_prompt(tok, prompt)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"]), len(prompt_ids)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_flat_pair_mask_is_the_response_only_mask(tok):
    t = chat_pair_tokens(tok, ChatPair.flat(*PAIR, "p"), 512)
    full, start = _old_pair_tokens(tok, *PAIR)
    assert list(t.ids) == full and t.start == start and t.span == (start, len(full))
    assert list(t.mask) == [False] * start + [True] * (len(full) - start)
    assert pair_tokens(tok, *PAIR, "p", 512) == (full, start)


def test_chat_pair_trains_the_last_assistant_turn_through_the_template(tok):
    t = chat_pair_tokens(tok, CHAT, 512)
    rendered = tok.apply_chat_template(CHAT.chat(), tokenize=False)
    assert list(t.ids) == _ids(tok, rendered) and t.text == rendered
    assert "you are a helpful assistant ." in rendered  # the system prompt is kept
    trained = [i for i, m in zip(t.ids, t.mask) if m]
    assert trained == _ids(tok, "here is a poem about cats .") + [tok.convert_tokens_to_ids("<|im_end|>")]
    # another system prompt is other context tokens, with the same trained tokens
    other = ChatPair("c2", (("system", "you are a cat ."),) + CHAT.messages[1:], (4,))
    o = chat_pair_tokens(tok, other, 512)
    assert o.ids != t.ids and [i for i, m in zip(o.ids, o.mask) if m] == trained


def test_chat_pair_trains_every_chosen_turn(tok):
    both = ChatPair("c3", CHAT.messages, (2, 4))
    t = chat_pair_tokens(tok, both, 512)
    assert t.span is None  # two runs: the engine gathers positions instead of slicing
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [i for i, m in zip(t.ids, t.mask) if m] == (_ids(tok, "sure here is a story .") + [end]
                                                       + _ids(tok, "here is a poem about cats .") + [end])


def test_token_pieces_join_to_the_rendered_text(tok):
    t = chat_pair_tokens(tok, CHAT, 512)
    pieces = token_pieces(tok, t)
    assert len(pieces) == len(t.ids) and "".join(pieces) == t.text
    assert "".join(p for p, m in zip(pieces, t.mask) if m).strip() == "here is a poem about cats .<|im_end|>"


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    # Drops the content of every assistant turn but the last (as reasoning-stripping templates
    # do): the rendering of a prefix is no longer a token prefix of the whole.
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                       "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chat_pair_tokens(t, ChatPair("last-only", CHAT.messages, (4,)), 512)  # the last turn alone is fine
    expect(InvalidValueError, lambda: chat_pair_tokens(t, ChatPair("both", CHAT.messages, (2, 4)), 512),
           "pair 'both'", "cannot be isolated", "model.chat_template")


def test_template_errors_and_bad_conversations_name_the_pair(tok):
    t = copy.deepcopy(tok)
    t.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    expect(InvalidValueError, lambda: chat_pair_tokens(t, CHAT, 512), "pair 'c1'", "no system role")
    expect(InvalidValueError, lambda: ChatPair("u", (("user", "hi"), ("assistant", "ok")), (0,)), "pair 'u'",
           "not an assistant turn")
    expect(InvalidValueError, lambda: ChatPair("v", (("robot", "hi"),), (0,)), "pair 'v'", "role")
    expect(InvalidValueError, lambda: chat_pair_tokens(tok, CHAT, 20), "pair 'c1'", "update.max_length = 20")


def _manual_masked_sgd(model, ids, mask, lr):
    c = copy.deepcopy(model)
    for p in c.parameters():
        p.requires_grad_(True)
    logits = c(ids).logits[0]
    at = mask.nonzero()[:, 0]
    torch.nn.functional.cross_entropy(logits[at - 1], ids[0, at]).backward()
    return {n: (p - lr * p.grad).detach() for n, p in c.named_parameters()}


def test_engine_masked_update_equals_autograd(model, tok):
    engine = UpdateEngine(model, tok, UpdateCfg(lr=1e-2))
    for pair in (CHAT, ChatPair("c3", CHAT.messages, (2, 4))):
        ids, mask = engine.example(pair)
        t = chat_pair_tokens(tok, pair, 512)
        assert ids[0].tolist() == list(t.ids) and mask.tolist() == list(t.mask)
        new, ref = engine.update_pair(pair), _manual_masked_sgd(model, ids, mask, 1e-2)
        base = params_of(model)
        for n in base:
            scale = (ref[n] - base[n]).abs().max().item()
            assert (new[n] - ref[n]).abs().max().item() <= TIGHT * max(scale, 1e-300), n


def test_flat_update_and_gradient_are_unchanged_bit_for_bit(model, tok):
    engine = UpdateEngine(model, tok, UpdateCfg(lr=1e-2))
    flat = ChatPair.flat(*PAIR, "p")
    a, b = engine.update(*PAIR, "p"), engine.update_pair(flat)
    assert all(torch.equal(a[n], b[n]) for n in a)
    ga, gb = engine.gradient(*PAIR, "p"), engine.gradient_pair(flat)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    # the old slice-based loss, written out: logits of positions start-1 .. T-2
    ids, start = engine.tokens(*PAIR, "p")
    _, mask = engine.example(flat)
    assert mask.tolist() == [False] * start + [True] * (ids.shape[1] - start)


@pytest.mark.slow
def test_shipped_pairs_on_the_embedded_default_keep_their_tokens_and_mask():
    """SmolLM2's own template (≈13 s to load the GGUF tokenizer): every shipped pair of both
    behaviours gives the tokens and response start of the previous code, and a multi-turn chat
    with a system prompt splits into turns."""
    import json

    from transformers import AutoTokenizer

    from policytrace.behaviours import BEHAVIOURS
    from policytrace.model.loading import default_model_location

    folder, gguf = default_model_location()
    real = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    for b in BEHAVIOURS.values():
        for line in b.shipped("pairs").read_text().splitlines():
            r = json.loads(line)
            t = chat_pair_tokens(real, ChatPair.flat(r["prompt"], r["response"], r["id"]), 512)
            full, start = _old_pair_tokens(real, r["prompt"], r["response"])
            assert list(t.ids) == full and list(t.mask) == [False] * start + [True] * (len(full) - start), r["id"]
    chat = ChatPair("c", (("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"),
                          ("assistant", "Goodbye.")), (2, 4))
    t = chat_pair_tokens(real, chat, 512)
    trained = real.decode([i for i, m in zip(t.ids, t.mask) if m])
    assert trained == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n" and "You are terse." in t.text
