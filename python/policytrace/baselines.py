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


def probe_gradients(ctx: SimpleNamespace) -> tuple[dict, dict]:
    """∇θ mean_j y_j and ∇θ of the policy readout, over the run's probes, at θ0."""
    import torch

    engine, runner, reader, policy = ctx.engine, ctx.runner, ctx.reader, ctx.policy
    names = engine.trainable
    cols = torch.as_tensor(np.array(ctx.cols))
    w = torch.as_tensor(policy.coef / policy.scale)

    def objectives(train):
        params = {**engine.base, **train}
        H, y = runner.run_differentiable(ctx.probe_ids, params)
        if ctx.gated:
            pre = reader.sae.process_sae_in(H.to(reader.sae.W_enc.dtype)) @ reader.sae.W_enc + reader.sae.b_enc
            x = torch.relu(pre[:, cols])
        else:
            x = reader.sae.encode(H.to(reader.sae.W_enc.dtype))[:, cols]
        readout = (x.double() @ w.to(torch.float64)).mean()
        return y.double().mean(), readout

    train = {n: engine.base[n] for n in names}
    g_y = torch.func.grad(lambda t: objectives(t)[0])(train)
    g_f = torch.func.grad(lambda t: objectives(t)[1])(train)
    return g_y, g_f


def _dot(a: dict, b: dict) -> float:
    return float(sum((a[n].detach().double() * b[n].detach().double()).sum() for n in a))


def gradient_baselines(ctx: SimpleNamespace, lr: float) -> pl.DataFrame:
    """One row per pair of the run: grad_cosine, concept_influence, behaviour_first_order."""
    g_y, g_f = probe_gradients(ctx)
    ny = np.sqrt(_dot(g_y, g_y))
    rows = {"pair_id": [], "grad_cosine": [], "concept_influence": [], "behaviour_first_order": []}
    for r in ctx.pairs.iter_rows(named=True):
        g = ctx.engine.gradient(r["prompt"], r["response"], r["id"])
        ng = np.sqrt(_dot(g, g))
        gy = _dot(g, g_y)
        rows["pair_id"].append(r["id"])
        # query loss = −mean y, so its gradient is −g_y
        rows["grad_cosine"].append(-gy / (ng * ny) if ng > 0 and ny > 0 else 0.0)
        rows["concept_influence"].append(-lr * _dot(g, g_f))
        rows["behaviour_first_order"].append(-lr * gy)
    return pl.DataFrame(rows)
