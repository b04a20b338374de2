"""A pair's first-order update direction Δθ (what gradient mode takes inner products with)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..model.update import ADAM_EPS, UpdateEngine


def check_first_order(engine: UpdateEngine) -> None:
    """Refuse update rules without a first-order form in the pair's gradient."""
    if engine.cfg.steps != 1:
        raise ConfigError(f"gradient mode needs update.steps = 1 (got {engine.cfg.steps}): several steps have no "
                          "first-order form in one gradient; use run.mode = \"engine\"")


def update_direction(engine: UpdateEngine, prompt: str, response: str, pair_id: str) -> dict[str, torch.Tensor]:
    """Δθ of the pair's one step at θ0: SGD ``−lr·g``; Adam's first step ``−lr·g / (|g| + ε)``
    (bias-corrected moments of one gradient); LoRA on its adapters."""
    g = engine.gradient(prompt, response, pair_id)
    return {n: -engine.cfg.lr * _unscaled_step(engine, v) for n, v in g.items()}


def _unscaled_step(engine: UpdateEngine, g: torch.Tensor) -> torch.Tensor:
    """Δθ / (−lr) for one parameter's gradient: SGD's ``g``, Adam's first step ``g / (|g| + ε)``."""
    return g if engine.cfg.optimizer == "sgd" else g / (g.abs() + ADAM_EPS)


def direction_products(engine: UpdateEngine, concept_grads: torch.Tensor, prompt: str, response: str,
                       pair_id: str) -> torch.Tensor:
    """(C,) float64: every whole concept gradient (rows of ``concept_grads``, flattened in
    ``engine.trainable`` order) dotted with the pair's Δθ, one parameter block at a time: no
    flattened copy of Δθ, and for SGD no scaled copy either (−lr is applied to the C sums)."""
    g = engine.gradient(prompt, response, pair_id)
    out = torch.zeros(concept_grads.shape[0], dtype=torch.float64, device=concept_grads.device)
    off = 0
    for n in engine.trainable:
        v = _unscaled_step(engine, g.pop(n))
        k = v.numel()
        out += (concept_grads[:, off:off + k] @ v.reshape(-1).to(concept_grads.dtype)).double()
        off += k
    if off != concept_grads.shape[1]:
        raise ValueError(f"concept gradients have {concept_grads.shape[1]} columns, the parameters {off}")
    return -engine.cfg.lr * out
