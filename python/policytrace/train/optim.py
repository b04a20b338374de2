"""The recipe's optimizer and schedule, written out so that every quantity trajectory mode needs
is in plain sight: the learning rate of each step, the clipping factor, and the elementwise
preconditioner ``u_s = 1/(√v̂_s + ε)`` (docs/design.md, "Trajectory mode").

One step, for every trained tensor θ with the step's (clipped) gradient ``g``:

* adamw: ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``,
  ``θ ← (1 − lr·λ) θ − lr · (m / (1−β1^s)) ⊙ u_s``, ``u_s = 1/(√(v/(1−β2^s)) + ε)``
  (PyTorch's AdamW to the operation order);
* sgd: ``b ← μ b + g``, ``θ ← (1 − lr·λ) θ − lr · b`` (decoupled decay).

Both are ``M ← μ M + γ g``, ``θ ← (1 − lr·λ) θ − lr · α_s · u_s ⊙ M`` with (μ, γ, α_s, u_s) =
(β1, 1−β1, 1/(1−β1^s), the preconditioner) or (momentum, 1, 1, 1): :func:`coefficients`.
"""

from __future__ import annotations

import math

import torch

from .config import TrainCfg


def lr_at(cfg: TrainCfg, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based) of ``total``."""
    w = cfg.warmup_steps
    if step <= w:
        return cfg.lr * step / w
    if cfg.schedule == "constant" or total <= w:
        return cfg.lr
    p = (step - w - 1) / (total - w)  # in [0, 1): the last step keeps a non-zero rate
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - p)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * p))


def coefficients(cfg: TrainCfg, step: int) -> tuple[float, float, float]:
    """(μ, γ, α_s) of the unified form above for optimizer step ``step``."""
    if cfg.optimizer == "adamw":
        b1 = cfg.betas[0]
        return b1, 1.0 - b1, 1.0 / (1.0 - b1**step)
    return cfg.momentum, 1.0, 1.0


class Optimizer:
    """The recipe's optimizer over named tensors (updated in place). State: ``m`` (and ``v``
    for adamw) per tensor, in the tensor's dtype, and the step count."""

    def __init__(self, cfg: TrainCfg, params: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.step_count = 0
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in params.items()} if cfg.optimizer == "adamw" else {}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save (``m.<name>``, ``v.<name>``)."""
        out = {f"m.{n}": t for n, t in self.m.items()}
        out |= {f"v.{n}": t for n, t in self.v.items()}
        return out

    def load(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        for n in self.m:
            self.m[n].copy_(tensors[f"m.{n}"])
        for n in self.v:
            self.v[n].copy_(tensors[f"v.{n}"])
        self.step_count = step

    def clip_scale(self, grads: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(κ, ‖g‖): the clipping factor the step applies to the whole gradient (1 when off)."""
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        if self.cfg.max_grad_norm <= 0:
            return 1.0, norm
        return min(1.0, self.cfg.max_grad_norm / (norm + 1e-6)), norm

    def preconditioner(self, name: str, step: int | None = None) -> torch.Tensor:
        """u = 1/(√v̂ + ε) of tensor ``name`` from the current state (ones for sgd)."""
        if self.cfg.optimizer != "adamw":
            return torch.ones_like(self.m[name])
        s = self.step_count if step is None else step
        bc2 = 1.0 - self.cfg.betas[1] ** s
        return 1.0 / ((self.v[name].sqrt() / math.sqrt(bc2)) + self.cfg.eps)

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float,
             scale: float = 1.0, frozen_u: dict[str, torch.Tensor] | None = None) -> None:
        """One step with the gradient ``scale · grads``. ``frozen_u`` replaces the
        preconditioner (the tests' linear replay); the second moment is then not updated."""
        cfg = self.cfg
        self.step_count += 1
        s = self.step_count
        mu, gamma, alpha = coefficients(cfg, s)
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n] * scale if scale != 1.0 else grads[n]
                if cfg.weight_decay:
                    p.mul_(1.0 - lr * cfg.weight_decay)
                if cfg.optimizer == "adamw":
                    self.m[n].mul_(mu).add_(g, alpha=gamma)
                    if frozen_u is None:
                        b2 = cfg.betas[1]
                        self.v[n].mul_(b2).addcmul_(g, g, value=1.0 - b2)
                        bc2 = 1.0 - b2**s
                        denom = (self.v[n].sqrt() / math.sqrt(bc2)).add_(cfg.eps)
                        p.addcdiv_(self.m[n], denom, value=-lr * alpha)
                    else:
                        p.add_(self.m[n] * frozen_u[n], alpha=-lr * alpha)
                else:
                    self.m[n].mul_(mu).add_(g) if s > 1 else self.m[n].copy_(g)
                    p.add_(self.m[n], alpha=-lr)
