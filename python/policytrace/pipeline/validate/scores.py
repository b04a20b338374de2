"""Per-pair scores of the model-free methods (from the run's stored ΔX/Δy) and their
category / label aggregates."""

from __future__ import annotations

import numpy as np
import polars as pl

from ...errors import RunFolderError
from ...numeric import Attributor
from ..findings import side_means
from ..rundir import RunDir
from ..stages import BaseState


def load_deltas(rd: RunDir, manifest: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every pair's stored (ΔX, Δy), in shard order (each shard's digest checked)."""
    ids, dX, dy = [], [], []
    for shard in sorted(int(s) for s in manifest.get("shards", {})):
        name = rd.shard_marker(shard)
        marker = rd.marker(name)
        if marker is None:
            raise RunFolderError(f"{rd.file(name)} (the marker of shard {shard}) is missing or unreadable; run the "
                                 "same `policytrace run` command again to repair it")
        bad = rd.damaged(marker["files"])
        if bad:
            raise RunFolderError(f"{rd.file(bad[0])} is missing or changed since shard {shard} was written; run "
                                 "the same `policytrace run` command again to repair it")
        z = rd.read_npz(rd.shard_file("deltas", shard), ("ids", "dX", "dy"))
        ids += z["ids"].tolist()
        dX.append(z["dX"])
        dy.append(z["dy"])
    if not ids:
        raise RunFolderError(f"{rd.path} has no per-pair deltas; run it again")
    return ids, np.concatenate(dX), np.concatenate(dy)


def suspicion_scores(state: BaseState, pairs: pl.DataFrame, dy: np.ndarray) -> np.ndarray:
    """The behaviour's suspicion of each pair (rows of ``pairs``, Δy rows in the same order)."""
    frame = pairs.select(pl.col("id").alias("pair_id"), "label", state.inputs.behaviour.flag).with_columns(
        **side_means(dy, state.inputs.flag))
    return state.inputs.behaviour.suspicion(frame)["suspicion"].fill_null(0.0).to_numpy()


def model_free_scores(state: BaseState, pairs: pl.DataFrame, dX: np.ndarray, dy: np.ndarray, seed: int) -> dict:
    """SMDA's pair score (exact and first order), the pair's own measured and policy-predicted
    mean Δy, the curator's suspicion, and a random score, per pair (``pairs``: their rows)."""
    ids = pairs["id"].to_list()
    scores = {}
    for method in ("exact", "first_order"):
        att = Attributor(state.policy, state.features.X, state.base.y0, method=method,
                         threads=state.cfg.run.threads, keep=False)
        att.add(list(dX), dy, pair_ids=ids)
        scores[f"score_{method}"] = att.last_pairs["score"].to_numpy()
    pol = state.policy
    scores["dy_mean"] = dy.mean(axis=1)
    scores["pred_dy_mean"] = np.array([((d / pol.scale) @ pol.coef).mean() for d in dX])
    scores["suspicion"] = suspicion_scores(state, pairs, dy)
    scores["random"] = np.random.default_rng(seed + 1).normal(size=len(ids))
    return scores


def aggregate_scores(scores: dict, pairs: pl.DataFrame) -> pl.DataFrame:
    """Per-category and per-label means of every method's scores, as z-scores within the method
    (the bin view: noisy per-pair scores become stable group signals)."""
    rows = []
    for method, sc in scores.items():
        sc = np.asarray(sc, float)
        sd = sc.std()
        z = (sc - sc.mean()) / sd if sd > 0 else np.zeros_like(sc)
        for by in ("category", "label"):
            keys = pairs[by].to_numpy()
            for k in sorted(set(keys.tolist())):
                m = keys == k
                rows.append({"method": method, "by": by, "group": k, "pairs": int(m.sum()),
                             "mean_z": float(z[m].mean()), "mean_score": float(sc[m].mean())})
    return pl.DataFrame(rows)
