"""Chat formatting of probes and pairs: the token ids of a conversation rendered by the model's
chat template, and which of them a pair trains on (the loss mask).

One rule serves every pair format (flat prompt/response, chat ``messages``, TRL's
prompt/completion): a trained assistant turn's targets are the tokens its rendering adds after
the conversation up to it with the generation prompt appended. So the turn's header (e.g.
``<|im_start|>assistant\\n``) is context, and its content and end-of-turn tokens are trained on.
A flat pair is the conversation [user, assistant] trained on its one assistant turn: exactly the
SMDA recipe's response-only mask. The rule needs every such prefix to render as a token prefix
of the whole conversation; a template that renders earlier turns differently once later ones
follow (one that drops earlier reasoning, say) is refused with an error naming the pair, since
no mask could then be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import InvalidValueError

ROLES = ("system", "developer", "user", "assistant", "tool")
Message = tuple[str, str]
"""(role, content)."""


@dataclass(frozen=True)
class ChatPair:
    """One training example as a conversation: its messages and the indices of the assistant
    turns whose tokens are trained on."""

    id: str
    messages: tuple[Message, ...]
    trained: tuple[int, ...]

    def __post_init__(self) -> None:
        for role, content in self.messages:
            if role not in ROLES or not isinstance(content, str):
                raise InvalidValueError(f"pair '{self.id}': a message must have a role in {ROLES} and text "
                                        f"content (got role {role!r})")
        if not self.trained:
            raise InvalidValueError(f"pair '{self.id}': no assistant turn is trained on")
        if list(self.trained) != sorted(set(self.trained)) or not 0 <= self.trained[0] <= self.trained[-1] < len(self.messages):
            raise InvalidValueError(f"pair '{self.id}': trained turns {list(self.trained)} must be increasing "
                                    f"indices of its {len(self.messages)} messages")
        bad = [i for i in self.trained if self.messages[i][0] != "assistant"]
        if bad:
            raise InvalidValueError(f"pair '{self.id}': message {bad[0]} is trained on but is not an assistant turn")

    @classmethod
    def flat(cls, prompt: str, response: str, pair_id: str = "?") -> ChatPair:
        """A prompt/response pair: one user turn and the trained assistant turn."""
        return cls(pair_id, (("user", prompt), ("assistant", response)), (1,))

    @property
    def is_flat(self) -> bool:
        return [r for r, _ in self.messages] == ["user", "assistant"] and self.trained == (1,)

    def chat(self, stop: int | None = None) -> list[dict]:
        """The first ``stop`` messages (all by default) as the dicts chat templates take."""
        return [{"role": r, "content": c} for r, c in self.messages[:stop]]


@dataclass(frozen=True)
class PairTokens:
    """A pair's chat token ids, the per-token loss mask (True: a target of the loss) and the
    rendered text the ids tokenize."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]
    text: str

    @property
    def start(self) -> int:
        """The first trained position (a flat pair's response start)."""
        return self.mask.index(True)

    @property
    def span(self) -> tuple[int, int] | None:
        """(start, stop) when the trained positions form one run, else None."""
        start = self.start
        stop = start + sum(self.mask)
        return (start, stop) if all(self.mask[start:stop]) else None


def _render(tokenizer, messages: list[dict], generation: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
    except Exception as e:  # jinja2's TemplateError, or the template's own raise_exception
        raise InvalidValueError(f"{where}: the chat template cannot render it ({type(e).__name__}: {e}); "
                                "set model.chat_template or change the conversation") from e


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def format_chat(tokenizer, messages: list[dict], where: str = "probe") -> list[int]:
    """Token ids of a conversation with the generation prompt appended (a probe)."""
    return _ids(tokenizer, _render(tokenizer, messages, True, where))


def format_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt with the generation prompt appended."""
    return format_chat(tokenizer, [{"role": "user", "content": prompt}])


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]], ids: Sequence[str], max_length: int) -> list[list[int]]:
    """Every probe's chat-formatted ids (a prompt, or a conversation ending with a user turn);
    an over-long probe is an error naming it (never truncated: a cut prompt would measure
    another question)."""
    out = []
    for pid, prompt in zip(ids, prompts):
        chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        toks = format_chat(tokenizer, chat, f"probe '{pid}'")
        if len(toks) > max_length:
            raise InvalidValueError(
                f"probe '{pid}' is {len(toks)} tokens long once chat-formatted, over "
                f"probe.max_length = {max_length}; shorten it or raise the limit (never truncated)"
            )
        out.append(toks)
    return out


def _prefix_length(tokenizer, pair: ChatPair, stop: int, generation: bool, full: list[int]) -> int:
    """Length of the rendering of the first ``stop`` messages, checked to be a token prefix of
    the whole conversation's."""
    what = f"the conversation up to message {stop}" + (" with the generation prompt" if generation else "")
    ids = _ids(tokenizer, _render(tokenizer, pair.chat(stop), generation, f"pair '{pair.id}'"))
    if full[: len(ids)] != ids:
        raise InvalidValueError(
            f"pair '{pair.id}': the chat template renders {what} differently from how it begins the whole "
            "conversation, so the trained assistant tokens cannot be isolated; set model.chat_template to a "
            "template that renders earlier turns unchanged (or train only the last turn: data.train_turns)"
        )
    return len(ids)


def chat_pair_tokens(tokenizer, pair: ChatPair, max_length: int) -> PairTokens:
    """The pair's token ids through the chat template and its loss mask: for each trained
    assistant turn, the tokens its rendering adds after the conversation up to it with the
    generation prompt (module docstring). Over-long pairs are an error, never truncated."""
    text = _render(tokenizer, pair.chat(), False, f"pair '{pair.id}'")
    full = _ids(tokenizer, text)
    mask = [False] * len(full)
    for turn in pair.trained:
        begin = _prefix_length(tokenizer, pair, turn, True, full)
        end = len(full) if turn + 1 == len(pair.messages) else _prefix_length(tokenizer, pair, turn + 1, False, full)
        if end <= begin:
            raise InvalidValueError(f"pair '{pair.id}': the response adds no tokens (assistant message {turn})")
        mask[begin:end] = [True] * (end - begin)
    if len(full) > max_length:
        raise InvalidValueError(
            f"pair '{pair.id}' is {len(full)} tokens long, over update.max_length = {max_length} "
            "(never truncated): shorten it or raise the limit"
        )
    return PairTokens(tuple(full), tuple(mask), text)


def pair_tokens(tokenizer, prompt: str, response: str, pair_id: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the full chat (user + assistant) and where the response starts: the flat
    case of :func:`chat_pair_tokens`."""
    t = chat_pair_tokens(tokenizer, ChatPair.flat(prompt, response, pair_id), max_length)
    return list(t.ids), t.start


def token_pieces(tokenizer, tokens: PairTokens) -> list[str]:
    """Each token as the piece of the rendered text it covers (text between tokens, such as
    spaces a pre-tokenizer drops, goes with the next token), so the pieces join to the text.
    Tokenizers without offsets fall back to decoding each token alone."""
    try:
        enc = tokenizer(tokens.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, ValueError, TypeError):
        offsets = None
    if offsets is None or list(enc["input_ids"]) != list(tokens.ids):
        return [tokenizer.decode([i]) for i in tokens.ids]
    ends, last = [], 0
    for _, e in offsets:  # nondecreasing, so every piece is a slice of the text
        last = max(last, int(e))
        ends.append(last)
    ends[-1] = len(tokens.text)
    starts = [0] + ends[:-1]
    return [tokens.text[s:e] for s, e in zip(starts, ends)]
