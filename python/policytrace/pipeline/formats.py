"""The conversation of a probe or pair row, in any of the layouts SFT data comes in.

* **flat**: ``prompt`` and ``response`` strings: one user turn and the trained assistant turn.
* **messages**: a chat list of ``{"role", "content"}`` (system prompts, several turns; TRL's
  conversational language-modeling format). A pair ends with an assistant turn;
  ``data.train_turns`` says which assistant turns are trained on (the last, or all).
* **prompt_completion**: TRL's ``prompt`` and ``completion``, both strings (a flat pair) or
  both message lists (the conversation is prompt + completion; only the completion's assistant
  turns are trained on, as TRL's completion-only loss does).

Probes are a ``prompt`` string or ``messages`` ending with a user turn. The column names come
from ``[data]``; ``data.format = "auto"`` picks the layout from the columns a file has. The
result is the same normalized conversation whatever the layout, so the same pairs give the
same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DataError
from ..model.chat import ROLES, Message
from .config import DataCfg


@dataclass(frozen=True)
class Conversation:
    """A row's messages and the indices of its trained assistant turns (none for a probe)."""

    messages: tuple[Message, ...]
    trained: tuple[int, ...] = ()

    @property
    def prompt(self) -> str:
        """The last user turn before the (last) trained turn: what tables show as the prompt."""
        stop = self.trained[-1] if self.trained else len(self.messages)
        return next(c for r, c in reversed(self.messages[:stop]) if r == "user")

    @property
    def response(self) -> str:
        return self.messages[self.trained[-1]][1]

    @property
    def is_flat(self) -> bool:
        """One user turn (and, for a pair, one trained assistant turn): the flat layout."""
        roles = [r for r, _ in self.messages]
        return roles == (["user", "assistant"] if self.trained else ["user"]) and self.trained in ((), (1,))


def layout(columns: set[str], cfg: DataCfg, kind: str, path: Any) -> str:
    """The row layout of a file: ``data.format``, or the one its columns imply."""
    if kind == "probe":  # data.format is the pairs'; a probe is a prompt or messages
        return "messages" if cfg.messages_column in columns and cfg.prompt_column not in columns else "flat"
    if cfg.format != "auto":
        return cfg.format
    found = [name for name, col in (("messages", cfg.messages_column), ("prompt_completion", cfg.completion_column),
                                    ("flat", cfg.response_column)) if col in columns]
    if len(found) > 1:
        raise ConfigError(f"{path}: the pair rows have columns of several layouts ({', '.join(found)}); set "
                          "data.format to the one to read")
    if not found:
        raise DataError(f"{path}: no pair conversation found: expected a `{cfg.messages_column}` column (chat), "
                        f"`{cfg.prompt_column}` + `{cfg.completion_column}` (TRL) or `{cfg.prompt_column}` + "
                        f"`{cfg.response_column}`; map your column names with data.messages_column, "
                        "data.prompt_column, ...")
    return found[0]


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {value!r}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _messages(value: Any, key: str, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} messages, got {value!r:.80}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be {{\"role\": ..., \"content\": \"text\"}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append((m["role"], m["content"]))
    return tuple(out)


def _trained(messages: tuple[Message, ...], first: int, cfg: DataCfg, where: str) -> tuple[int, ...]:
    """The trained assistant turns among messages[first:] (``data.train_turns``)."""
    turns = [i for i in range(first, len(messages)) if messages[i][0] == "assistant"]
    if not turns or messages[-1][0] != "assistant":
        raise DataError(f"{where}: a pair's conversation must end with the assistant turn it trains on")
    chosen = tuple(turns) if cfg.train_turns == "all" else (turns[-1],)
    if not any(r == "user" for r, _ in messages[: chosen[0]]):
        raise DataError(f"{where}: no user turn before the trained assistant turn {chosen[0]}")
    for i in chosen:
        if not messages[i][1].strip():
            raise DataError(f"{where}: the trained assistant turn {i} is empty")
    return chosen


def pair_conversation(row: dict, where: str, cfg: DataCfg, fmt: str) -> Conversation:
    """A pair row's conversation in layout ``fmt``."""
    if fmt == "flat":
        prompt, response = _text(row, cfg.prompt_column, where), _text(row, cfg.response_column, where)
        return Conversation((("user", prompt), ("assistant", response)), (1,))
    if fmt == "messages":
        msgs = _messages(row.get(cfg.messages_column), cfg.messages_column, where)
        return Conversation(msgs, _trained(msgs, 0, cfg, where))
    prompt, completion = row.get(cfg.prompt_column), row.get(cfg.completion_column)
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt, completion = _text(row, cfg.prompt_column, where), _text(row, cfg.completion_column, where)
        return Conversation((("user", prompt), ("assistant", completion)), (1,))
    if isinstance(prompt, list) and isinstance(completion, list):
        head = _messages(prompt, cfg.prompt_column, where)
        msgs = head + _messages(completion, cfg.completion_column, where)
        return Conversation(msgs, _trained(msgs, len(head), cfg, where))
    raise DataError(f"{where}: TRL's '{cfg.prompt_column}' and '{cfg.completion_column}' must both be strings or "
                    f"both message lists (got {type(prompt).__name__} and {type(completion).__name__})")


def probe_conversation(row: dict, where: str, cfg: DataCfg, fmt: str) -> Conversation:
    """A probe row's conversation: a prompt, or messages ending with a user turn."""
    if fmt != "messages":
        return Conversation((("user", _text(row, cfg.prompt_column, where)),))
    msgs = _messages(row.get(cfg.messages_column), cfg.messages_column, where)
    if msgs[-1][0] != "user" or not msgs[-1][1].strip():
        raise DataError(f"{where}: a probe's conversation must end with a non-empty user turn (the model answers it)")
    return Conversation(msgs)
