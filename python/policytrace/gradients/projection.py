"""Gradients as vectors: whole (flattened) or projected per module by seeded random factors.

For a parameter matrix of shape (out, in) the projection is ``P_out G P_inᵀ`` (r × r) with
independent Gaussian factors of variance 1/r, so ``E⟨proj A, proj B⟩ = ⟨A, B⟩`` for every pair of
gradients (the factored projection LoGra and Bergson use; for a sum of outer products it equals
projecting the module's input activations and output gradients). Vectors and other shapes get a
dense r-row factor. Factors are never stored: they are regenerated from ``(seed, parameter
name)``, so every process and every later run projects the same way.
"""

from __future__ import annotations

import math
import zlib

import torch


class Whole:
    """No projection: the gradient, flattened in parameter order (exact inner products)."""

    def __init__(self, shapes: dict[str, torch.Size]) -> None:
        self.names = list(shapes)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.dim = sum(math.prod(s) for s in shapes.values())
        self.info = {"kind": "whole", "dim": self.dim}

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[n].reshape(-1) for n in self.names])


class Factored:
    """Per-module r × r projection (module docstring)."""

    def __init__(self, shapes: dict[str, torch.Size], r: int, seed: int, device: str | torch.device = "cpu") -> None:
        self.names, self.r, self.seed, self.device = list(shapes), r, seed, torch.device(device)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self._factors: dict[str, tuple[torch.Tensor, ...]] = {}
        self.dim = sum(r * r if len(s) == 2 else r for s in self.shapes.values())
        self.info = {"kind": "factored", "r": r, "seed": seed, "dim": self.dim}

    def _gaussian(self, name: str, which: int, rows: int, cols: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + which) % 2**63)
        return (torch.randn(rows, cols, generator=g) / math.sqrt(rows)).to(self.device)

    def factors(self, name: str) -> tuple[torch.Tensor, ...]:
        if name not in self._factors:
            shape = self.shapes[name]
            if len(shape) == 2:
                self._factors[name] = (self._gaussian(name, 0, self.r, shape[0]), self._gaussian(name, 1, self.r, shape[1]))
            else:
                self._factors[name] = (self._gaussian(name, 0, self.r, math.prod(shape)),)
        return self._factors[name]

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for n in self.names:
            g = grads[n].float() if grads[n].dtype != torch.float64 else grads[n]
            f = [x.to(g.dtype) for x in self.factors(n)]
            parts.append((f[0] @ g @ f[1].T).reshape(-1) if len(f) == 2 else f[0] @ g.reshape(-1))
        return torch.cat(parts)


def projector(shapes: dict[str, torch.Size], r: int, seed: int, device: str = "cpu"):
    return Whole(shapes) if r == 0 else Factored(shapes, r, seed, device)
