"""Behaviour in its own units: how much of a pair's measured behaviour change goes through the
policy's features.

For pair ``i`` with ΔX (n, K) and Δy (n,): ``ΔZ = ΔX / s``, the policy-predicted change per
probe ``p_j = ΔZ_j · β`` and its mean over probes, ``mediated = Σ_k β_k · mean_j ΔZ_jk``
(also per feature: ``β_k · mean_j ΔZ_jk``), in the behaviour's units (nats for a log-probability score).
``direct = mean Δy − mediated`` is what the features do not carry. Two honest summaries:
``mediated_share = mediated / mean Δy`` (how much of the average change; null when the change
is zero) and ``mediated_r2 = 1 − ‖Δy − p‖² / ‖Δy‖²`` (how well the features' prediction
matches the change probe by probe; ≤ 0 when they explain nothing).

Across layers (``sae.layers``), :func:`layer_summary` gives each layer's curve point over all
pairs: the mediated share of the summed change ``Σ_i mediated_i / Σ_i dy_i`` and, across pairs,
``1 − Σ_i (dy_i − mediated_i)² / Σ_i dy_i²`` (uncentred, like the per-pair R²).
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


def mediation(predicted: np.ndarray, mean_dx: np.ndarray, dy: np.ndarray, coef: np.ndarray, scale: np.ndarray,
              mediated: np.ndarray | None = None) -> Mediation:
    """From the core's sums: ``predicted`` (P, n), the policy's change per probe ``ΔX_j·(coef/s)``,
    and ``mean_dx`` (P, K), the mean ΔX per feature; ``dy``: (P, n); the policy's ``coef`` and
    ``scale``. ``mediated``: the core's mean predicted change per pair when already computed
    (the same quantity, reused so the two columns agree to the bit)."""
    per_feature = mean_dx / scale * coef
    mediated = predicted.mean(axis=1) if mediated is None else np.asarray(mediated, dtype=np.float64)
    dy_mean = dy.mean(axis=1)
    share = mediated_share(mediated, dy_mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        ss = (dy**2).sum(axis=1)
        r2 = np.where(ss > 0, 1.0 - ((dy - predicted) ** 2).sum(axis=1) / ss, np.nan)
    return Mediation(mediated, dy_mean - mediated, share, r2, per_feature, predicted)


def mediated_share(mediated: np.ndarray, dy_mean: np.ndarray) -> np.ndarray:
    """``mediated / dy_mean`` per pair, NaN (stored as null) where the mean change is below
    :data:`ZERO_CHANGE`: every mode's share, whatever computed the two means."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(dy_mean) > ZERO_CHANGE, mediated / dy_mean, np.nan)


def sums_of(stacked: sp.csr_matrix, n: int, coef: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted, mean_dx)`` of a pair-major stacked ΔX (P·n, K) with scipy, as the compiled
    core computes them (the float64 reference's twin)."""
    p = stacked.shape[0] // n
    predicted = np.asarray(stacked @ (coef / scale)).reshape(p, n)
    owner = sp.csr_matrix((np.full(p * n, 1.0 / n), (np.repeat(np.arange(p), n), np.arange(p * n))), shape=(p, p * n))
    return predicted, np.asarray((owner @ stacked).todense())


def pair_mediated(dX: np.ndarray, dy: np.ndarray, coef: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """One pair's ``(mediated, mediated_r2)`` from its ΔX (n, K) and Δy (n,) under a policy's
    ``coef`` and ``scale`` (float64 numpy; NaN R² when Δy is zero)."""
    predicted = np.asarray(dX, dtype=np.float64) @ (np.asarray(coef, dtype=np.float64) / scale)
    dy = np.asarray(dy, dtype=np.float64)
    ss = float(dy @ dy)
    r2 = 1.0 - float(((dy - predicted) ** 2).sum()) / ss if ss > 0 else float("nan")
    return float(predicted.mean()), r2


def layer_summary(dy_mean: np.ndarray, mediated: np.ndarray) -> dict[str, float]:
    """One layer's curve point over pairs (P,): the summed change and its mediated part, the
    mediated share of the summed change (NaN when it is below :data:`ZERO_CHANGE`) and the
    uncentred R² of the pairs' mean changes by their mediated parts (NaN when all are zero)."""
    dy, med = np.asarray(dy_mean, dtype=np.float64), np.asarray(mediated, dtype=np.float64)
    total, carried = float(dy.sum()), float(med.sum())
    ss = float(dy @ dy)
    return {"dy_sum": total, "mediated_sum": carried,
            "mediated_share": carried / total if abs(total) > ZERO_CHANGE else float("nan"),
            "mediated_r2": 1.0 - float(((dy - med) ** 2).sum()) / ss if ss > 0 else float("nan")}
