"""Gradient-based attributions to compare SMDA with (DESIGN §5, REFERENCES: TrackStar, Concept
Influence), computed on the same pairs and probes as a run.

* ``grad_cosine`` (TrackStar-style, unprojected, no optimizer correction): cosine between the
  pair's loss gradient and the gradient of the *query loss* −mean_j y_j, so a positive score
  means training on the pair raises the behaviour score.
* ``concept_influence``: the first-order change of the policy's readout
  f(θ) = mean_j Σ_k coef_k·x_jk(θ)/s_k under one SGD step on the pair: −lr·∇L_pairᵀ∇f
  (the identity-Hessian Concept Influence with the policy as the concept).
* ``behaviour_first_order``: the same for the mean behaviour score itself: −lr·∇L_pairᵀ∇ȳ.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl


def probe_gradients(ctx: SimpleNamespace, batch_size: int = 8) -> tuple[dict, dict]:
    """∇θ mean_j y_j and ∇θ of the policy readout, over the run's probes, at θ0.

    Both means are sums over probes, so the gradients are accumulated batch by batch: memory
    stays that of one small batch's backward pass, whatever the number of probes."""
    import torch

    engine, runner, reader, policy = ctx.engine, ctx.runner, ctx.reader, ctx.policy
    names = engine.trainable
    cols = torch.as_tensor(np.array(ctx.cols))
    w = torch.as_tensor(policy.coef / policy.scale, dtype=torch.float64)
    n = len(ctx.probe_ids)
    g_y = {k: torch.zeros_like(engine.base[k], dtype=torch.float64) for k in names}
    g_f = {k: torch.zeros_like(engine.base[k], dtype=torch.float64) for k in names}
    for start in range(0, n, batch_size):
        leaves = {k: engine.base[k].detach().clone().requires_grad_(True) for k in names}
        params = {**engine.base, **leaves}
        H, y = runner.run_differentiable(ctx.probe_ids[start : start + batch_size], params)
        sae = reader.sae
        if ctx.gated:
            pre = sae.process_sae_in(H.to(sae.W_enc.dtype)) @ sae.W_enc + sae.b_enc
            x = torch.relu(pre[:, cols])
        else:
            x = sae.encode(H.to(sae.W_enc.dtype))[:, cols]
        y_sum = y.double().sum() / n
        f_sum = (x.double() @ w).sum() / n
        inputs = [leaves[k] for k in names]
        gy = torch.autograd.grad(y_sum, inputs, retain_graph=True, allow_unused=True)
        gf = torch.autograd.grad(f_sum, inputs, allow_unused=True)
        for k, a, b in zip(names, gy, gf):
            if a is not None:
                g_y[k] += a.double()
            if b is not None:
                g_f[k] += b.double()
        del H, y, x, leaves, params
    return g_y, g_f


def _dot(a: dict, b: dict) -> float:
    return float(sum((a[n].detach().double() * b[n].detach().double()).sum() for n in a))


def gradient_baselines(ctx: SimpleNamespace, lr: float, pairs: pl.DataFrame | None = None,
                       probe_grads: tuple[dict, dict] | None = None) -> pl.DataFrame:
    """One row per pair (the run's, or ``pairs``): grad_cosine, concept_influence,
    behaviour_first_order."""
    g_y, g_f = probe_grads if probe_grads is not None else probe_gradients(ctx)
    ny = np.sqrt(_dot(g_y, g_y))
    rows = {"pair_id": [], "grad_cosine": [], "concept_influence": [], "behaviour_first_order": []}
    for r in (ctx.pairs if pairs is None else pairs).iter_rows(named=True):
        g = ctx.engine.gradient(r["prompt"], r["response"], r["id"])
        ng = np.sqrt(_dot(g, g))
        gy = _dot(g, g_y)
        rows["pair_id"].append(r["id"])
        # query loss = −mean y, so its gradient is −g_y
        rows["grad_cosine"].append(-gy / (ng * ny) if ng > 0 and ny > 0 else 0.0)
        rows["concept_influence"].append(-lr * _dot(g, g_f))
        rows["behaviour_first_order"].append(-lr * gy)
    return pl.DataFrame(rows)
