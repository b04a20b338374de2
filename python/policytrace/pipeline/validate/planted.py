"""Planted mislabeled pairs: can a method find them? The behaviour plants them (prompts of one
label answered with responses of the other, posing as their prompt's label) and says where each
kind hides; every method ranks the candidates, reported as AUC and precision@k."""

from __future__ import annotations

import numpy as np
import polars as pl

from ... import _progress
from ...numeric.metrics import auc, precision_at_k
from ..data import chat_pair
from ..stages import BaseState
from .baselines import gradient_baselines, projection_baselines
from .scores import model_free_scores

UNSIGNED = {"suspicion"}
GRADIENT_COLUMNS = ("grad_cosine", "concept_influence", "behaviour_first_order")
PROJECTION_COLUMNS = ("vector_filter", "projection_difference")


def planted_deltas(state: BaseState, planted: pl.DataFrame, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    dX, dy = [], []
    bar = _progress.bar(planted.height, "planted pair", progress)
    for r in planted.iter_rows(named=True):
        d = state.delta(state.model.engine.update_pair(chat_pair(r)), r["id"])
        dX.append(d.dX)
        dy.append(d.dy)
        bar.update(1)
    bar.close()
    return np.stack(dX), np.stack(dy)


def engine_scorer(state: BaseState, deltas: tuple, seed: int, progress: bool):
    """Scores of the run's pairs (stored deltas) and planted ones (fresh engine deltas)."""

    def score(both: pl.DataFrame, planted: pl.DataFrame) -> dict:
        _, dX, dy = deltas
        pdX, pdy = planted_deltas(state, planted, progress)
        return model_free_scores(state, both, np.concatenate([dX, pdX]), np.concatenate([dy, pdy]), seed)

    return score


def planted_test(state: BaseState, n: int, seed: int, scorer, baselines: bool, progress: bool = True,
                 probe_grads=None) -> pl.DataFrame:
    """Detection of ``n`` planted pairs by each method: for every planted kind, AUC and
    precision@k of ``sign`` × score among the kind's candidate pool. ``scorer(both, planted)``
    gives the run's own methods' scores for the run's pairs followed by the planted ones."""
    behaviour = state.inputs.behaviour
    planted = behaviour.plant_pairs(state.inputs.pairs, n, seed)
    both = pl.concat([state.inputs.pairs, planted])
    sc = scorer(both, planted)
    if baselines:
        gb = gradient_baselines(state, state.cfg.update.lr, both, probe_grads)
        pb = projection_baselines(state, both)
        sc |= {col: gb[col].to_numpy() for col in GRADIENT_COLUMNS}
        sc |= {col: pb[col].to_numpy() for col in PROJECTION_COLUMNS}
    label = np.array(both["label"].to_list(), dtype=object)
    rows = []
    for method, s_ in sc.items():
        for kind in behaviour.planted_kinds(both):
            lab = (label == kind.name)[kind.pool]
            # suspicion already points at what contradicts the label, for every kind
            sign = 1.0 if method in UNSIGNED else kind.sign
            score = sign * np.asarray(s_)[kind.pool]
            k = int(lab.sum())
            rows.append({"method": method, "kind": kind.name, "auc": auc(score, lab),
                         "precision_at_k": precision_at_k(score, lab, k) if k else float("nan"),
                         "n_planted": k, "n_candidates": int(kind.pool.sum())})
    return pl.DataFrame(rows)
