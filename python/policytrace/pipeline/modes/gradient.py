"""Gradient mode: every first-order output of a pair from one backward pass on the pair.

Each output is a linear functional of (ΔX, Δy) (:mod:`policytrace.numeric.concepts`), and to
first order (ΔX, Δy) are linear in the update Δθ, so output ``c`` of pair ``i`` is
``∇θφ_c(θ0) · Δθ_i``: one backward pass over the probes per concept, once (:func:`setup`, through
:func:`policytrace.gradients.concept.concept_gradients`), then per pair one backward pass on the
pair and C inner products (:func:`concept_values`), exact with whole gradients or through a
seeded per-module projection (``gradient.projection_dim``), whose pair vectors are kept in an
on-disk store that a later run on the same model, pairs and update reuses. The frames are the
engine's schemas (``mode = "gradient"``); what first order cannot give is null (per-probe
mediated R², mediated Δy per category; the per-feature columns without ``gradient.per_feature``).
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

from ... import _core
from ...errors import NonFiniteError, RunFolderError
from ...gradients.batched import Projections, TrainExample, WholeProducts, pack, per_example
from ...gradients.concept import concept_gradients
from ...gradients.concept_pass import ProbeSide, concept_rows
from ...gradients.per_pair import check_first_order
from ...gradients.projection import projector
from ...numeric.concepts import Concept, concepts
from ...numeric.frames import (Dominance, PairValues, pair_behaviour_frame, pair_features_frame, pair_summary_frame,
                               pairs_frame)
from ...numeric.interference import interference
from ...numeric.mediation import mediated_share
from ..data import chat_pair
from ..distributed import SINGLE, Ranks
from ..layers import gradient_pair_layers, layer_concept
from ..rundir import RunDir
from ..stages import BaseState
from .base import Bar, Finished, Log, Mode, NoBar, Prepared, RunScores, Scorer, ShardFrames

# The gradient store's format: 2 = per-module projections formed in hooks from batched pairs
# (1, in 0.2, projected dense per-pair gradients: the same quantity, other rounding).
STORE_VERSION = 2


@dataclass(frozen=True)
class GradientSetup(Prepared):
    """The concepts, their gradients (C, D) and the projection pair vectors go through."""

    names: list[str]
    grads: torch.Tensor
    project: object
    store: RunDir | None
    seconds: float = 0.0
    """The one-time cost: the concept gradients' backward passes over the probes."""
    computed: int = 0
    """How many of the concepts this process computed (all of them outside torchrun)."""

    def marker(self) -> tuple[str, dict]:
        return "concepts", {"seconds": self.seconds, "concepts": self.computed, "of": len(self.names),
                            "dim": self.project.dim}


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
    for i, lf in enumerate(state.layers, start=1):  # mediation across layers: each one's mediated_dy
        pol, k = lf.policy, len(lf.features.columns)
        cs.append(Concept(layer_concept(lf.layer), np.tile(pol.coef / pol.scale / n, (n, 1)).reshape(n, k),
                          np.zeros(n), site=i))
    return cs


def store_key(state: BaseState, project) -> str:
    """What stored pair vectors depend on: the model, the update, the trainable parameters, the
    projection (not the probes, SAE, features or policy: those only change the concepts)."""
    cfg = state.cfg
    blob = json.dumps({"model": state.model.lm.identity, "update": cfg.update.__dict__,
                       "trainable": state.model.engine.trainable, "projection": project.info,
                       "seed": cfg.run.seed, "store_version": STORE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_store(state: BaseState, project, shapes: dict, log: Log) -> RunDir:
    """The projected pair vectors' store for this model, update and projection. Its key holds
    the format's version, so vectors of another route (0.2's dense per-pair gradients) are never
    found, let alone mixed; a folder under this key claiming another version is refused."""
    store = RunDir(state.cfg.run.cache_path() / "gradients" / store_key(state, project), log)
    store.make()
    info = store.file("info.json")
    if not info.exists():
        store.write_json("info.json", {"format": "policytrace.gradient_store", "version": STORE_VERSION,
                                       "route": "hooks, batched", "model": state.model.lm.name,
                                       "projection": project.info, "update": state.cfg.update.__dict__,
                                       "dtype": "float32", "parameters": {n: list(s) for n, s in shapes.items()}})
    elif store.read_json("info.json").get("version") != STORE_VERSION:
        raise RunFolderError(f"{info} describes a gradient store of another format version (this policytrace "
                             f"writes version {STORE_VERSION}); delete {store.path} to recompute it")
    return store


def state_concept_gradients(state: BaseState, cs: list[Concept], project, progress: bool = False) -> torch.Tensor:
    """:func:`concept_gradients` over this run's probes, model, SAE and selected features."""
    m = state.model
    return concept_gradients(cs, project, engine=m.engine, runner=m.runner, reader=m.reader,
                             probe_tokens=m.probe_tokens, columns=state.features.columns,
                             gated=state.features.gated, progress=progress)


def hooked_concept_gradients(state: BaseState, cs: list[Concept], project, progress: bool = False) -> torch.Tensor:
    """The concepts' rows by hooks (:func:`~policytrace.gradients.concept_pass.concept_rows`):
    one forward per probe batch for all of them, the prefix shared; float64 sums for a float64
    model, float32 otherwise (C x D can be large)."""
    m = state.model
    if not cs:  # a rank that owns none under torchrun still takes part in the exchange
        return torch.empty(0, project.dim)
    more = tuple((ls.hook, ls.reader, lf.features.columns, lf.features.gated)
                 for ls, lf in zip(m.layers, state.layers))
    side = ProbeSide(m.runner, m.reader, m.probe_tokens, state.features.columns, state.features.gated, more)
    wide = next(iter(m.engine.base.values())).dtype == torch.float64
    cx = [c.cx for c in cs] if more else np.stack([c.cx for c in cs])
    return concept_rows(m.engine.model, m.engine.trainable, side, cx, np.stack([c.cy for c in cs]), project,
                        torch.float64 if wide else torch.float32, state.cfg.gradient.token_budget, progress,
                        sites=[c.site for c in cs] if more else None)


def setup(state: BaseState, log: Log, progress: bool, ranks: Ranks = SINGLE) -> GradientSetup:
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
    local = hooked_concept_gradients(state, mine, project, progress=progress)
    seconds = time.perf_counter() - t
    grads = ranks.share_rows(local, len(cs))
    store = None
    if cfg.projection_dim > 0:
        store = open_store(state, project, shapes, log)
    return GradientSetup([c.name for c in cs], grads, project, store, round(seconds, 3), len(mine))


def concept_values(state: BaseState, gs: GradientSetup, rows: pl.DataFrame, bar: Bar) -> np.ndarray:
    """(p, C): every concept's value for every pair. Whole gradients: the pairs' per-example
    gradients, batched, dotted with the concept rows module by module (nothing of size p x
    parameters is held). Projected: the pair vectors come from (or go to) the store and are
    scored by the core."""
    if gs.store is None:
        engine = state.model.engine
        shapes = {n: tuple(engine.base[n].shape) for n in engine.trainable}
        out = batched(state, rows, bar, lambda b: WholeProducts(gs.grads, engine.trainable, shapes,
                                                                engine.cfg.optimizer, engine.cfg.lr, b))
        return out.cpu().numpy() if rows.height else np.zeros((0, len(gs.names)))
    vecs = _stored(gs.store, rows["id"].to_list())
    if vecs is None:
        vecs = pair_vectors(state, gs, rows, bar)
    else:
        bar.update(rows.height)
    return _core.gradient_scores(np.ascontiguousarray(vecs, dtype=np.float32),
                                 np.ascontiguousarray(gs.grads.float().cpu().numpy()), state.cfg.run.threads)


def pair_vectors(state: BaseState, gs: GradientSetup, rows: pl.DataFrame, bar: Bar) -> np.ndarray:
    """The pairs' projected update directions, float32, written to the store. Fresh and stored
    vectors take the same route (float32, scored by the core), so a run that reuses the store
    writes the bytes of one that filled it."""
    engine = state.model.engine
    vecs = batched(state, rows, bar, lambda b: Projections(gs.project, engine.cfg.optimizer, engine.cfg.lr, b,
                                                           _wide(engine), gs.grads.device))
    arr = np.ascontiguousarray(vecs.float().cpu().numpy())
    _store(gs.store, rows["id"].to_list(), arr)
    return arr


def _wide(engine) -> torch.dtype:
    return torch.float64 if next(iter(engine.base.values())).dtype == torch.float64 else torch.float32


def batched(state: BaseState, rows: pl.DataFrame, bar: Bar, sink_of) -> torch.Tensor:
    """Per-pair results of ``sink_of(batch_size)`` sinks, the pairs packed under
    ``gradient.token_budget`` (by length, so the packing, and the bits, depend only on the
    shard's pairs), in ``rows``' order, on the model's device."""
    engine = state.model.engine
    examples = [train_example(engine, r) for r in rows.iter_rows(named=True)]
    parts: dict[int, torch.Tensor] = {}
    for idx in pack([len(e) for e in examples], state.cfg.gradient.token_budget):
        sink = sink_of(len(idx))
        per_example(engine.model, engine.trainable, sink, [examples[i] for i in idx],
                    state.model.lm.tokenizer.pad_token_id, engine.device)
        for row, vec in enumerate(sink.result()):
            parts[idx[row]] = vec
        bar.update(len(idx))
    return torch.stack([parts[i] for i in range(len(examples))]) if parts else torch.zeros(0)


def train_example(engine, r: dict) -> TrainExample:
    """A pair row as the batched backward reads it: its chat ids and loss mask, by the same rule
    as every mode's update (``UpdateEngine.example``: the trained assistant turns' tokens)."""
    ids, mask = engine.example(chat_pair(r))
    return TrainExample(tuple(ids[0].tolist()), tuple(mask.tolist()))


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


def frames(state: BaseState, gs: GradientSetup, rows: pl.DataFrame, out: np.ndarray) -> ShardFrames:
    """The run's frames from the concept values ``out`` (p, C) of ``rows``."""
    col = {n: out[:, i] for i, n in enumerate(gs.names)}
    ids, groups, pol = rows["id"].to_list(), rows["category"].to_list(), state.policy
    mediated, dy = col["mediated_dy"], col["dy_mean"]
    values = PairValues(score=col["score_x"] + col["score_y"], score_x=col["score_x"], score_y=col["score_y"],
                        dy_mean=dy, pred_dy_mean=mediated, direct_dy=dy - mediated,
                        mediated_share=mediated_share(mediated, dy), mediated_r2=np.full(len(ids), np.nan))
    pf, dominance = None, None
    if state.cfg.gradient.per_feature:
        fids = [int(f) for f in pol.feature_ids]
        dx = np.stack([col[f"d_coef_x:{f}"] for f in fids], axis=1)
        dyk = np.stack([col[f"d_coef_y:{f}"] for f in fids], axis=1)
        med = np.stack([col[f"mediated_dy:{f}"] for f in fids], axis=1)
        # first order is additive: the interaction is exactly zero
        pf = pair_features_frame(ids, pol.feature_ids, pol.coef, dx + dyk, dx, dyk, np.zeros_like(dx), med)
        dom, share, flag = interference(dx + dyk, state.features.groups, groups)
        dominance = Dominance(dom, state.features.groups, share, flag)
    summary = pair_summary_frame(ids, groups, values, pol.feature_ids, dominance)
    pairs = pairs_frame(summary, rows["label"].to_list(), GradientMode.name, col.get("dy_on_flagged"),
                        col.get("dy_on_unflagged"))
    cats = sorted(set(state.inputs.categories.tolist()), key=str)
    beh = pair_behaviour_frame(ids, cats, np.stack([col[f"dy_cat:{c}"] for c in cats]), None)
    by_layer = gradient_pair_layers(state, ids, col) if state.layers else None
    return ShardFrames(pairs, beh, pf, pair_layers=by_layer)


def raise_nonfinite(rows: pl.DataFrame, out: np.ndarray) -> None:
    i = int(np.argwhere(~np.isfinite(out))[0][0])
    raise NonFiniteError(f"pair '{rows['id'][i]}' has a non-finite gradient-mode output; "
                         "check update.lr and the model's dtype")


def pair_scores(state: BaseState, gs: GradientSetup, pairs: pl.DataFrame) -> pl.DataFrame:
    """Gradient-mode ``pairs`` frame for any pairs (validation's planted ones), without a run folder."""
    return frames(state, gs, pairs, concept_values(state, gs, pairs, NoBar())).pairs


def explain(state: BaseState, pairs: pl.DataFrame, n: int) -> tuple[pl.DataFrame, dict]:
    """The exact engine on the ``n`` pairs with the largest |score| and the ``n`` with the largest
    |dy_mean| (gradient mode's), side by side with gradient mode's values, and how well they agree."""
    from ...numeric import Attributor
    from ...numeric.metrics import spearman

    top = set(pairs.sort(pl.col("score").abs(), descending=True)["pair_id"].head(n).to_list())
    top |= set(pairs.sort(pl.col("dy_mean").abs(), descending=True)["pair_id"].head(n).to_list())
    rows = state.inputs.pairs.filter(pl.col("id").is_in(sorted(top)))
    engine = state.model.engine
    dXs, dys = [], []
    for r in rows.iter_rows(named=True):
        d = state.delta(engine.update_pair(chat_pair(r)), r["id"])
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


def run_scores(state: BaseState, pairs_frame: pl.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """A gradient-mode run's own scores (read from its pairs.parquet, in the run's pair order)."""
    order = {p: i for i, p in enumerate(pairs_frame["pair_id"].to_list())}
    idx = [order[i] for i in state.inputs.pairs["id"].to_list()]
    col = {c: pairs_frame[c].fill_null(0.0).to_numpy()[idx] for c in ("score", "dy_mean", "pred_dy_mean", "suspicion")}
    return {"score_gradient": col["score"], "dy_mean": col["dy_mean"], "pred_dy_mean": col["pred_dy_mean"],
            "suspicion": col["suspicion"], "random": np.random.default_rng(seed + 1).normal(size=len(idx))}


def scorer(state: BaseState, seed: int, log: Log, progress: bool) -> Scorer:
    """Gradient-mode scores for the run's pairs and planted ones, computed afresh."""

    def score(both: pl.DataFrame, planted: pl.DataFrame) -> dict:
        frame = pair_scores(state, setup(state, log, progress), both)
        flag = state.inputs.behaviour.flag
        susp = state.inputs.behaviour.suspicion(frame.with_columns(pl.Series(flag, both[flag].to_list())))
        return {"score_gradient": frame["score"].to_numpy(), "dy_mean": frame["dy_mean"].to_numpy(),
                "pred_dy_mean": frame["pred_dy_mean"].to_numpy(),
                "suspicion": susp["suspicion"].fill_null(0.0).to_numpy(),
                "random": np.random.default_rng(seed + 1).normal(size=both.height)}

    return score


class GradientMode(Mode[GradientSetup]):
    name = "gradient"
    # the concepts are divided among the ranks and their rows exchanged (Ranks.share_rows)
    collective = True
    # a shard's pairs are batched together: larger shards make larger batches
    default_shard = 128

    def prepare(self, state: BaseState, log: Log, progress: bool, ranks: Ranks = SINGLE) -> GradientSetup:
        return setup(state, log, progress, ranks)

    def shard(self, state: BaseState, prepared: GradientSetup, rows: pl.DataFrame, bar: Bar) -> ShardFrames:
        out = concept_values(state, prepared, rows, bar)
        if not np.isfinite(out).all():
            raise_nonfinite(rows, out)
        return frames(state, prepared, rows, out)

    def finish(self, state: BaseState, rd: RunDir, log: Log) -> Finished:
        """``gradient.explain_top``: the exact engine beside gradient mode on the top pairs."""
        n = state.cfg.gradient.explain_top
        if n == 0:
            return Finished()
        log(f"explaining the top {n} pairs with the exact engine")
        frame, facts = explain(state, rd.read_parquet("pairs.parquet"), n)
        return Finished({"explained.parquet": rd.write_parquet("explained.parquet", frame)}, {"explained": facts})

    def facts(self, rd: RunDir) -> dict:
        """The concept pass's seconds (the slowest rank's: the others wait for its rows)."""
        marks = [rd.marker(p.relative_to(rd.path).as_posix()) for p in sorted(rd.path.glob("stages/concepts-rank*.json"))]
        secs = [m["seconds"] for m in marks if m]
        return {"concept_seconds": max(secs)} if secs else {}

    def validation(self, rd: RunDir, manifest: dict, state: BaseState, seed: int, log: Log,
                   progress: bool) -> RunScores:
        """No deltas: the run's own first-order scores, and planted pairs scored the same way."""
        return RunScores(run_scores(state, rd.read_parquet("pairs.parquet"), seed), scorer(state, seed, log, progress))
