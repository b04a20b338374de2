"""Concept gradients: ∇θ of each concept's functional of the probe pass, one backward per
concept and probe batch, accumulated (memory stays that of one batch's graph)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import _progress
from ..numeric.concepts import Concept

if TYPE_CHECKING:
    from ..model.probe import ProbeRunner
    from ..model.sae import SaeReader
    from ..model.update import UpdateEngine
    from .projection import Factored, Whole


def concept_gradients(concepts: Sequence[Concept], project: Whole | Factored, *,
                      engine: UpdateEngine, runner: ProbeRunner, reader: SaeReader,
                      probe_tokens: Sequence[Sequence[int]], columns: np.ndarray, gated: bool, batch_size: int = 8,
                      progress: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(C, D): the projected gradient of every concept's functional
    ``φ_c(θ) = Σ_j cx_c[j] · x_j(θ) + cy_c[j] · y_j(θ)`` at θ0 (``engine.base``'s trainable
    weights), where ``x_j`` are the codes of the SAE features ``columns`` of probe ``j``
    (``probe_tokens[j]``, through ``runner``'s differentiable pass and ``reader``'s encoder; its
    Jacobian is the gated linearization's when ``gated``) and ``y_j`` its behaviour score. The
    concepts' ``(cx, cy)`` are the cotangents. ``project`` maps per-parameter gradients to a
    row (``gradients.projection``). Sums and rows in ``dtype``; by default float64 for a float64
    model (exactness tests), float32 otherwise (C x D can be large)."""
    names = engine.trainable
    cols = torch.as_tensor(np.array(columns, dtype=np.int64))
    n = len(probe_tokens)
    if dtype is None:
        wide = next(iter(engine.base.values())).dtype == torch.float64
        dtype = torch.float64 if wide else torch.float32
    if not concepts:  # a rank that owns none under torchrun still takes part in the exchange
        return torch.empty(0, project.dim, dtype=dtype)
    cx = np.stack([c.cx for c in concepts])  # (C, n, K)
    cy = np.stack([c.cy for c in concepts])  # (C, n)
    bar = _progress.bar(n, "concept probe", progress)
    # Sums stay per parameter until the end: projecting (or flattening) every batch's C gradients
    # would copy C x parameters floats per batch.
    acc: list[dict[str, torch.Tensor]] = [{} for _ in concepts]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        # detach() shares the weights' storage: leaves for autograd without copying the model
        leaves = {k: engine.base[k].detach().requires_grad_(True) for k in names}
        H, y = runner.run_differentiable(probe_tokens[start:stop], {**engine.base, **leaves})
        x = reader.encode_torch(H, cols, gated)
        for c in range(len(concepts)):
            gx = torch.as_tensor(cx[c, start:stop], dtype=x.dtype, device=x.device)
            gy = torch.as_tensor(cy[c, start:stop], dtype=y.dtype, device=y.device)
            grads = torch.autograd.grad((x, y), [leaves[k] for k in names], grad_outputs=(gx, gy),
                                        retain_graph=c < len(concepts) - 1, allow_unused=True)
            for k, v in zip(names, grads):
                if v is None:
                    continue
                if k in acc[c]:
                    acc[c][k].add_(v.to(dtype))  # in place: a fresh C x parameters buffer per batch costs page faults
                else:
                    acc[c][k] = v.to(dtype, copy=True)  # owned: later batches add into it
        del H, y, x, leaves
        bar.update(stop - start)
    # Rows are written one at a time as each concept's sums are freed (torch.empty touches no
    # memory until written), so the peak stays near C x parameters, not twice that.
    out = torch.empty(len(concepts), project.dim, dtype=dtype)
    for c in range(len(concepts)):
        g = {k: acc[c].get(k, torch.zeros_like(engine.base[k], dtype=dtype)) for k in names}
        out[c] = project(g).to(dtype).cpu()
        acc[c] = {}
        del g
    bar.close()
    return out
