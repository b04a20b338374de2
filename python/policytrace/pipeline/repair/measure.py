"""What a repair is judged by: the behaviour on the run's probes (and on a second probe set), and
what it costs — the loss on the pairs it kept and on a shipped held-out text set.

* **Behaviour**: the run's score ``y`` per probe under given weights (the run's probe pass), its
  mean over all probes, over each side of the behaviour's flag and per probe category.
* **Kept-pair loss**: each pair's masked loss (the mean cross-entropy of its trained tokens, as
  the fine-tune trained on it), averaged over pairs.
* **Held-out loss**: mean next-token cross-entropy per token over ``data/heldout_text_v1.jsonl``
  (32 short paragraphs of plain English written for this purpose: cooking, nature, science,
  everyday instructions; no pair, probe or SAE-corpus text), each text without a chat template,
  up to :data:`HELDOUT_MAX_TOKENS` tokens. General ability a repair should not break.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidValueError
from ...model.chat import encode_prompts
from ...model.functional import Functional, upcast
from ..data import chat_pair, load_probes, probe_chat
from ..stages import BaseState

HELDOUT_FILE = Path(__file__).parent / "data" / "heldout_text_v1.jsonl"
HELDOUT_MAX_TOKENS = 128


def heldout_texts(path: Path = HELDOUT_FILE) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class ProbeSet:
    """A probe set scored with the run's behaviour: token ids, ids, flag (None when absent)."""

    name: str
    tokens: list[list[int]]
    ids: list[str]
    flag: np.ndarray | None
    categories: np.ndarray


def run_probes(state: BaseState) -> ProbeSet:
    inp = state.inputs
    return ProbeSet("probes", state.model.probe_tokens, inp.probes["id"].to_list(), inp.flag, inp.categories)


def second_probes(state: BaseState, path: str | Path) -> ProbeSet:
    """A second probe file (same behaviour, same data columns as the run's), tokenized as the run's."""
    frame = load_probes(path, state.inputs.behaviour, state.cfg.data)
    col = frame[state.inputs.behaviour.flag]
    flag = None if col.null_count() else col.to_numpy().astype(bool)
    tokens = encode_prompts(state.model.lm.tokenizer, probe_chat(frame), frame["id"].to_list(),
                            state.cfg.probe.max_length)
    return ProbeSet(Path(path).name, tokens, frame["id"].to_list(), flag, frame["category"].to_numpy())


def behaviour_summary(y: np.ndarray, ps: ProbeSet) -> dict:
    out = {"mean": float(y.mean()), "n": int(len(y))}
    if ps.flag is not None:
        out["flagged"] = float(y[ps.flag].mean()) if ps.flag.any() else None
        out["unflagged"] = float(y[~ps.flag].mean()) if (~ps.flag).any() else None
    out["by_category"] = {c: float(y[ps.categories == c].mean()) for c in sorted(set(ps.categories.tolist()))}
    return out


@dataclass
class Meter:
    """Measures weights against one run: behaviour on its probe sets, losses on pairs and text."""

    state: BaseState
    probe_sets: tuple[ProbeSet, ...]
    texts: tuple[str, ...]

    @classmethod
    def for_run(cls, state: BaseState, probes2: str | Path | None = None) -> "Meter":
        sets = (run_probes(state),) + ((second_probes(state, probes2),) if probes2 else ())
        return cls(state, sets, tuple(heldout_texts()))

    def scores(self, params: dict | None) -> dict[str, np.ndarray]:
        """``y`` per probe of every probe set under ``params`` (None = the base weights)."""
        runner = self.state.model.runner
        return {ps.name: runner.run(ps.tokens, params=params, probe_ids=ps.ids)[1] for ps in self.probe_sets}

    def behaviour(self, params: dict | None) -> dict:
        return {ps.name: behaviour_summary(y, ps) for ps, y in zip(self.probe_sets, self.scores(params).values())}

    def mean_y(self, params: dict | None) -> float:
        """The mean score on the run's own probes (the stop rule's check)."""
        ps = self.probe_sets[0]
        return float(self.state.model.runner.run(ps.tokens, params=params, probe_ids=ps.ids)[1].mean())

    def pair_loss(self, params: dict | None, rows: list[dict]) -> float | None:
        """Mean over ``rows`` of each pair's masked loss (None for no rows)."""
        if not rows:
            return None
        engine = self.state.model.engine
        return float(np.mean([engine.loss_pair(chat_pair(r), params) for r in rows]))

    def heldout_loss(self, params: dict | None) -> float:
        """Mean next-token cross-entropy per token over the held-out texts (module docstring)."""
        lm = self.state.model.lm
        model, tok, device = lm.model, lm.tokenizer, self.state.cfg.model.device
        fn = Functional(model)
        total, count = 0.0, 0
        with torch.no_grad():
            for text in self.texts:
                ids = tok(text, add_special_tokens=False)["input_ids"][:HELDOUT_MAX_TOKENS]
                if len(ids) < 2:
                    continue
                t = torch.tensor([ids], device=device)
                logits = fn.call(params, lambda x: model(input_ids=x).logits, t)[0, :-1]
                total += float(torch.nn.functional.cross_entropy(upcast(logits), t[0, 1:], reduction="sum"))
                count += len(ids) - 1
        if count == 0:
            raise InvalidValueError("the held-out texts tokenize to nothing")
        return total / count


def moved_back(base: float, finetuned: float, repaired: float) -> dict:
    """How far a repair moved the behaviour back towards the base model: ``back`` in the score's
    units (> 0: towards the base level, in the direction the fine-tune moved it away) and
    ``fraction`` of the fine-tune's own change (1 = back at the base level; null when the
    fine-tune did not move it)."""
    change = finetuned - base
    sign = 1.0 if change >= 0 else -1.0
    back = sign * (finetuned - repaired)
    return {"change": repaired - finetuned, "back": back, "fraction": back / abs(change) if change != 0 else None}


def pair_rows(state: BaseState) -> list[dict]:
    return list(state.inputs.pairs.iter_rows(named=True))


