"""Top-k removal: retrain without each method's top-k pairs, and without category-matched
random pairs; a method is useful when removing its top pairs moves the shift more."""

from __future__ import annotations

import numpy as np
import polars as pl

from ... import _progress
from ...errors import InvalidValueError
from .retrain import Retrainer


def removal_test(retrainer: Retrainer, scores: dict, k: int, seed: int, n_random: int = 3,
                 progress: bool = True, methods: list[str] | None = None) -> pl.DataFrame:
    """One row per method (``methods``, default all): the drop of the behaviour and policy shifts
    when its top-k pairs are removed, beside the mean drop over ``n_random`` category-matched
    random removals."""
    if methods is not None:
        unknown = sorted(set(methods) - set(scores))
        if unknown:
            raise InvalidValueError(f"--removal-methods {unknown} are not methods of this run ({', '.join(scores)})")
        scores = {m: scores[m] for m in methods}
    pairs = retrainer.state.inputs.pairs
    P = pairs.height
    if not 1 <= k < P:
        raise InvalidValueError(f"removal k = {k} must be between 1 and the number of pairs - 1 ({P - 1})")
    everything = np.arange(P)
    full = retrainer.measure(everything)
    cats = pairs["category"].to_numpy()
    rng = np.random.default_rng(seed + 7)
    rows = []
    bar = _progress.bar(len(scores) * (1 + n_random), "retrain", progress)
    for method, sc in scores.items():
        top = np.argsort(-np.asarray(sc), kind="stable")[:k]
        without = retrainer.measure(np.setdiff1d(everything, top))
        bar.update(1)
        rand_beh, rand_pol = [], []
        for _ in range(n_random):
            pick: list[int] = []
            for c in cats[top]:
                pool = [j for j in np.flatnonzero(cats == c) if j not in pick]
                pick.append(int(rng.choice(pool)))
            r = retrainer.measure(np.setdiff1d(everything, pick))
            rand_beh.append(full["behaviour_shift"] - r["behaviour_shift"])
            rand_pol.append(full["policy_shift"] - r["policy_shift"])
            bar.update(1)
        rows.append({
            "method": method, "k": k,
            "removed": ", ".join(pairs["id"][int(j)] for j in top),
            "behaviour_drop": full["behaviour_shift"] - without["behaviour_shift"],
            "behaviour_drop_random": float(np.mean(rand_beh)),
            "policy_drop": full["policy_shift"] - without["policy_shift"],
            "policy_drop_random": float(np.mean(rand_pol)),
        })
    bar.close()
    return pl.DataFrame(rows)
