"""Concept gradients by hooks: one differentiable forward per probe batch shared by every
concept, the chat template's prefix run once inside the graph, and per concept one backward of
activation gradients only, whose module hooks add ``Σ_probes,t g a ᵀ`` (or its projection) into
that concept's row. A concept on the SAE's features is backpropagated from the pooled
activation, so it never reaches the layers above the SAE's.

Each concept ``c`` is the functional ``φ_c(θ) = Σ_j cx_c[j] · x_j(θ) + cy_c[j] · y_j(θ)`` of the
probe pass (x: the selected features' codes through the SAE encoder, y: the behaviour score).
The rows match :func:`policytrace.gradients.concept.concept_gradients` (the autograd route it
replaces) to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import _progress
from .batched import pack
from .hooks import BiasPiece, DensePiece, EmbeddingPiece, Frozen, GradientHooks, LinearPiece, Piece


@dataclass(frozen=True)
class ProbeSide:
    """What the concept pass runs: the model's probe runner and SAE reader, the chat-formatted
    probes, the policy's feature columns and whether codes are the gated proxy's."""

    runner: object
    reader: object
    probe_tokens: list[list[int]]
    columns: np.ndarray
    gated: bool
    layers: tuple = ()
    """More sites read in the same forwards (mediation across layers): ``(hook, reader,
    columns, gated)`` each; a concept of site ``i`` ≥ 1 is on the i-th one's codes."""


class ConceptSums:
    """Sums over probes of every concept's parameter gradient, as rows of :attr:`out` (C, D):
    whole (``projector.info["kind"] == "whole"``) or projected by the per-module factors."""

    def __init__(self, projector, n_concepts: int, dtype: torch.dtype, device) -> None:
        self.p, self.c = projector, 0
        self.whole = projector.info["kind"] == "whole"
        self.spans: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        off = 0
        for n in projector.names:
            shape = tuple(projector.shapes[n])
            k = math.prod(shape) if self.whole else (projector.r ** 2 if len(shape) == 2 else projector.r)
            self.spans[n] = (off, off + k, shape)
            off += k
        self.out = torch.zeros((n_concepts, off), dtype=dtype, device=device)

    def project_input(self, name: str) -> torch.Tensor | None:
        if self.whole or len(self.spans[name][2]) != 2:
            return None
        return self.p.factors(name)[1]

    def receive(self, name: str, pieces: list[Piece]) -> None:
        lo, hi, shape = self.spans[name]
        row = self.out[self.c, lo:hi]
        for pc in pieces:
            if self.whole:
                self._add_whole(row.view(shape), pc)
            else:
                row += self._projected(name, pc, shape).reshape(-1).to(row.dtype)

    @staticmethod
    def _add_whole(dst: torch.Tensor, pc: Piece) -> None:
        """Adds the piece's summed gradient into ``dst`` (the parameter's slice of the row) in
        place: no (O, I) temporary per module and backward, whose fresh pages (113 MB for a
        49k-token head) cost more than the product itself on a CPU."""
        if isinstance(pc, LinearPiece):
            o, i = dst.shape
            dst.addmm_(pc.g.reshape(-1, o).T.to(dst.dtype), pc.a.reshape(-1, i).to(dst.dtype))
        elif isinstance(pc, BiasPiece):
            dst += pc.g.reshape(-1, dst.shape[0]).sum(0).to(dst.dtype)
        elif isinstance(pc, EmbeddingPiece):
            dst.index_add_(0, pc.ids.reshape(-1), pc.g.reshape(-1, dst.shape[1]).to(dst.dtype))
        else:  # a small module's own VJP
            dst += pc.grad.reshape(dst.shape).to(dst.dtype)

    def _projected(self, name: str, pc: Piece, shape: tuple[int, ...]) -> torch.Tensor:
        f = [x.to(_dtype(pc)) for x in self.p.factors(name)]
        if isinstance(pc, LinearPiece):
            return (pc.g.reshape(-1, shape[0]) @ f[0].T).T @ pc.a.reshape(-1, pc.a.shape[-1])
        if isinstance(pc, BiasPiece):
            return f[0] @ pc.g.reshape(-1, shape[0]).sum(0)
        if isinstance(pc, EmbeddingPiece):
            rows = f[0].T[pc.ids.reshape(-1)]  # (tokens, r): P_out's columns at the tokens
            return rows.T @ (pc.g.reshape(-1, shape[1]) @ f[1].T)
        g = pc.grad
        return f[0] @ g @ f[1].T if len(f) == 2 else f[0] @ g.reshape(-1)


def _dtype(pc: Piece) -> torch.dtype:
    return (pc.grad if isinstance(pc, DensePiece) else pc.g).dtype


def concept_rows(model, trainable: list[str], probes: ProbeSide, cx, cy: np.ndarray, projector,
                 dtype: torch.dtype, token_budget: int = 4096, progress: bool = False,
                 sites: list[int] | None = None) -> torch.Tensor:
    """(C, D) rows: ∇θ φ_c at the model's own weights for every concept (cotangents ``cx``
    (C, n, K) on the codes, ``cy`` (C, n) on the scores), whole or projected. With
    ``probes.layers``, ``sites[c]`` says whose codes concept ``c``'s ``cx`` (then a list of
    (n, K_site) arrays) is on (0: the policy's own)."""
    n_concepts, n = cy.shape
    sites = sites or [0] * n_concepts
    device = next(model.parameters()).device
    sink = ConceptSums(projector, n_concepts, dtype, device)
    if n_concepts == 0:
        return sink.out
    x_only = [not cy[c].any() for c in range(n_concepts)]
    cols = torch.as_tensor(np.array(probes.columns, dtype=np.int64), device=device)
    more = [(hook, reader, torch.as_tensor(np.array(c, dtype=np.int64), device=device), gated)
            for hook, reader, c, gated in probes.layers]
    batches = pack([len(t) for t in probes.probe_tokens], token_budget)
    bar = _progress.bar(n, "concept probe", progress)
    with Frozen(model), GradientHooks(model, trainable, sink, per_example=False) as hooks:
        for idx in batches:
            hooks.reset()
            toks = [probes.probe_tokens[i] for i in idx]
            if more:
                Hs, y = probes.runner.run_differentiable_sites(toks, None, share_prefix=True,
                                                               sites=[m[0] for m in more])
            else:
                H, y = probes.runner.run_differentiable(toks, None, share_prefix=True)
                Hs = [H]
            xs = [probes.reader.encode_torch(Hs[0], cols, probes.gated)]
            xs += [reader.encode_torch(h, c, gated) for (_, reader, c, gated), h in zip(more, Hs[1:])]
            for c in range(n_concepts):
                sink.c = c
                outs, grads = _cotangents(xs[sites[c]], y, cx[c][idx], cy[c][idx], x_only[c])
                torch.autograd.grad(outs, hooks.roots(), grad_outputs=grads, retain_graph=c < n_concepts - 1,
                                    allow_unused=True)
                hooks.flush()
            del Hs, y, xs
            bar.update(len(idx))
    bar.close()
    return sink.out


def _cotangents(x: torch.Tensor, y: torch.Tensor, cx: np.ndarray, cy: np.ndarray, x_only: bool):
    gx = torch.as_tensor(cx, dtype=x.dtype, device=x.device)
    if x_only:
        return (x,), (gx,)
    gy = torch.as_tensor(cy, dtype=y.dtype, device=y.device)
    if not cx.any():
        return (y,), (gy,)
    return (x, y), (gx, gy)
