"""Does an attribution predict real retraining? (docs/design.md, "Evaluation".)

* **LDS**: sample ``m`` random subsets of exactly ``round(alpha·P)`` of the run's pairs
  (seeded), really fine-tune on each (:mod:`.retrain`) and measure the behaviour and policy
  shifts. LDS is the Spearman correlation, over subsets, between a measured shift and the sum of
  the subset's per-pair scores; 95 % bootstrap intervals resample subsets.
* **Top-k removal** (``removal.parquet``, :mod:`.removal`).
* **Planted pairs** (``planted.parquet``, :mod:`.planted`): mislabeled pairs the behaviour
  plants; detection AUC and precision@k per method.
* **Agreement** of the exact and first-order per-pair scores; **aggregates** (z-scores by
  category and label, ``aggregates.parquet``); **timings** per method.

Methods: the run's SMDA pair score (exact and first order), each pair's own measured and
policy-predicted mean Δy, random scores, and the gradient and projection baselines of
:mod:`.baselines`. Every retraining is cached in ``RUN_DIR/validation/``, so an interrupted
validation resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from ... import _progress
from ...errors import InvalidValueError
from ...numeric.metrics import auc, lds, precision_at_k, spearman, top_k_overlap
from .. import config as cfgmod
from ..modes import get_mode
from ..rundir import RunDir
from ..run import cached_base_pass
from ..stages import BaseState, prepare
from .baselines import gradient_baselines, probe_gradients, projection_baselines
from .planted import GRADIENT_COLUMNS, PROJECTION_COLUMNS, planted_test
from .removal import removal_test
from .retrain import Retrainer, subset_masks
from .scores import aggregate_scores


def _baseline_scores(state: BaseState, scores: dict, timings: dict, log: Callable[[str], None], progress: bool):
    """Adds the gradient and projection baselines to ``scores``; returns the probe gradients
    (reused by the planted test)."""
    P = state.inputs.pairs.height
    log("gradient baselines (TrackStar-style cosine, Concept Influence)")
    t = time.perf_counter()
    probe_grads = probe_gradients(state, progress=progress)
    timings["gradient_probe_pass_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gb = gradient_baselines(state, state.cfg.update.lr, probe_grads=probe_grads, progress=progress)
    timings["gradient_per_100_pairs_s"] = 100 * (time.perf_counter() - t) / P
    scores |= {col: gb[col].to_numpy() for col in GRADIENT_COLUMNS}
    t = time.perf_counter()
    pb = projection_baselines(state, progress=progress)
    timings["projection_per_100_pairs_s"] = 100 * (time.perf_counter() - t) / P
    scores |= {col: pb[col].to_numpy() for col in PROJECTION_COLUMNS}
    return probe_grads


def _measure_subsets(retrainer: Retrainer, masks: np.ndarray, progress: bool) -> dict:
    out: dict = {"policy": [], "behaviour": [], "behaviour_by_category": []}
    bar = _progress.bar(len(masks), "subset", progress)
    for mask in masks:
        rec = retrainer.measure(np.flatnonzero(mask))
        out["policy"].append(rec["policy_shift"])
        out["behaviour"].append(rec["behaviour_shift"])
        out["behaviour_by_category"].append(rec["behaviour_by_category"])
        bar.update(1)
    bar.close()
    return out


def _lds_frame(scores: dict, masks: np.ndarray, measured: dict, seed: int, alpha: float) -> list[dict]:
    rows = []
    for method, sc in scores.items():
        for target in ("policy", "behaviour"):
            rows.append({"method": method, "target": target, **lds(sc, masks, np.array(measured[target]), seed=seed),
                         "subsets": len(masks), "alpha": alpha})
    return rows


def compared_scores(run_dir: str | Path, pair_ids: list[str], taken: set[str]) -> dict[str, np.ndarray]:
    """Another finished run's per-pair ``score`` and ``dy_mean`` (its ``pairs.parquet``) in this
    run's pair order, named by its mode (``score_gradient``, ``dy_mean_engine``, ...; with
    ``@<folder>`` where that name is taken): the same retrained subsets then rank both runs'
    attributions, e.g. the paper's one-step scores beside a trajectory run's."""
    rd = RunDir(run_dir, lambda _m: None)
    manifest = rd.complete()
    frame = rd.read_parquet("pairs.parquet")
    theirs = frame["pair_id"].to_list()
    missing = sorted(set(pair_ids) - set(theirs))
    extra = sorted(set(theirs) - set(pair_ids))
    if missing or extra:
        raise InvalidValueError(f"--compare {run_dir}: its pairs are not this run's ({len(missing)} missing, e.g. "
                                f"{missing[:3]}; {len(extra)} extra, e.g. {extra[:3]}); compare runs over the same pairs")
    order = {p: i for i, p in enumerate(theirs)}
    idx = np.array([order[p] for p in pair_ids])
    mode = frame["mode"][0] if "mode" in frame.columns and frame.height else manifest.get("mode", "run")
    out = {}
    for col in ("score", "dy_mean"):
        name = f"{col}_{mode}"
        if name in taken or name in out:
            name = f"{name}@{Path(run_dir).name}"
        if name in taken or name in out:
            raise InvalidValueError(f"--compare {run_dir}: a method called {name!r} is already compared")
        values = frame[col].to_numpy()[idx].astype(np.float64)
        out[name] = np.nan_to_num(values, nan=0.0)
    return out


def open_state(run_dir: str | Path, log: Callable[[str], None], progress: bool = False) -> tuple[RunDir, dict, BaseState]:
    """A finished, intact run folder's manifest and its rebuilt :class:`BaseState`."""
    rd = RunDir(run_dir, log)
    manifest = rd.complete()
    cfg = cfgmod.load(rd.file("config.toml"))
    return rd, manifest, prepare(cfg, log, progress, cached_base=cached_base_pass(rd))


def validate(run_dir: str | Path, subsets: int = 20, alpha: float = 0.5, seed: int = 0, progress: bool = True,
             log=print, baselines: bool = True, removal_k: int | None = None, planted: int = 0,
             removal_methods: list[str] | None = None, compare: list[str | Path] = ()) -> pl.DataFrame:
    """LDS of the run's attributions against real subset retraining; writes ``validation.parquet``
    (and ``removal``, ``planted``, ``aggregates`` and ``validation.json``). ``compare``: other
    finished runs over the same pairs whose scores join the methods (:func:`compared_scores`)."""
    if subsets < 2:
        raise InvalidValueError(f"subsets = {subsets}: LDS needs at least 2 subsets (20 or more recommended)")
    rd, manifest, state = open_state(run_dir, log)
    mode = get_mode(state.cfg.run.mode)
    P = state.inputs.pairs.height
    timings: dict = {}
    spp = manifest.get("stages", {}).get("pairs", {}).get("seconds_per_pair")
    if spp:
        timings[f"smda_{mode.name}_per_100_pairs_s"] = 100 * spp
    run_scores = mode.validation(rd, manifest, state, seed, log, progress)
    scores, scorer = dict(run_scores.scores), run_scores.scorer
    for other in compare:
        scores |= compared_scores(other, state.inputs.pairs["id"].to_list(), set(scores))
    timings |= run_scores.timings
    probe_grads = _baseline_scores(state, scores, timings, log, progress) if baselines else None
    masks = subset_masks(P, subsets, alpha, seed)
    retrainer = mode.retrainer(state, seed, rd.file("validation"))
    measured = _measure_subsets(retrainer, masks, progress)
    rows = _lds_frame(scores, masks, measured, seed, alpha)
    frame = pl.DataFrame(rows)
    rd.write_parquet("validation.parquet", frame)
    k_rm = max(1, P // 8) if removal_k is None else removal_k
    if k_rm > 0:
        log(f"top-{k_rm} removal against category-matched random removal")
        rd.write_parquet("removal.parquet", removal_test(retrainer, scores, k_rm, seed, progress=progress,
                                                         methods=removal_methods))
    if planted > 0:
        log(f"{planted} planted mislabeled pairs")
        rd.write_parquet("planted.parquet", planted_test(state, planted, seed, scorer, baselines, progress, probe_grads))
    rd.write_parquet("aggregates.parquet", aggregate_scores(scores, state.inputs.pairs))
    rd.write_parquet("validation_scores.parquet", pl.DataFrame(
        {"pair_id": state.inputs.pairs["id"].to_list(), **{m: np.asarray(sc, np.float64) for m, sc in scores.items()}}))
    rd.write("validation.json", json.dumps({"agreement": run_scores.agreement, "lds": rows, "timings": timings,
                                            "measured": measured}, indent=1))
    return frame


__all__ = ["auc", "compared_scores", "lds", "precision_at_k", "spearman", "subset_masks", "top_k_overlap", "validate"]
