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
    lr = engine.cfg.lr
    if engine.cfg.optimizer == "sgd":
        return {n: -lr * v for n, v in g.items()}
    return {n: -lr * v / (v.abs() + ADAM_EPS) for n, v in g.items()}
