"""Gradient-based and probe-projection attributions to compare SMDA with (TrackStar, Concept
Influence; docs/design.md, "Evaluation"), computed on the same pairs and probes as a run.

* ``grad_cosine`` (TrackStar-style, unprojected, no optimizer correction): cosine between the
  pair's loss gradient and the gradient of the *query loss* −mean_j y_j, so a positive score
  means training on the pair raises the behaviour score.
* ``concept_influence``: the first-order change of the policy's readout
  f(θ) = mean_j Σ_k coef_k·x_jk(θ)/s_k under one SGD step on the pair: −lr·∇L_pairᵀ∇f
  (the identity-Hessian Concept Influence with the policy as the concept).
* ``behaviour_first_order``: the same for the mean behaviour score itself: −lr·∇L_pairᵀ∇ȳ.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from ... import _progress
from ...model.chat import ChatPair, chat_pair_tokens, format_chat
from ...model.sites import capture
from ..data import chat_pair
from ..stages import BaseState


def probe_gradients(state: BaseState, batch_size: int = 8, progress: bool = False) -> tuple[dict, dict]:
    """∇θ mean_j y_j and ∇θ of the policy readout, over the run's probes, at θ0.

    Both means are sums over probes, so the gradients are accumulated batch by batch: memory
    stays that of one small batch's backward pass, whatever the number of probes."""
    m, policy = state.model, state.policy
    engine, runner, reader = m.engine, m.runner, m.reader
    names = engine.trainable
    cols = torch.as_tensor(np.array(state.features.columns))
    w = torch.as_tensor(policy.coef / policy.scale, dtype=torch.float64)
    n = len(m.probe_tokens)
    g_y = {k: torch.zeros_like(engine.base[k], dtype=torch.float64) for k in names}
    g_f = {k: torch.zeros_like(engine.base[k], dtype=torch.float64) for k in names}
    bar = _progress.bar(n, "probe gradient", progress)
    for start in range(0, n, batch_size):
        leaves = {k: engine.base[k].detach().clone().requires_grad_(True) for k in names}
        params = {**engine.base, **leaves}
        H, y = runner.run_differentiable(m.probe_tokens[start : start + batch_size], params)
        x = reader.encode_torch(H, cols, state.features.gated)
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
        bar.update(min(batch_size, n - start))
    bar.close()
    return g_y, g_f


def _dot(a: dict, b: dict) -> float:
    return float(sum((a[n].detach().double() * b[n].detach().double()).sum() for n in a))


def gradient_baselines(state: BaseState, lr: float, pairs: pl.DataFrame | None = None,
                       probe_grads: tuple[dict, dict] | None = None, progress: bool = False) -> pl.DataFrame:
    """One row per pair (the run's, or ``pairs``): grad_cosine, concept_influence,
    behaviour_first_order."""
    g_y, g_f = probe_grads if probe_grads is not None else probe_gradients(state)
    ny = np.sqrt(_dot(g_y, g_y))
    rows = {"pair_id": [], "grad_cosine": [], "concept_influence": [], "behaviour_first_order": []}
    pairs = state.inputs.pairs if pairs is None else pairs
    bar = _progress.bar(pairs.height, "pair gradient", progress)
    for r in pairs.iter_rows(named=True):
        bar.update(1)
        g = state.model.engine.gradient_pair(chat_pair(r))
        ng = np.sqrt(_dot(g, g))
        gy = _dot(g, g_y)
        rows["pair_id"].append(r["id"])
        # query loss = −mean y, so its gradient is −g_y
        rows["grad_cosine"].append(-gy / (ng * ny) if ng > 0 and ny > 0 else 0.0)
        rows["concept_influence"].append(-lr * _dot(g, g_f))
        rows["behaviour_first_order"].append(-lr * gy)
    bar.close()
    return pl.DataFrame(rows)


def policy_direction(state: BaseState) -> np.ndarray:
    """The policy as a direction of the residual stream in SAE decoder space:
    v = Σ_k (coef_k / s_k) · W_dec[k]."""
    w = state.policy.coef / state.policy.scale
    W_dec = state.model.reader.sae.W_dec.detach().double().cpu().numpy()[np.array(state.features.columns)]
    return w @ W_dec


def mean_response_activation(state: BaseState, pair: ChatPair) -> np.ndarray:
    """Mean of the SAE's read activation over the pair's trained tokens (base weights)."""
    lm, engine = state.model.lm, state.model.engine
    t = chat_pair_tokens(lm.tokenizer, pair, engine.cfg.max_length)
    with torch.no_grad(), capture(lm.model, state.model.hook) as store:
        lm.model.get_decoder()(input_ids=torch.tensor([t.ids], device=engine.device))
    return store["h"][0, torch.tensor(t.mask)].double().mean(0).cpu().numpy()


def own_response(state: BaseState, pair: ChatPair | str, max_new_tokens: int = 32) -> str:
    """The base model's greedy answer in place of the pair's (last) trained turn, or to a prompt
    (for the projection difference)."""
    lm = state.model.lm
    pair = pair if isinstance(pair, ChatPair) else ChatPair.flat(pair, "")
    chat = pair.chat(pair.trained[-1])
    ids = torch.tensor([format_chat(lm.tokenizer, chat, f"pair '{pair.id}'")], device=state.model.engine.device)
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def with_response(pair: ChatPair, response: str) -> ChatPair:
    """The pair with its (last) trained turn's text replaced, trained on that turn alone."""
    last = pair.trained[-1]
    msgs = pair.messages[:last] + (("assistant", response),)
    return ChatPair(pair.id, msgs, (last,))


def projection_baselines(state: BaseState, pairs: pl.DataFrame | None = None, max_new_tokens: int = 32,
                         progress: bool = False) -> pl.DataFrame:
    """Concept Influence's probe-based approximations with the policy as the probe direction:
    ``vector_filter`` = ⟨mean response activation, v⟩ and ``projection_difference`` = the same
    minus that of the model's own (greedy) response to the prompt."""
    v = policy_direction(state)
    rows = {"pair_id": [], "vector_filter": [], "projection_difference": []}
    pairs = state.inputs.pairs if pairs is None else pairs
    bar = _progress.bar(pairs.height, "projection", progress)
    for r in pairs.iter_rows(named=True):
        bar.update(1)
        pair = chat_pair(r)
        vf = float(mean_response_activation(state, pair) @ v)
        own = own_response(state, pair, max_new_tokens)
        base = float(mean_response_activation(state, with_response(pair, own)) @ v) if own else 0.0
        rows["pair_id"].append(r["id"])
        rows["vector_filter"].append(vf)
        rows["projection_difference"].append(vf - base)
    bar.close()
    return pl.DataFrame(rows)
