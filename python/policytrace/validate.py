"""Does an attribution predict real retraining? (DESIGN §5.)

* **LDS**: sample ``m`` random subsets of exactly ``round(alpha·P)`` of the run's pairs
  (seeded), really fine-tune from the base weights on each with the run's update recipe (one
  update per pair, in a seeded order), re-run the probe pass and measure the **behaviour** shift
  (mean Δy over probes, also per category) and the **policy** shift (the exact refit of the
  policy on (X+ΔX, y+Δy), scored as ΔW·W). LDS is the Spearman correlation, over subsets,
  between a measured shift and the sum of the subset's per-pair scores; 95 % bootstrap
  intervals resample subsets.
* **Top-k removal** (``removal.parquet``): retrain without each method's top-k pairs and
  without category-matched random pairs; compare the drops in the shifts.
* **Planted pairs** (``planted.parquet``): mislabeled copies added to the pairs; detection AUC
  and precision@k per method.
* **Agreement** of the exact and first-order per-pair scores; **aggregates** (z-scores by
  category and label, ``aggregates.parquet``); **timings** per method.

Methods: the run's SMDA pair score (exact and first order), each pair's own measured and
policy-predicted mean Δy, random scores, and the gradient and projection baselines of
:mod:`policytrace.baselines`. Every retraining is cached in ``RUN_DIR/validation/`` under its
set of pairs, so an interrupted validation resumes.
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


def _retrain(run, ctx, members: np.ndarray, seed: int, out_dir: Path, threads: int) -> dict:
    """Fine-tune from the base weights on the pairs ``members`` (one update each, in a seeded
    order), re-run the probe pass, and measure the policy and behaviour shifts. Cached in
    ``out_dir`` under a hash of the member set and seed, so reruns and resumes reuse it."""
    import hashlib

    ids = sorted(ctx.pairs["id"][int(j)] for j in members)
    key = hashlib.sha256(json.dumps([ids, seed]).encode()).hexdigest()[:20]
    cache = out_dir / f"retrain-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    order = np.random.default_rng([seed, len(members)]).permutation(np.asarray(members))
    params = None
    for j in order:
        r = ctx.pairs.row(int(j), named=True)
        params = ctx.engine.update(r["prompt"], r["response"], r["id"], from_params=params)
    if params is None:
        params = ctx.engine.base
    sdX, sdy = run.delta(ctx, params)
    att = Attributor(ctx.policy, ctx.X, ctx.y0, method="exact", threads=threads, keep=False)
    att.add(sdX, sdy[None, :], pair_ids=["retrained"])
    cats = {c: float(sdy[ctx.cats == c].mean()) for c in sorted(set(ctx.cats.tolist()))}
    rec = {"members": ids, "policy_shift": float(att.last_pairs["score"][0]),
           "behaviour_shift": float(sdy.mean()), "behaviour_by_category": cats}
    cfgmod.write_atomic(cache, json.dumps(rec))
    return rec


def removal_test(run, ctx, scores: dict, k: int, seed: int, out_dir: Path, threads: int, n_random: int = 3,
                 progress: bool = True) -> pl.DataFrame:
    """Fine-tune on all pairs, then without each method's top-k pairs, and without k random
    pairs matched to those top-k by category (``n_random`` draws). A method is useful when
    removing its top pairs moves the shift more than removing matched random pairs."""
    from .run import _progress

    P = ctx.pairs.height
    if not 1 <= k < P:
        raise InvalidValueError(f"removal k = {k} must be between 1 and the number of pairs - 1 ({P - 1})")
    everything = np.arange(P)
    full = _retrain(run, ctx, everything, seed, out_dir, threads)
    cats = ctx.pairs["category"].to_numpy()
    rng = np.random.default_rng(seed + 7)
    rows = []
    bar = _progress(total=len(scores) * (1 + n_random), initial=0, enabled=progress, what="retrain")
    for method, sc in scores.items():
        top = np.argsort(-np.asarray(sc), kind="stable")[:k]
        without = _retrain(run, ctx, np.setdiff1d(everything, top), seed, out_dir, threads)
        bar.update(1)
        rand_beh, rand_pol = [], []
        for _ in range(n_random):
            pick = []
            for c in cats[top]:
                pool = [j for j in np.flatnonzero(cats == c) if j not in pick]
                pick.append(int(rng.choice(pool)))
            r = _retrain(run, ctx, np.setdiff1d(everything, pick), seed, out_dir, threads)
            rand_beh.append(full["behaviour_shift"] - r["behaviour_shift"])
            rand_pol.append(full["policy_shift"] - r["policy_shift"])
            bar.update(1)
        rows.append({
            "method": method, "k": k,
            "removed": ", ".join(ctx.pairs["id"][int(j)] for j in top),
            "behaviour_drop": full["behaviour_shift"] - without["behaviour_shift"],
            "behaviour_drop_random": float(np.mean(rand_beh)),
            "policy_drop": full["policy_shift"] - without["policy_shift"],
            "policy_drop_random": float(np.mean(rand_pol)),
        })
    bar.close()
    return pl.DataFrame(rows)


def plant_pairs(pairs: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """``n`` mislabeled pairs made from the run's own: harmless prompts answered with one of the
    run's refusals (``planted_refusal``) and harmful prompts answered with one of its compliant
    responses (``planted_compliance``), half each."""
    if pairs["harmful"].null_count() or not {"refusal", "compliance"} <= set(pairs["label"].to_list()):
        raise InvalidValueError("planted pairs need a harmful flag on every pair and both refusal and compliance labels")
    rng = np.random.default_rng(seed + 11)
    harmless = pairs.filter(~pl.col("harmful"))
    harmful = pairs.filter(pl.col("harmful"))
    refusals = pairs.filter(pl.col("label") == "refusal")["response"].to_list()
    compliant = pairs.filter(pl.col("label") == "compliance")["response"].to_list()
    rows = []
    for i in range(n):
        src, responses, label = (harmless, refusals, "planted_refusal") if i % 2 == 0 else (harmful, compliant, "planted_compliance")
        r = src.row(int(rng.integers(src.height)), named=True)
        rows.append({"id": f"planted-{i:03d}", "prompt": r["prompt"], "response": responses[int(rng.integers(len(responses)))],
                     "category": r["category"], "label": label, "harmful": r["harmful"]})
    return pl.DataFrame(rows, schema=pairs.schema)


def planted_test(run, ctx, n: int, seed: int, deltas: tuple, baselines: bool, progress: bool = True,
                 probe_grads=None) -> pl.DataFrame:
    """Detection of planted mislabeled pairs by each method: AUC and precision@k of
    ``planted_refusal`` among harmless-prompt pairs (score high = suspicious: it raises refusal)
    and of ``planted_compliance`` among harmful-prompt pairs (score low = suspicious)."""
    from .run import _progress

    cfg = ctx.cfg
    planted = plant_pairs(ctx.pairs, n, seed)
    ids, dX, dy = deltas
    pdX, pdy = [], []
    bar = _progress(total=planted.height, initial=0, enabled=progress, what="planted pair")
    for r in planted.iter_rows(named=True):
        a, b = run.delta(ctx, ctx.engine.update(r["prompt"], r["response"], r["id"]))
        pdX.append(a)
        pdy.append(b)
        bar.update(1)
    bar.close()
    allX = np.concatenate([dX, np.stack(pdX)])
    ally = np.concatenate([dy, np.stack(pdy)])
    all_ids = ids + planted["id"].to_list()
    sc = _scores(ctx, all_ids, allX, ally, seed, cfg["run"]["threads"])
    if baselines:
        from .baselines import gradient_baselines

        from .baselines import projection_baselines

        both = pl.concat([ctx.pairs, planted])
        gb = gradient_baselines(ctx, cfg["update"]["lr"], both, probe_grads)
        for col in ("grad_cosine", "concept_influence", "behaviour_first_order"):
            sc[col] = gb[col].to_numpy()
        pb = projection_baselines(ctx, both)
        for col in ("vector_filter", "projection_difference"):
            sc[col] = pb[col].to_numpy()
    harmful = np.concatenate([ctx.pairs["harmful"].to_numpy(), planted["harmful"].to_numpy()]).astype(bool)
    label = ctx.pairs["label"].to_list() + planted["label"].to_list()
    rows = []
    for method, s_ in sc.items():
        for kind, pool, sign in (("planted_refusal", ~harmful, 1.0), ("planted_compliance", harmful, -1.0)):
            lab = np.array([lb == kind for lb in label])[pool]
            score = sign * np.asarray(s_)[pool]
            k = int(lab.sum())
            rows.append({"method": method, "kind": kind, "auc": _auc(score, lab),
                         "precision_at_k": precision_at_k(score, lab, k) if k else float("nan"),
                         "n_planted": k, "n_candidates": int(pool.sum())})
    return pl.DataFrame(rows)


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


def _scores(ctx, ids, dX, dy, seed, threads) -> dict:
    """Every model-free method's per-pair score from stored deltas."""
    scores = {}
    for method in ("exact", "first_order"):
        att = Attributor(ctx.policy, ctx.X, ctx.y0, method=method, threads=threads, keep=False)
        att.add(list(dX), dy, pair_ids=ids)
        scores[f"score_{method}"] = att.last_pairs["score"].to_numpy()
    scores["dy_mean"] = dy.mean(axis=1)
    scores["pred_dy_mean"] = np.array([((d / ctx.policy.scale) @ ctx.policy.coef).mean() for d in dX])
    scores["random"] = np.random.default_rng(seed + 1).normal(size=len(ids))
    return scores


def validate(run_dir: str | Path, subsets: int = 20, alpha: float = 0.5, seed: int = 0, progress: bool = True,
             log=print, baselines: bool = True, removal_k: int | None = None, planted: int = 0) -> pl.DataFrame:
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
    # Per-pair attributions from the stored deltas.
    timings: dict = {}
    m = json.loads(manifest_path.read_text())
    if "seconds_per_pair" in m.get("stages", {}).get("pairs", {}):
        timings["smda_engine_per_100_pairs_s"] = 100 * m["stages"]["pairs"]["seconds_per_pair"]
    import time

    t = time.perf_counter()
    scores = _scores(ctx, ids, dX, dy, seed, cfg["run"]["threads"])
    timings["decomposition_both_methods_per_100_pairs_s"] = 100 * (time.perf_counter() - t) / P
    probe_grads = None
    if baselines:
        from .baselines import gradient_baselines, probe_gradients

        log("gradient baselines (TrackStar-style cosine, Concept Influence)")
        import time

        t = time.perf_counter()
        probe_grads = probe_gradients(ctx)
        timings["gradient_probe_pass_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gb = gradient_baselines(ctx, cfg["update"]["lr"], probe_grads=probe_grads)
        timings["gradient_per_100_pairs_s"] = 100 * (time.perf_counter() - t) / P
        for col in ("grad_cosine", "concept_influence", "behaviour_first_order"):
            scores[col] = gb[col].to_numpy()
        from .baselines import projection_baselines

        t = time.perf_counter()
        pb = projection_baselines(ctx)
        timings["projection_per_100_pairs_s"] = 100 * (time.perf_counter() - t) / P
        for col in ("vector_filter", "projection_difference"):
            scores[col] = pb[col].to_numpy()
    masks = subset_masks(P, subsets, alpha, seed)
    out_dir = run_dir / "validation"
    measured_policy, measured_behaviour, per_cat = np.zeros(subsets), np.zeros(subsets), []
    bar = _progress(total=subsets, initial=0, enabled=progress, what="subset")
    for i in range(subsets):
        rec = _retrain(run, ctx, np.flatnonzero(masks[i]), seed, out_dir, cfg["run"]["threads"])
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
    k_rm = max(1, P // 8) if removal_k is None else removal_k
    if k_rm > 0:
        log(f"top-{k_rm} removal against category-matched random removal")
        rem = removal_test(run, ctx, scores, k_rm, seed, out_dir, cfg["run"]["threads"], progress=progress)
        buf = __import__("io").BytesIO()
        rem.write_parquet(buf, statistics=False)
        cfgmod.write_atomic(run_dir / "removal.parquet", buf.getvalue())
    if planted > 0:
        log(f"{planted} planted mislabeled pairs")
        pt_frame = planted_test(run, ctx, planted, seed, (ids, dX, dy), baselines, progress, probe_grads)
        buf = __import__("io").BytesIO()
        pt_frame.write_parquet(buf, statistics=False)
        cfgmod.write_atomic(run_dir / "planted.parquet", buf.getvalue())
    agg = aggregate_scores(scores, pairs)
    buf = __import__("io").BytesIO()
    agg.write_parquet(buf, statistics=False)
    cfgmod.write_atomic(run_dir / "aggregates.parquet", buf.getvalue())
    cfgmod.write_atomic(run_dir / "validation.json", json.dumps({"agreement": agreement, "lds": rows, "timings": timings,
                                                                  "measured": {"policy": measured_policy.tolist(),
                                                                               "behaviour": measured_behaviour.tolist(),
                                                                               "behaviour_by_category": per_cat}}, indent=1))
    return frame


__all__ = ["lds", "precision_at_k", "spearman", "subset_masks", "top_k_overlap", "validate", "_auc"]
