"""Does an attribution predict real retraining? (DESIGN §5; the first part of ``validate``.)

Linear datamodeling score (LDS): sample ``m`` random subsets of the run's pairs (each pair in a
subset with probability-free exact size ``round(alpha·P)``, seeded), really fine-tune from the
base weights on each subset with the run's update recipe (one update per pair, in a seeded
order), re-run the probe pass and measure

* the **behaviour** shift: mean Δy over probes (overall and per probe category), and
* the **policy** shift: the exact refit of the policy on (X+ΔX, y+Δy), scored as ΔW·W.

LDS is the Spearman correlation, over subsets, between a measured shift and the sum of the
subset's per-pair attributions; 95 % bootstrap intervals resample subsets. Also reported: the
agreement of the exact and first-order per-pair scores (Spearman, top-k overlap).

Methods compared: the run's SMDA pair score (exact and first order), the measured and the
policy-predicted mean Δy of each pair alone, random scores, and the gradient baselines of
:mod:`policytrace.baselines`. Subset results are cached one file per subset in
``RUN_DIR/validation/``, so an interrupted validation resumes. Not yet here: top-k removal,
planted pairs, probe-projection baselines.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from . import config as cfgmod
from .decomposition import Attributor
from .errors import InvalidValueError
from .fidelity import _auc


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when a side is constant."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) != len(b):
        raise InvalidValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def lds(scores: np.ndarray, masks: np.ndarray, measured: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """LDS of per-pair ``scores`` (P,) for subsets ``masks`` (m, P) with ``measured`` (m,)."""
    scores, masks, measured = np.asarray(scores, float), np.asarray(masks, bool), np.asarray(measured, float)
    if masks.shape != (len(measured), len(scores)):
        raise InvalidValueError(f"masks must be (subsets, pairs) = ({len(measured)}, {len(scores)}), got {masks.shape}")
    predicted = masks.astype(float) @ scores
    value = spearman(predicted, measured)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(measured), len(measured))
        v = spearman(predicted[idx], measured[idx])
        if np.isfinite(v):
            boots.append(v)
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan")))
    return {"lds": value, "ci_low": float(lo), "ci_high": float(hi)}


def precision_at_k(score: np.ndarray, label: np.ndarray, k: int) -> float:
    if not 1 <= k <= len(score):
        raise InvalidValueError(f"k = {k} must be between 1 and the number of pairs ({len(score)})")
    top = np.argsort(-np.asarray(score, float), kind="stable")[:k]
    return float(np.asarray(label, bool)[top].mean())


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    ta = set(np.argsort(-np.asarray(a), kind="stable")[:k].tolist())
    tb = set(np.argsort(-np.asarray(b), kind="stable")[:k].tolist())
    return len(ta & tb) / k


def subset_masks(n_pairs: int, m: int, alpha: float, seed: int) -> np.ndarray:
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


def _load_deltas(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    files = sorted((run_dir / "shards").glob("deltas-*.npz"))
    if not files:
        raise InvalidValueError(f"{run_dir} has no per-pair deltas (a run folder from an older version?); rerun it")
    ids, dX, dy = [], [], []
    for f in files:
        z = np.load(f)
        ids += z["ids"].tolist()
        dX.append(z["dX"])
        dy.append(z["dy"])
    return ids, np.concatenate(dX), np.concatenate(dy)


def validate(run_dir: str | Path, subsets: int = 20, alpha: float = 0.5, seed: int = 0, progress: bool = True,
             log=print, baselines: bool = True) -> pl.DataFrame:
    """LDS of the run's attributions against real subset retraining; writes ``validation.parquet``."""
    from .run import Run, _progress

    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists() or json.loads(manifest_path.read_text()).get("status") != "complete":
        raise InvalidValueError(f"{run_dir} is not a finished run folder; run `policytrace run` first")
    if subsets < 2:
        raise InvalidValueError(f"subsets = {subsets}: LDS needs at least 2 subsets (20 or more recommended)")
    cfg = cfgmod.load(run_dir / "config.toml")
    run = Run(cfg, run_dir, log=log, progress=False)
    ctx = run.setup()
    ids, dX, dy = _load_deltas(run_dir)
    pairs = ctx.pairs
    if ids != pairs["id"].to_list():
        raise InvalidValueError(f"{run_dir}: stored deltas do not match the run's pairs; rerun it")
    P = len(ids)
    # Per-pair attributions from the stored deltas, by both decomposition methods.
    scores = {}
    for method in ("exact", "first_order"):
        att = Attributor(ctx.policy, ctx.X, ctx.y0, method=method, threads=cfg["run"]["threads"], keep=False)
        att.add(list(dX), dy, pair_ids=ids)
        scores[f"score_{method}"] = att.last_pairs["score"].to_numpy()
    scores["dy_mean"] = dy.mean(axis=1)
    scores["pred_dy_mean"] = np.array([((d / ctx.policy.scale) @ ctx.policy.coef).mean() for d in dX])
    scores["random"] = np.random.default_rng(seed + 1).normal(size=P)
    if baselines:
        from .baselines import gradient_baselines

        log("gradient baselines (TrackStar-style cosine, Concept Influence)")
        gb = gradient_baselines(ctx, cfg["update"]["lr"])
        for col in ("grad_cosine", "concept_influence", "behaviour_first_order"):
            scores[col] = gb[col].to_numpy()
    masks = subset_masks(P, subsets, alpha, seed)
    out_dir = run_dir / "validation"
    measured_policy, measured_behaviour, per_cat = np.zeros(subsets), np.zeros(subsets), []
    bar = _progress(total=subsets, initial=0, enabled=progress, what="subset")
    for i in range(subsets):
        cache = out_dir / f"subset-{alpha:g}-{seed}-{i:04d}.json"
        if cache.exists():
            rec = json.loads(cache.read_text())
        else:
            members = np.flatnonzero(masks[i])
            order = np.random.default_rng([seed, i]).permutation(members)
            params = None
            for j in order:
                r = pairs.row(int(j), named=True)
                params = ctx.engine.update(r["prompt"], r["response"], r["id"], from_params=params)
            sdX, sdy = run.delta(ctx, params)
            att = Attributor(ctx.policy, ctx.X, ctx.y0, method="exact", threads=cfg["run"]["threads"], keep=False)
            att.add(sdX, sdy[None, :], pair_ids=[f"subset-{i}"])
            cats = {c: float(sdy[ctx.cats == c].mean()) for c in sorted(set(ctx.cats.tolist()))}
            rec = {"members": members.tolist(), "policy_shift": float(att.last_pairs["score"][0]),
                   "behaviour_shift": float(sdy.mean()), "behaviour_by_category": cats}
            cfgmod.write_atomic(cache, json.dumps(rec))
        measured_policy[i] = rec["policy_shift"]
        measured_behaviour[i] = rec["behaviour_shift"]
        per_cat.append(rec["behaviour_by_category"])
        bar.update(1)
    bar.close()
    rows = []
    for method, sc in scores.items():
        for target, meas in (("policy", measured_policy), ("behaviour", measured_behaviour)):
            rows.append({"method": method, "target": target, **lds(sc, masks, meas, seed=seed),
                         "subsets": subsets, "alpha": alpha})
    frame = pl.DataFrame(rows)
    k = max(1, P // 10)
    agreement = {"spearman_exact_first_order": spearman(scores["score_exact"], scores["score_first_order"]),
                 f"top{k}_overlap": top_k_overlap(scores["score_exact"], scores["score_first_order"], k)}
    buf = __import__("io").BytesIO()
    frame.write_parquet(buf, statistics=False)
    cfgmod.write_atomic(run_dir / "validation.parquet", buf.getvalue())
    cfgmod.write_atomic(run_dir / "validation.json", json.dumps({"agreement": agreement, "lds": rows,
                                                                  "measured": {"policy": measured_policy.tolist(),
                                                                               "behaviour": measured_behaviour.tolist(),
                                                                               "behaviour_by_category": per_cat}}, indent=1))
    return frame


__all__ = ["lds", "precision_at_k", "spearman", "subset_masks", "top_k_overlap", "validate", "_auc"]
