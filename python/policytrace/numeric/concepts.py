"""Gradient mode's concepts: every first-order output as a linear functional of (ΔX, Δy).

The first-order decomposition (docs/design.md §1 step 5) is linear in a pair's ΔX and Δy. With
the policy's centred scaled design ``Z̃``, residual ``r``, coefficients ``β``, ``A = Z̃ᵀZ̃ + λI``
and ``ΔZ = ΔX / s`` (centring ΔZ and Δy changes nothing: ``Z̃ᵀ1 = 0`` and ``1ᵀr = 0``)::

    d_x = A⁻¹ (ΔZᵀ r − Z̃ᵀ ΔZ β),    d_y = A⁻¹ Z̃ᵀ Δy

so for any ``v``, ``vᵀd_x = Σ_jk ΔX_jk · (v_k r_j − (Z̃v)_j β_k) / s_k`` and
``vᵀd_y = Σ_j Δy_j (Z̃v)_j``. A :class:`Concept` is the pair of cotangents ``(cx, cy)`` with
``output = Σ cx ⊙ ΔX + cy · Δy``; gradient mode turns them into cotangents on the model's pooled
activations (through the SAE encoder's Jacobian) and takes one backward pass per concept.

Concepts: ``score_x`` and ``score_y`` (``v = A⁻¹β``; their sum is SMDA's pair score),
``dy_mean``, ``mediated_dy`` (= ``pred_dy_mean``, ``mean_j ΔZ_j·β``), the mean Δy on the
behaviour's flagged and unflagged probes, and on request ``d_coef_x[k]``, ``d_coef_y[k]`` for
every feature (``v = A⁻¹ e_k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .policy import Policy


@dataclass(frozen=True)
class Concept:
    name: str
    cx: np.ndarray  # (n, K) cotangent on ΔX
    cy: np.ndarray  # (n,) cotangent on Δy
    site: int = 0
    """Whose features ``cx`` is on: 0 the policy's own; ``i`` ≥ 1 the i-th other layer's
    (mediation across layers: then K is that layer's count)."""

    def apply(self, dX: np.ndarray, dy: np.ndarray) -> float:
        """The concept's value for one pair's (ΔX, Δy) (what gradient mode approximates)."""
        return float((self.cx * dX).sum() + self.cy @ dy)


@dataclass(frozen=True)
class PolicyAlgebra:
    """The base fit's quantities the concepts are built from."""

    zc: np.ndarray  # (n, K) centred scaled design
    r: np.ndarray  # (n,) residual
    beta: np.ndarray  # (K,)
    a_inv: np.ndarray  # (K, K)
    scale: np.ndarray  # (K,)

    @classmethod
    def of(cls, policy: Policy, X: np.ndarray, y: np.ndarray) -> "PolicyAlgebra":
        Z = np.asarray(X, dtype=np.float64) / policy.scale
        y = np.asarray(y, dtype=np.float64)
        if policy.fit_intercept:
            Z, y = Z - Z.mean(axis=0), y - y.mean()
        beta = policy.coef
        A = Z.T @ Z + policy.lam * np.eye(Z.shape[1])
        return cls(Z, y - Z @ beta, beta, np.linalg.pinv(A, hermitian=True), policy.scale)

    def x_path(self, v: np.ndarray) -> np.ndarray:
        """Cotangent on ΔX of ``vᵀ d_x``."""
        return (np.outer(self.r, v) - np.outer(self.zc @ v, self.beta)) / self.scale

    def y_path(self, v: np.ndarray) -> np.ndarray:
        """Cotangent on Δy of ``vᵀ d_y``."""
        return self.zc @ v


def concepts(policy: Policy, X: np.ndarray, y: np.ndarray, flag: np.ndarray | None = None,
             per_feature: bool = False) -> list[Concept]:
    """The gradient-mode concepts of a fitted policy (see the module docstring)."""
    alg = PolicyAlgebra.of(policy, X, y)
    n, k = alg.zc.shape
    zero_x, zero_y = np.zeros((n, k)), np.zeros(n)
    u = alg.a_inv @ alg.beta
    out = [
        Concept("score_x", alg.x_path(u), zero_y),
        Concept("score_y", zero_x, alg.y_path(u)),
        Concept("dy_mean", zero_x, np.full(n, 1.0 / n)),
        Concept("mediated_dy", np.tile(alg.beta / alg.scale / n, (n, 1)), zero_y),
    ]
    if flag is not None and flag.any() and not flag.all():
        out.append(Concept("dy_on_flagged", zero_x, flag / flag.sum()))
        out.append(Concept("dy_on_unflagged", zero_x, ~flag / (~flag).sum()))
    if per_feature:
        for j, fid in enumerate(policy.feature_ids):
            v = alg.a_inv[:, j]
            out.append(Concept(f"d_coef_x:{int(fid)}", alg.x_path(v), zero_y))
            out.append(Concept(f"d_coef_y:{int(fid)}", zero_x, alg.y_path(v)))
    return out
