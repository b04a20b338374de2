"""Engine mode, the paper's experiment: each pair alone takes the configured update from θ0,
a probe pass under the updated weights measures ΔX and Δy, and the numeric core decomposes them
(exact refits or first order). The only mode that writes per-pair deltas, so validation
re-decomposes them both ways (model-free scores) without touching the model again."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from ...errors import RunFolderError
from ...numeric import Attributor
from ...numeric.frames import pairs_frame
from ...numeric.metrics import spearman, top_k_overlap
from ..data import chat_pair
from ..distributed import SINGLE, Ranks
from ..findings import side_means
from ..layers import engine_pair_layers
from ..rundir import RunDir
from ..stages import BaseState
from .base import Bar, Deltas, Log, Mode, Prepared, RunScores, ShardFrames


@dataclass(frozen=True)
class EnginePrepared(Prepared):
    attributor: Attributor
    """Streams the shards' deltas through the core (``keep=False``: frames are returned, not held)."""


def attributor(state: BaseState) -> Attributor:
    cfg = state.cfg
    return Attributor(state.policy, state.features.X, state.base.y0, method=cfg.decompose.method,
                      probe_groups=state.inputs.categories.tolist(), feature_groups=state.features.groups,
                      threads=cfg.run.threads, keep=False)


class EngineMode(Mode[EnginePrepared]):
    name = "engine"

    def prepare(self, state: BaseState, log: Log, progress: bool, ranks: Ranks = SINGLE) -> EnginePrepared:
        return EnginePrepared(attributor(state))

    def shard(self, state: BaseState, prepared: EnginePrepared, rows: pl.DataFrame, bar: Bar) -> ShardFrames:
        """Update on every pair, measure, decompose the shard in one call of the core."""
        dXs, dys, layered = [], [], []
        for r in rows.iter_rows(named=True):
            params = state.model.engine.update_pair(chat_pair(r))
            d = state.delta(params, r["id"])
            dXs.append(sp.csr_matrix(d.dX))
            dys.append(d.dy)
            if state.layers:
                layered.append(d)
            bar.update(1)
        ids, dy = rows["id"].to_list(), np.stack(dys)
        att = prepared.attributor
        pf = att.add(dXs, dy, pair_ids=ids, pair_groups=rows["category"].to_list())
        side = side_means(dy, state.inputs.flag)
        pairs = pairs_frame(att.last_pairs, rows["label"].to_list(), self.name, side["dy_on_flagged"],
                            side["dy_on_unflagged"])
        # the stored ΔX is the one decomposed (the CSR copy drops explicit zeros' signs)
        deltas = Deltas(ids, np.stack([d.toarray() for d in dXs]), dy)
        by_layer = engine_pair_layers(state, ids, att.last_pairs, layered) if state.layers else None
        return ShardFrames(pairs, att.last_behaviour, pf, deltas, by_layer)

    def validation(self, rd: RunDir, manifest: dict, state: BaseState, seed: int, log: Log,
                   progress: bool) -> RunScores:
        return delta_scores(rd, manifest, state, seed, progress)


def delta_scores(rd: RunDir, manifest: dict, state: BaseState, seed: int, progress: bool) -> RunScores:
    """Validation's scores of a run that stored its deltas: both decompositions of the stored
    ΔX/Δy (and the model-free methods), planted pairs through fresh engine updates, and how
    the exact and first-order scores agree. (Any mode whose shards carry deltas can use it.)"""
    # validate imports the mode registry; importing it here, when called, keeps that one-way
    from ..validate.planted import engine_scorer
    from ..validate.scores import load_deltas, model_free_scores

    t = time.perf_counter()
    ids, dX, dy = load_deltas(rd, manifest)
    if ids != state.inputs.pairs["id"].to_list():
        raise RunFolderError(f"{rd.path}: stored deltas do not match the run's pairs; run it again")
    scores = model_free_scores(state, state.inputs.pairs, dX, dy, seed)
    n = len(ids)
    timings = {"decomposition_both_methods_per_100_pairs_s": 100 * (time.perf_counter() - t) / n}
    k = max(1, n // 10)
    agreement = {"spearman_exact_first_order": spearman(scores["score_exact"], scores["score_first_order"]),
                 f"top{k}_overlap": top_k_overlap(scores["score_exact"], scores["score_first_order"], k)}
    return RunScores(scores, engine_scorer(state, (ids, dX, dy), seed, progress), agreement, timings)
