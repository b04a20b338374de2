"""Gradient mode: every first-order output of a pair from one backward pass on the pair.

Each output is a linear functional of (ΔX, Δy) (:mod:`policytrace.numeric.concepts`), and to
first order (ΔX, Δy) are linear in the update Δθ, so output ``c`` of pair ``i`` is
``∇θφ_c(θ0) · Δθ_i``: one backward pass over the probes per concept, once
(:func:`policytrace.gradients.concept.concept_gradients`), then per pair one backward pass on
the pair and C inner products, exact with whole gradients or through a seeded per-module
projection (``gradient.projection_dim``), whose pair vectors are kept in an on-disk store that
a later run on the same model, pairs and update reuses. The frames have the engine's columns
(``mode = "gradient"``); what first order cannot give is null (the exact interaction, per-probe
mediated R², mediated Δy per category).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from .. import _core
from ..errors import NonFiniteError
from ..gradients.concept import concept_gradients
from ..gradients.per_pair import check_first_order, direction_products, update_direction
from ..gradients.projection import projector
from ..numeric.concepts import Concept, concepts
from ..numeric.interference import interference
from .distributed import SINGLE, Ranks
from .rundir import RunDir
from .stages import BaseState

SCORES = ("score_x", "score_y", "dy_mean", "mediated_dy")


@dataclass(frozen=True)
class GradientSetup:
    """The concepts, their gradients (C, D) and the projection pair vectors go through."""

    names: list[str]
    grads: torch.Tensor
    project: object
    store: RunDir | None
    seconds: float = 0.0
    """The one-time cost: the concept gradients' backward passes over the probes."""
    computed: int = 0
    """How many of the concepts this process computed (all of them outside torchrun)."""


def concept_list(state: BaseState) -> list[Concept]:
    cs = concepts(state.policy, state.features.X, state.base.y0, state.inputs.flag, state.cfg.gradient.per_feature)
    cats = state.inputs.categories
    n = len(cats)
    for c in sorted(set(cats.tolist())):
        m = cats == c
        cs.append(Concept(f"dy_cat:{c}", np.zeros_like(cs[0].cx), m / m.sum()))
    if state.cfg.gradient.per_feature:
        pol = state.policy
        for j, fid in enumerate(pol.feature_ids):
            cx = np.zeros_like(cs[0].cx)
            cx[:, j] = pol.coef[j] / pol.scale[j] / n
            cs.append(Concept(f"mediated_dy:{int(fid)}", cx, np.zeros(n)))
    return cs


def store_key(state: BaseState, project) -> str:
    """What stored pair vectors depend on: the model, the update, the trainable parameters, the
    projection (not the probes, SAE, features or policy: those only change the concepts)."""
    cfg = state.cfg
    blob = json.dumps({"model": state.model.lm.identity, "update": cfg.update.__dict__,
                       "trainable": state.model.engine.trainable, "projection": project.info,
                       "seed": cfg.run.seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def setup(state: BaseState, log, progress: bool, ranks: Ranks = SINGLE) -> GradientSetup:
    """The concepts and their gradients; under torchrun rank ``r`` computes concepts
    ``c % world == r`` and every rank ends with all of them (a collective call)."""
    check_first_order(state.model.engine)
    cfg = state.cfg.gradient
    engine = state.model.engine
    shapes = {n: engine.base[n].shape for n in engine.trainable}
    project = projector(shapes, cfg.projection_dim, cfg.seed, state.cfg.model.device)
    cs = concept_list(state)
    mine = [c for i, c in enumerate(cs) if ranks.owns(i)]
    log(f"gradient mode: {len(cs)} concepts ({len(mine)} on this process), {project.info['kind']} "
        f"gradients of dimension {project.dim:,}")
    t = time.perf_counter()
    local = concept_gradients(state, mine, project, progress=progress)
    seconds = time.perf_counter() - t
    grads = ranks.share_rows(local, len(cs))
    store = None
    if cfg.projection_dim > 0:
        store = RunDir(state.cfg.run.cache_path() / "gradients" / store_key(state, project), log)
        store.make()
        if not store.file("info.json").exists():
            store.write_json("info.json", {"format": "policytrace.gradient_store", "version": 1,
                                           "model": state.model.lm.name, "projection": project.info,
                                           "update": state.cfg.update.__dict__, "dtype": "float32",
                                           "parameters": {n: list(s) for n, s in shapes.items()}})
    return GradientSetup([c.name for c in cs], grads, project, store, round(seconds, 3), len(mine))


def concept_values(state: BaseState, gs: GradientSetup, rows: pl.DataFrame, bar) -> np.ndarray:
    """(p, C): every concept's value for every pair. Whole gradients: per pair, its Δθ dotted
    with the concept gradients block by block (nothing of size p x parameters is held).
    Projected: the pair vectors come from (or go to) the store and are scored by the core."""
    engine = state.model.engine
    if gs.store is None:
        out = []
        for r in rows.iter_rows(named=True):
            out.append(direction_products(engine, gs.grads, r["prompt"], r["response"], r["id"]).cpu().numpy())
            bar.update(1)
        return np.stack(out) if out else np.zeros((0, len(gs.names)))
    vecs = _stored(gs.store, rows["id"].to_list())
    if vecs is None:
        vecs = pair_vectors(state, gs, rows, bar)
    else:
        bar.update(rows.height)
    return _core.gradient_scores(np.ascontiguousarray(vecs, dtype=np.float32),
                                 np.ascontiguousarray(gs.grads.float().numpy()), state.cfg.run.threads)


def pair_vectors(state: BaseState, gs: GradientSetup, rows: pl.DataFrame, bar) -> np.ndarray:
    """The pairs' projected update directions, float32, written to the store. Fresh and stored
    vectors take the same route (float32, scored by the core), so a run that reuses the store
    writes the bytes of one that filled it."""
    ids = rows["id"].to_list()
    vecs = []
    for r in rows.iter_rows(named=True):
        vecs.append(gs.project(update_direction(state.model.engine, r["prompt"], r["response"], r["id"])))
        bar.update(1)
    arr = np.ascontiguousarray(torch.stack(vecs).float().cpu().numpy())
    _store(gs.store, ids, arr)
    return arr


def _pairs_key(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _stored(store: RunDir, ids: list[str]) -> np.ndarray | None:
    name = f"pairs-{_pairs_key(ids)}"
    if store.valid_marker(f"{name}.done.json") is None:
        return None
    return np.load(store.file(f"{name}.npy"), mmap_mode="r", allow_pickle=False)


def _store(store: RunDir, ids: list[str], vecs: np.ndarray) -> None:
    name = f"pairs-{_pairs_key(ids)}"
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vecs, dtype=np.float32))
    digest = store.write(f"{name}.npy", buf.getvalue())
    store.mark(f"{name}.done.json", {"ids": ids, "files": {f"{name}.npy": digest}})


def frames(state: BaseState, gs: GradientSetup, rows: pl.DataFrame, out: np.ndarray):
    """The engine's (pairs, pair_features, pair_behaviour) frames from the concept values."""
    col = {n: out[:, i] for i, n in enumerate(gs.names)}
    ids, pol = rows["id"].to_list(), state.policy
    mediated, dy = col["mediated_dy"], col["dy_mean"]
    nan = np.full(len(ids), np.nan)
    pairs = {"pair_id": ids, "group": rows["category"].to_list(), "score": col["score_x"] + col["score_y"],
             "score_x": col["score_x"], "score_y": col["score_y"], "dy_mean": dy, "pred_dy_mean": mediated,
             "direct_dy": dy - mediated, "mediated_share": np.where(np.abs(dy) > 1e-12, mediated / np.where(dy == 0, 1, dy), nan),
             "mediated_r2": nan}
    pf = None
    if state.cfg.gradient.per_feature:
        fids = [int(f) for f in pol.feature_ids]
        dx = np.stack([col[f"d_coef_x:{f}"] for f in fids], axis=1)
        dyk = np.stack([col[f"d_coef_y:{f}"] for f in fids], axis=1)
        pf = _pair_features(ids, pol, dx, dyk, np.stack([col[f"mediated_dy:{f}"] for f in fids], axis=1))
        dom, share, flag = interference(dx + dyk, state.features.groups, rows["category"].to_list())
        pairs |= {"dominant_feature": [fids[j] if j >= 0 else None for j in dom],
                  "dominant_group": [state.features.groups[j] if j >= 0 else None for j in dom],
                  "off_target_share": share, "interference": flag}
    frame = pl.DataFrame({k: (_nullable(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
                          for k, v in pairs.items()}, strict=False)
    frame = frame.with_columns(pl.Series("label", rows["label"].to_list()), pl.lit("gradient").alias("mode"),
                               pl.Series("dy_on_flagged", col.get("dy_on_flagged", nan)).fill_nan(None),
                               pl.Series("dy_on_unflagged", col.get("dy_on_unflagged", nan)).fill_nan(None))
    cats = sorted(set(state.inputs.categories.tolist()))
    beh = pl.DataFrame({"pair_id": [i for c in cats for i in ids], "probe_group": [c for c in cats for _ in ids],
                        "dy_mean": np.concatenate([col[f"dy_cat:{c}"] for c in cats]),
                        "mediated_dy": pl.Series([None] * (len(cats) * len(ids)), dtype=pl.Float64),
                        "direct_dy": pl.Series([None] * (len(cats) * len(ids)), dtype=pl.Float64)})
    return frame, pf, beh


def _nullable(v: np.ndarray) -> pl.Series:
    return pl.Series([None if not np.isfinite(x) else float(x) for x in v], dtype=pl.Float64)


def _pair_features(ids: list, pol, dx: np.ndarray, dy: np.ndarray, mediated: np.ndarray) -> pl.DataFrame:
    p, k = dx.shape
    d = dx + dy
    coef = np.broadcast_to(pol.coef, (p, k))
    return pl.DataFrame({
        "pair_id": pl.Series(ids).gather(np.repeat(np.arange(p), k)), "feature_id": np.tile(pol.feature_ids, p),
        "coef": coef.ravel(), "d_coef": d.ravel(), "d_coef_x": dx.ravel(), "d_coef_y": dy.ravel(),
        "d_coef_xy": np.zeros(p * k), "shapley_x": dx.ravel(), "shapley_y": dy.ravel(),
        "alignment": (d * coef).ravel(), "mediated_dy": mediated.ravel()})


def run_shard(rd: RunDir, state: BaseState, gs: GradientSetup, shard: int, rows: pl.DataFrame, bar) -> dict:
    """One shard of pairs in gradient mode: vectors, concept values, frames, marker."""
    t = time.perf_counter()
    out = concept_values(state, gs, rows, bar)
    if not np.isfinite(out).all():
        raise_nonfinite(shard, rows, out)
    pairs, pf, beh = frames(state, gs, rows, out)
    files = {}
    for name, f in (("pairs", pairs), ("pair_behaviour", beh), ("pair_features", pf)):
        if f is not None:
            files[rd.shard_file(name, shard)] = rd.write_parquet(rd.shard_file(name, shard), f)
    ids = rows["id"].to_list()
    rec = {"shard": shard, "pairs": ids, "files": files, "seconds": round(time.perf_counter() - t, 3), "mode": "gradient"}
    rd.mark(rd.shard_marker(shard), rec)
    return rec


def raise_nonfinite(shard: int, rows: pl.DataFrame, out: np.ndarray) -> None:
    i = int(np.argwhere(~np.isfinite(out))[0][0])
    raise NonFiniteError(f"shard {shard}: pair '{rows['id'][i]}' has a non-finite gradient-mode output; "
                         "check update.lr and the model's dtype")


def pair_scores(state: BaseState, gs: GradientSetup, pairs: pl.DataFrame) -> pl.DataFrame:
    """Gradient-mode frames for any pairs (validation's planted ones), without a run folder."""
    return frames(state, gs, pairs, concept_values(state, gs, pairs, _NoBar()))[0]


class _NoBar:
    def update(self, n: int) -> None:
        pass


def explain(state: BaseState, pairs: pl.DataFrame, n: int) -> tuple[pl.DataFrame, dict]:
    """The exact engine on the ``n`` pairs with the largest |score| and the ``n`` with the largest
    |dy_mean| (gradient mode's), side by side with gradient mode's values, and how well they agree."""
    from ..numeric import Attributor
    from ..numeric.metrics import spearman

    top = set(pairs.sort(pl.col("score").abs(), descending=True)["pair_id"].head(n).to_list())
    top |= set(pairs.sort(pl.col("dy_mean").abs(), descending=True)["pair_id"].head(n).to_list())
    rows = state.inputs.pairs.filter(pl.col("id").is_in(sorted(top)))
    engine = state.model.engine
    dXs, dys = [], []
    for r in rows.iter_rows(named=True):
        d = state.delta(engine.update(r["prompt"], r["response"], r["id"]), r["id"])
        dXs.append(d.dX)
        dys.append(d.dy)
    att = Attributor(state.policy, state.features.X, state.base.y0, method=state.cfg.decompose.method,
                     threads=state.cfg.run.threads, keep=False)
    att.add(dXs, np.stack(dys), pair_ids=rows["id"].to_list())
    eng = att.last_pairs.select("pair_id", "score", "dy_mean", "pred_dy_mean")
    both = pairs.select("pair_id", "score", "dy_mean", "pred_dy_mean").join(eng, on="pair_id", suffix="_engine")
    facts = {"pairs": both.height, "method": state.cfg.decompose.method}
    for c in ("score", "dy_mean", "pred_dy_mean"):
        a, b = both[c].to_numpy(), both[f"{c}_engine"].to_numpy()
        facts[f"spearman_{c}"] = spearman(a, b) if len(a) > 1 else None
        facts[f"max_rel_diff_{c}"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
    return both, facts
