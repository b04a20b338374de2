"""Rank statistics shared by fidelity and validation: AUC, Spearman, the linear datamodeling
score (LDS) with bootstrap intervals, precision@k and top-k overlap."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..errors import InvalidValueError


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of `score` for boolean `label` (ties get average ranks);
    NaN when one class is empty."""
    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when a side is constant."""
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
