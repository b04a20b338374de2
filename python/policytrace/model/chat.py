"""Chat formatting of probes and pairs: token ids of the prompt with the generation prompt, and
of a full exchange with the position where the response starts."""

from __future__ import annotations

from typing import Sequence

from ..errors import InvalidValueError


def format_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt with the generation prompt appended."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(tokenizer, prompts: Sequence[str], ids: Sequence[str], max_length: int) -> list[list[int]]:
    """Every probe's chat-formatted ids; an over-long probe is an error naming it (never
    truncated: a cut prompt would measure another question)."""
    out = []
    for pid, prompt in zip(ids, prompts):
        toks = format_prompt(tokenizer, prompt)
        if len(toks) > max_length:
            raise InvalidValueError(
                f"probe '{pid}' is {len(toks)} tokens long once chat-formatted, over "
                f"probe.max_length = {max_length}; shorten it or raise the limit (never truncated)"
            )
        out.append(toks)
    return out


def pair_tokens(tokenizer, prompt: str, response: str, pair_id: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the full chat (user + assistant) and where the response starts.

    The chat with the response must begin with exactly the tokens of the prompt with its
    generation prompt; otherwise the response-only loss mask would be wrong.
    """
    prompt_ids = format_prompt(tokenizer, prompt)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    full = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if full[: len(prompt_ids)] != prompt_ids:
        raise InvalidValueError(
            f"pair '{pair_id}': the chat template renders the prompt differently with and without "
            "the response, so the response tokens cannot be isolated; set model.chat_template"
        )
    if len(full) <= len(prompt_ids):
        raise InvalidValueError(f"pair '{pair_id}': the response adds no tokens")
    if len(full) > max_length:
        raise InvalidValueError(
            f"pair '{pair_id}' is {len(full)} tokens long, over update.max_length = {max_length} "
            "(never truncated): shorten it or raise the limit"
        )
    return full, len(prompt_ids)
