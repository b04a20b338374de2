"""Counterfactual pair values of a recorded fine-tune: what including a pair changes when the run
is retrained with the recipe on random subsets of the pairs (docs/design.md, "Trajectory mode").

A pair's share of the updates a run took (:mod:`.trajectory`) is not what retraining without it
changes under AdamW: a subset retrained alone takes other, renormalised steps. Here each such
retrain is simulated to first order in the weights: every pair's per-example gradient is held at
θ_0 (one backward per pair), and the recipe's own steps (seeded order, batches, loss
coefficients, schedule, clipping, AdamW with its second moment, weight decay) are run on those
fixed gradients coordinate by coordinate, which is cheap. The concept moves by ``⟨Ḡ, Δθ(S)⟩``
with Ḡ the concept gradients averaged along the recorded path. A pair's value is its coefficient in
the least-squares additive fit ``φ(S) ≈ b + Σ_{i∈S} a_i`` over Bernoulli(½) subsets (a datamodel
of the simulator; :func:`banzhaf` is the noisier maximum-sample-reuse Banzhaf estimate from the
same subsets): for an additive run the pair's own term, and the values add up to about the
simulated full run's change.

What it leaves out: the change of per-example gradients along the run (curvature), which grows
with the learning rate. Memory: the pairs' gradients, P × (trained size) floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _progress
from ..errors import InvalidValueError
from ..gradients.batched import TrainExample
from .finetuning import loss_coefficients, plan
from .optim import coefficients, lr_at
from .trajectory import Records, Replay, flat, path_weights

MAX_GRADIENT_BYTES = 16 * 2**30
"""Above this the pairs' per-example gradients (P × trained size) are refused."""


def pair_gradients(replay: Replay, rec: Records, progress: bool = False) -> torch.Tensor:
    """(P, D) in the trained tensors' dtype: each example's gradient (its mean cross-entropy) at
    θ_0, flat in the records' tensor order."""
    D = sum(int(np.prod(rec.shapes[n])) for n in rec.names)
    dtype = next(iter(replay.params.values())).dtype
    need = len(rec.ids) * D * torch.empty((), dtype=dtype).element_size()
    if need > MAX_GRADIENT_BYTES:
        raise InvalidValueError(
            f"train.pair_value = \"counterfactual\" holds every pair's gradient: {len(rec.ids)} × {D:,} floats "
            f"({need / 2**30:.1f} GiB) is over {MAX_GRADIENT_BYTES / 2**30:.0f} GiB; train fewer tensors "
            "(train.params) or use train.pair_value = \"share\"")
    replay.restore()
    out = torch.empty((len(rec.ids), D), dtype=dtype, device=replay.device)
    bar = _progress.bar(len(rec.ids), "pair gradient", progress)
    for i in range(len(rec.ids)):
        out[i] = flat(replay.batch_gradient({"examples": [i], "coef": [1.0]}), rec.names)
        bar.update(1)
    bar.close()
    return out


def mean_path_gradient(rec: Records, G: list[torch.Tensor], path: str) -> torch.Tensor:
    """(C, D): the concept gradients along the recorded path, averaged over its steps."""
    w = path_weights(rec, path).mean(axis=0)
    out = torch.zeros_like(G[0])
    for k, wk in enumerate(w):
        if wk:
            out += float(wk) * G[k]
    return out


class Simulator:
    """Runs the recipe on fixed per-example gradients ``g`` (P, D) from θ_0, reusing its buffers
    across subsets (fresh pages cost more than the arithmetic here). The update is
    :class:`.optim.Optimizer`'s, written on Δθ = θ − θ_0 in place."""

    def __init__(self, rec: Records, examples: list[TrainExample], g: torch.Tensor, theta0: torch.Tensor) -> None:
        self.rec, self.examples, self.g, self.theta0 = rec, examples, g, theta0
        self.d, self.m, self.v, self.x, self.tmp = (torch.empty_like(theta0) for _ in range(5))

    def displacement(self, members: np.ndarray) -> torch.Tensor:
        """Δθ after the recipe on the examples at positions ``members`` (taken in ascending
        order, as a retrain takes them); a view of a reused buffer."""
        cfg = self.rec.recipe
        mem = np.sort(np.asarray(members, dtype=np.int64))
        d, x = self.d, self.x
        for t in (d, self.m, self.v):
            t.zero_()
        if len(mem) == 0:
            return d
        sub = [self.examples[i] for i in mem]
        steps = plan(cfg, len(mem))
        ones = np.ones(len(mem))
        for s, st in enumerate(steps, start=1):
            x.zero_()
            for c, j in zip(loss_coefficients(cfg, sub, st.examples, ones), st.examples):
                x.add_(self.g[mem[j]], alpha=float(c))
            self._step(s, lr_at(cfg, s, len(steps)), self._clip(x))
        return d

    def _clip(self, x: torch.Tensor) -> float:
        limit = self.rec.recipe.max_grad_norm
        if limit <= 0:
            return 1.0
        return min(1.0, limit / (float(torch.linalg.vector_norm(x.double())) + 1e-6))

    def _step(self, s: int, lr: float, scale: float) -> None:
        cfg = self.rec.recipe
        mu, gamma, alpha = coefficients(cfg, s)
        d, m, v, x, tmp = self.d, self.m, self.v, self.x, self.tmp
        if cfg.weight_decay:
            d.mul_(1.0 - lr * cfg.weight_decay).add_(self.theta0, alpha=-lr * cfg.weight_decay)
        if cfg.optimizer == "adamw":
            b2 = cfg.betas[1]
            m.mul_(mu).add_(x, alpha=gamma * scale)
            v.mul_(b2).addcmul_(x, x, value=(1.0 - b2) * scale * scale)
            torch.sqrt(v, out=tmp)
            tmp.div_(math.sqrt(1.0 - b2**s)).add_(cfg.eps)
            d.addcdiv_(m, tmp, value=-lr * alpha)
        else:
            if s > 1:
                m.mul_(mu)
            m.add_(x, alpha=scale)
            d.add_(m, alpha=-lr)


def simulated_subsets(sim: Simulator, Gbar: torch.Tensor, samples: int, seed: int,
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` seeded Bernoulli(½) subsets as (N, P) masks and their simulated concept changes (N, C)."""
    P = len(sim.examples)
    rng = np.random.default_rng([seed, P])
    Gd = Gbar.to(sim.theta0.dtype)
    masks = rng.random((samples, P)) < 0.5
    phi = np.zeros((samples, Gd.shape[0]))
    bar = _progress.bar(samples, "simulated retrain", progress)
    for n in range(samples):
        phi[n] = (Gd @ sim.displacement(np.flatnonzero(masks[n]))).double().cpu().numpy()
        bar.update(1)
    bar.close()
    return masks, phi


def banzhaf(masks: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """(P, C) maximum-sample-reuse Banzhaf values: mean φ over the subsets holding each pair
    minus the mean over the others."""
    n_in = masks.sum(0)
    n_out = len(masks) - n_in
    if (n_in == 0).any() or (n_out == 0).any():
        raise InvalidValueError(f"train.simulations = {len(masks)} left a pair in (or out of) every subset; raise it")
    m = masks.astype(np.float64)
    return (m.T @ phi) / n_in[:, None] - ((1 - m).T @ phi) / n_out[:, None]


def additive_fit(masks: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """(P, C): the least-squares additive model φ(S) ≈ b + Σ_{i∈S} a_i of the simulated subsets
    (a datamodel of the simulator). It accounts for which other pairs each subset held, so its
    values are far less noisy than :func:`banzhaf`'s for the same subsets."""
    N, P = masks.shape
    if N < 2 * (P + 1):
        raise InvalidValueError(f"train.simulations = {N} is too few for {P} pairs: the additive fit needs at least "
                                f"{2 * (P + 1)} (4 × pairs recommended)")
    A = np.concatenate([np.ones((N, 1)), masks.astype(np.float64)], axis=1)
    coef, *_ = np.linalg.lstsq(A, phi, rcond=None)
    return coef[1:]


def counterfactual_values(rec: Records, examples: list[TrainExample], g: torch.Tensor, theta0: torch.Tensor,
                          Gbar: torch.Tensor, samples: int, seed: int, progress: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(P, C) every pair's value for every concept (:func:`additive_fit` of ``samples``
    simulated subsets) and (C,) the simulated change of the run on all pairs."""
    sim = Simulator(rec, examples, g, theta0)
    masks, phi = simulated_subsets(sim, Gbar, samples, seed, progress)
    full = Gbar.to(theta0.dtype) @ sim.displacement(np.arange(len(examples)))
    return additive_fit(masks, phi), full.double().cpu().numpy()
