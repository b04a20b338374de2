"""Features a person can read: each selected SAE feature's decoder direction through the
unembedding (the logit lens) and its top-activating token contexts over any token sequences.

The logit lens of feature ``j`` is ``W_U (γ ⊙ d_j)``: the decoder row ``d_j`` scaled by the final
norm's weight ``γ`` (when the model has one; the normalization itself is skipped, it only
rescales) and projected on the output embedding ``W_U``, in float64; its largest entries are
the tokens the feature pushes the next-token distribution towards.

Contexts: every token of the given sequences is read at the SAE's site (one forward per batch,
stopping after the site's block), encoded the way the run's features are (the SAE's own codes,
or the gated proxy ReLU(pre) for ``decompose.delta_x = "gated"``), and each feature keeps its
``top`` largest activations with a window of tokens around each and the feature's activation
on every token of the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import _progress
from .sae import SaeReader
from .sites import HookSite, activation_only


def final_norm_weight(model: Any) -> torch.Tensor | None:
    """The weight of the decoder's final norm (``model.norm``, ``final_layernorm``, ...), or None."""
    decoder = model.get_decoder()
    for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        mod = getattr(decoder, name, None)
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            return w
    return None


def lens_logits(model: Any, directions: np.ndarray) -> np.ndarray:
    """(K, vocab) float64 logits of the decoder directions (K, d) through the unembedding. A
    Gemma-style norm that multiplies by (1 + γ) is read as such."""
    W_U = model.get_output_embeddings().weight.detach().double().cpu()
    d = torch.as_tensor(np.asarray(directions, dtype=np.float64))
    gamma = final_norm_weight(model)
    if gamma is not None:
        g = gamma.detach().double().cpu()
        if type(model).__name__.lower().startswith("gemma"):
            g = 1.0 + g
        d = d * g
    return (d @ W_U.T).numpy()


def logit_lens(model: Any, tokenizer: Any, directions: np.ndarray, top: int) -> tuple[list[list[str]], list[list[float]]]:
    """Per direction: its ``top`` output tokens (decoded alone) and their logits, largest first
    (ties by token id)."""
    logits = lens_logits(model, directions)
    vocab = min(logits.shape[1], len(tokenizer))
    logits = logits[:, :vocab]
    tokens, values = [], []
    for row in logits:
        idx = np.lexsort((np.arange(vocab), -row))[:top]
        tokens.append([tokenizer.decode([int(i)]) for i in idx])
        values.append([float(row[i]) for i in idx])
    return tokens, values


@dataclass(frozen=True)
class Source:
    """One token sequence contexts are read from: its kind (probe, pair, corpus), id and ids."""

    kind: str
    id: str
    ids: tuple[int, ...]


def feature_activations(model: Any, reader: SaeReader, site: HookSite, columns: np.ndarray, gated: bool,
                        seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
                        progress: bool = False) -> list[np.ndarray]:
    """Per sequence: (T, K) activations of the selected ``columns`` at every token."""
    device = next(model.parameters()).device
    cols = np.asarray(columns, dtype=np.int64)
    out: list[np.ndarray] = [np.zeros((0, len(cols)))] * len(seqs)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    bar = _progress.bar(len(seqs), "feature context sequence", progress)
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            idx = [int(i) for i in order[start : start + batch_size] if len(seqs[int(i)])]
            if not idx:
                continue
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(list(seqs[i]))
                mask[r, : len(seqs[i])] = 1
            h = activation_only(model, site, ids.to(device), mask.to(device)).float().cpu().numpy()
            for r, i in enumerate(idx):
                rows = h[r, : len(seqs[i])]
                acts = np.maximum(reader.pre(rows)[:, cols], 0.0) if gated else reader.encode(rows)[:, cols]
                out[i] = acts.astype(np.float64)
            bar.update(len(idx))
    bar.close()
    return out


def top_contexts(acts: Sequence[np.ndarray], sources: Sequence[Source], feature_ids: Sequence[int], top: int,
                 window: int, pieces: Any) -> dict[str, list]:
    """Each feature's ``top`` largest positive activations over all tokens of all sources (ties:
    source order, then position), with ``window`` tokens either side: the columns of
    ``feature_contexts.parquet``. ``pieces(ids)`` gives a sequence's tokens as text."""
    cols: dict[str, list] = {k: [] for k in ("feature_id", "rank", "source", "item_id", "position", "token",
                                             "activation", "window_tokens", "window_activations", "window_start")}
    if not acts:
        return cols
    seq_of = np.concatenate([np.full(len(a), s, dtype=np.int64) for s, a in enumerate(acts)])
    pos_of = np.concatenate([np.arange(len(a), dtype=np.int64) for a in acts])
    A = np.concatenate(acts) if len(seq_of) else np.zeros((0, len(feature_ids)))
    text_cache: dict[int, list[str]] = {}
    for j, fid in enumerate(feature_ids):
        col = A[:, j]
        keep = np.flatnonzero(col > 0)
        chosen = keep[np.lexsort((pos_of[keep], seq_of[keep], -col[keep]))][:top]
        for rank, row in enumerate(chosen, start=1):
            s, p = int(seq_of[row]), int(pos_of[row])
            if s not in text_cache:
                text_cache[s] = pieces(sources[s].ids)
            lo, hi = max(0, p - window), min(len(acts[s]), p + window + 1)
            cols["feature_id"].append(int(fid))
            cols["rank"].append(rank)
            cols["source"].append(sources[s].kind)
            cols["item_id"].append(sources[s].id)
            cols["position"].append(p)
            cols["token"].append(text_cache[s][p])
            cols["activation"].append(float(col[row]))
            cols["window_tokens"].append(text_cache[s][lo:hi])
            cols["window_activations"].append([float(v) for v in acts[s][lo:hi, j]])
            cols["window_start"].append(lo)
    return cols
