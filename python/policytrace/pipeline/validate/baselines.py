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
from ...gradients.concept import concept_gradients
from ...gradients.projection import Whole
from ...model.chat import ChatPair, chat_pair_tokens, format_chat
from ...numeric.concepts import Concept
from ...model.sites import capture
from ..data import chat_pair
from ..stages import BaseState


def probe_gradients(state: BaseState, batch_size: int = 8, progress: bool = False) -> tuple[dict, dict]:
    """∇θ mean_j y_j and ∇θ of the policy readout, over the run's probes, at θ0, float64, per
    parameter (on the parameters' device).

    Two concepts of gradient mode's kind: the mean score (cotangent ``1/n`` on every y_j) and the
    readout (``coef_k / s_k / n`` on every x_jk), so :func:`concept_gradients` computes both,
    accumulated batch by batch (memory stays that of one small batch's backward pass)."""
    m, policy = state.model, state.policy
    engine = m.engine
    n, k = len(m.probe_tokens), len(state.features.columns)
    # (coef/s)·(1/n), the product the readout's mean backpropagates, so the sums keep their bits
    readout = np.broadcast_to((policy.coef / policy.scale) * (1.0 / n), (n, k)).copy()
    mean_y = Concept("mean_y", np.zeros((n, k)), np.full(n, 1.0 / n))
    shapes = {name: engine.base[name].shape for name in engine.trainable}
    rows = concept_gradients([mean_y, Concept("readout", readout, np.zeros(n))], Whole(shapes), engine=engine,
                             runner=m.runner, reader=m.reader, probe_tokens=m.probe_tokens,
                             columns=state.features.columns, gated=state.features.gated, batch_size=batch_size,
                             progress=progress, dtype=torch.float64)
    return _unflatten(rows[0], engine), _unflatten(rows[1], engine)


def _unflatten(row: torch.Tensor, engine) -> dict[str, torch.Tensor]:
    """A whole gradient row back to per-parameter tensors, in ``engine.trainable`` order."""
    out, off = {}, 0
    for name in engine.trainable:
        p = engine.base[name]
        out[name] = row[off:off + p.numel()].reshape(p.shape).to(p.device)
        off += p.numel()
    return out


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
