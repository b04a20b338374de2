"""Concept gradients: ∇θ of each concept's functional of the probe pass, one backward per
concept and probe batch, accumulated (memory stays that of one batch's graph)."""

from __future__ import annotations

import numpy as np
import torch

from .. import _progress
from ..numeric.concepts import Concept


def concept_gradients(state, concepts: list[Concept], project, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """(C, D) float32: the projected gradient of every concept's functional
    ``φ_c(θ) = Σ_j cx_c[j] · x_j(θ) + cy_c[j] · y_j(θ)`` at θ0, where ``x_j`` are the probe's
    codes of the selected features through the SAE encoder (its Jacobian is the gated
    linearization's) and ``y_j`` its behaviour score."""
    m = state.model
    engine, runner, reader = m.engine, m.runner, m.reader
    names = engine.trainable
    cols = torch.as_tensor(np.array(state.features.columns, dtype=np.int64))
    n = len(m.probe_tokens)
    # float64 sums for a float64 model (exactness tests); float32 otherwise (C x D can be large)
    wide = next(iter(engine.base.values())).dtype == torch.float64
    out = torch.zeros(len(concepts), project.dim, dtype=torch.float64 if wide else torch.float32)
    cx = np.stack([c.cx for c in concepts])  # (C, n, K)
    cy = np.stack([c.cy for c in concepts])  # (C, n)
    bar = _progress.bar(n, "concept probe", progress)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        leaves = {k: engine.base[k].detach().clone().requires_grad_(True) for k in names}
        H, y = runner.run_differentiable(m.probe_tokens[start:stop], {**engine.base, **leaves})
        x = reader.encode_torch(H, cols, state.features.gated)
        for c in range(len(concepts)):
            gx = torch.as_tensor(cx[c, start:stop], dtype=x.dtype, device=x.device)
            gy = torch.as_tensor(cy[c, start:stop], dtype=y.dtype, device=y.device)
            grads = torch.autograd.grad((x, y), [leaves[k] for k in names], grad_outputs=(gx, gy),
                                        retain_graph=c < len(concepts) - 1, allow_unused=True)
            g = {k: (v if v is not None else torch.zeros_like(leaves[k])) for k, v in zip(names, grads)}
            out[c] += project(g).to(out.dtype).cpu()
        del H, y, x, leaves
        bar.update(stop - start)
    bar.close()
    return out
