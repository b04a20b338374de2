"""Behaviour in its own units: how much of a pair's measured behaviour change goes through the
policy's features.

For pair ``i`` with ΔX (n, K) and Δy (n,): ``ΔZ = ΔX / s``, the policy-predicted change per
probe ``p_j = ΔZ_j · β`` and its mean over probes, ``mediated = Σ_k β_k · mean_j ΔZ_jk``
(also per feature: ``β_k · mean_j ΔZ_jk``), in the behaviour's units (nats for a log-probability score).
``direct = mean Δy − mediated`` is what the features do not carry. Two honest summaries:
``mediated_share = mediated / mean Δy`` (how much of the average change; null when the change
is zero) and ``mediated_r2 = 1 − ‖Δy − p‖² / ‖Δy‖²`` (how well the features' prediction
matches the change probe by probe; ≤ 0 when they explain nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# A mean change below this (in the behaviour's units) has no meaningful share.
ZERO_CHANGE = 1e-12


@dataclass(frozen=True)
class Mediation:
    """Per pair (P,) and per pair and feature (P, K); per probe group when groups are given."""

    mediated: np.ndarray
    direct: np.ndarray
    share: np.ndarray  # NaN where undefined (callers store null)
    r2: np.ndarray  # NaN where undefined
    per_feature: np.ndarray
    predicted: np.ndarray  # (P, n) policy-predicted change per probe


def mediation(stacked: sp.csr_matrix, dy: np.ndarray, coef: np.ndarray, scale: np.ndarray,
              mediated: np.ndarray | None = None) -> Mediation:
    """``stacked``: pair-major ΔX (P·n, K); ``dy``: (P, n); the policy's ``coef`` and ``scale``.
    ``mediated``: the core's mean predicted change per pair when already computed (the same
    quantity, reused so the two columns agree to the bit)."""
    p, n = dy.shape
    w = coef / scale
    predicted = np.asarray(stacked @ w).reshape(p, n)
    owner = sp.csr_matrix((np.full(p * n, 1.0 / n), (np.repeat(np.arange(p), n), np.arange(p * n))), shape=(p, p * n))
    mean_dz = np.asarray((owner @ stacked).todense()) / scale
    per_feature = mean_dz * coef
    mediated = predicted.mean(axis=1) if mediated is None else np.asarray(mediated, dtype=np.float64)
    dy_mean = dy.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(np.abs(dy_mean) > ZERO_CHANGE, mediated / dy_mean, np.nan)
        ss = (dy**2).sum(axis=1)
        r2 = np.where(ss > 0, 1.0 - ((dy - predicted) ** 2).sum(axis=1) / ss, np.nan)
    return Mediation(mediated, dy_mean - mediated, share, r2, per_feature, predicted)
