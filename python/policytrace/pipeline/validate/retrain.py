"""Real retraining on subsets of the run's pairs, measured the way the attributions predict.

Each retraining fine-tunes from the base weights on a set of pairs (one update per pair, in a
seeded order, with the run's recipe), re-runs the probe pass and measures the **behaviour**
shift (mean Δy, overall and per probe category) and the **policy** shift (the exact refit of the
policy on (X+ΔX, y+Δy), scored as ΔW·W). Results are cached in ``RUN_DIR/validation/`` under a
hash of the member set and seed, so a validation resumes and reproduces exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..._files import write_atomic
from ...errors import InvalidValueError
from ...numeric import Attributor
from ..data import chat_pair
from ..stages import BaseState


def subset_masks(n_pairs: int, m: int, alpha: float, seed: int) -> np.ndarray:
    """``m`` seeded random subsets of exactly ``round(alpha·n_pairs)`` pairs, as (m, P) masks."""
    if not 0 < alpha < 1:
        raise InvalidValueError(f"alpha = {alpha} must be strictly between 0 and 1")
    size = max(1, round(alpha * n_pairs))
    if size >= n_pairs:
        raise InvalidValueError(f"alpha = {alpha} keeps every one of the {n_pairs} pairs; lower it or add pairs")
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n_pairs), dtype=bool)
    for i in range(m):
        masks[i, rng.choice(n_pairs, size, replace=False)] = True
    return masks


@dataclass(frozen=True)
class Retrainer:
    """Retrains ``state``'s model on sets of its pairs, caching each result in ``out_dir``."""

    state: BaseState
    seed: int
    out_dir: Path

    def measure(self, members: np.ndarray) -> dict:
        """Shifts after fine-tuning on the pairs at positions ``members``."""
        st = self.state
        pairs = st.inputs.pairs
        ids = sorted(pairs["id"][int(j)] for j in members)
        key = hashlib.sha256(json.dumps([ids, self.seed, *self.key_parts()]).encode()).hexdigest()[:20]
        cache = self.out_dir / f"retrain-{key}.json"
        if cache.exists():
            try:
                return json.loads(cache.read_text())
            except json.JSONDecodeError:
                pass  # a damaged cache entry is recomputed
        d = st.delta(self.retrained(members), "retrained")
        att = Attributor(st.policy, st.features.X, st.base.y0, method="exact", threads=st.cfg.run.threads, keep=False)
        att.add(d.dX, d.dy[None, :], pair_ids=["retrained"])
        cats = st.inputs.categories
        by_cat = {c: float(d.dy[cats == c].mean()) for c in sorted(set(cats.tolist()))}
        rec = {"members": ids, "policy_shift": float(att.last_pairs["score"][0]),
               "behaviour_shift": float(d.dy.mean()), "behaviour_by_category": by_cat}
        write_atomic(cache, json.dumps(rec))
        return rec

    def key_parts(self) -> list:
        """What besides the members and seed the cached result depends on (a subclass's recipe)."""
        return []

    def retrained(self, members: np.ndarray) -> dict:
        """The weights after fine-tuning on ``members``: one update per pair, in a seeded order."""
        st = self.state
        pairs = st.inputs.pairs
        order = np.random.default_rng([self.seed, len(members)]).permutation(np.asarray(members))
        engine = st.model.engine
        params = None
        for j in order:
            r = pairs.row(int(j), named=True)
            params = engine.update_pair(chat_pair(r), from_params=params)
        return params if params is not None else engine.base


class RecipeRetrainer(Retrainer):
    """Validation's subset retraining with the run's ``[train]`` recipe: AdamW, batches, epochs,
    schedule, each subset in the recipe's seeded order, from the base weights."""

    def key_parts(self) -> list:
        return [self.state.cfg.train.recipe()]

    def retrained(self, members: np.ndarray) -> dict:
        import torch

        from ...model.loading import load_model_cfg
        from ...train.finetuning import finetune
        from ..modes.trajectory import run_examples

        st = self.state
        lm = _COPY.get(id(st))
        if lm is None:
            lm = load_model_cfg(st.cfg.model)
            _COPY.clear()
            _COPY[id(st)] = lm
        rows = st.inputs.pairs[sorted(int(j) for j in members)]
        _, exs = run_examples(st, rows)
        params = dict(lm.model.named_parameters())
        base = st.model.engine.base
        res = finetune(st.cfg, exs, None, progress=False, model=lm)
        with torch.no_grad():  # the copy back to θ_0 for the next subset
            for n, t in res.trained.items():
                params[n].copy_(base[n])
        return {**base, **res.trained}


_COPY: dict = {}
