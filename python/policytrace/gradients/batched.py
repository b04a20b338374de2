"""Per-example gradients of many pairs in one backward pass (gradient mode's pair side).

Pairs are packed into length-bucketed batches under a token budget (Bergson's rule: sort by
length, longest first, and fill while ``longest · count ≤ budget``), right-padded, and run once
through the model with its weights frozen. Each pair's loss is the mean cross-entropy over its
trained tokens, and the batch's loss is the *sum* of the pairs' losses, so every pair's output
gradients are exactly those of its own solo run (causal attention and right padding: no real
token sees a pad; pads carry no loss). The LM head runs only on the trained positions.

:mod:`policytrace.gradients.hooks` turns the backward pass into per-parameter *pieces*; the
sinks here reduce them per example without ever holding a dense per-example gradient of the
whole model:

* :class:`WholeProducts` — ``⟨G_c, Δθ_i⟩`` for every concept ``c``: for SGD per module either
  the per-example gradient is formed (``Σ_t g_t a_tᵀ``, then one GEMM with the concept block) or
  the "ghost" product ``Σ_t g_tᵀ G_c a_t`` is taken, whichever the FLOP count says is cheaper
  (fixed by shapes, so the route and the bits are the same on every run); Adam's first step
  ``g / (|g| + ε)`` is elementwise, so its per-example gradient is always formed (in chunks of
  examples for the large embedding);
* :class:`Projections` — the per-module projection ``P_out G P_inᵀ`` (r × r), for SGD from the
  projected inputs and output gradients ``Σ_t (P_out g_t)(P_in a_t)ᵀ`` without the O × I matrix;
  for Adam from the formed, normalized gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.functional import upcast
from ..model.update import ADAM_EPS
from .hooks import BiasPiece, DensePiece, EmbeddingPiece, Frozen, GradientHooks, LinearPiece, Piece

# Bytes of per-example gradients formed at once (the tied embedding is V x d per example).
CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class TrainExample:
    """One pair as the model sees it: token ids and, per token, whether it is trained on (its
    prediction from the previous position enters the loss). Today: the response's tokens."""

    ids: tuple[int, ...]
    trained: tuple[bool, ...]

    @classmethod
    def from_start(cls, ids: list[int], start: int) -> "TrainExample":
        return cls(tuple(ids), tuple(t >= start for t in range(len(ids))))

    def __len__(self) -> int:
        return len(self.ids)


def pack(lengths: list[int], token_budget: int, max_batch: int = 0) -> list[list[int]]:
    """Batches of indices into ``lengths``, longest first, each with ``max length · size ≤
    token_budget`` (a pair longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur is not None and lengths[cur[0]] * (len(cur) + 1) <= token_budget and (not max_batch or len(cur) < max_batch):
            cur.append(i)
        else:
            batches.append([i])
    return batches


def batch_loss(model, examples: list[TrainExample], pad_id: int, device, coef=None) -> torch.Tensor:
    """Σ over examples of each one's mean cross-entropy on its trained tokens, times ``coef[b]``
    when given (the fine-tune's loss coefficients; one padded batch, right padding, causal
    attention: no real token sees a pad)."""
    B, T = len(examples), max(len(e) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e)] = torch.tensor(e.ids)
    pos = [[t - 1 for t in range(1, len(e)) if e.trained[t]] for e in examples]
    R = max(len(p) for p in pos)
    rows = torch.zeros((B, R), dtype=torch.long)
    targets = torch.zeros((B, R), dtype=torch.long)
    weight = torch.zeros((B, R), dtype=torch.float64)
    for b, (e, p) in enumerate(zip(examples, pos)):
        rows[b, : len(p)] = torch.tensor(p)
        targets[b, : len(p)] = torch.tensor([e.ids[t + 1] for t in p])
        weight[b, : len(p)] = (1.0 if coef is None else float(coef[b])) / len(p)
    ids, rows, targets = ids.to(device), rows.to(device), targets.to(device)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    picked = hidden.gather(1, rows[..., None].expand(B, R, hidden.shape[-1]))
    logits = upcast(model.get_output_embeddings()(picked))
    ce = torch.nn.functional.cross_entropy(logits.reshape(B * R, -1), targets.reshape(-1), reduction="none")
    return (ce.reshape(B, R) * weight.to(device=ce.device, dtype=ce.dtype)).sum()


def per_example(model, trainable: list[str], sink, examples: list[TrainExample], pad_id: int, device) -> None:
    """One forward and one backward over the batch; ``sink`` receives every parameter's pieces."""
    with Frozen(model), GradientHooks(model, trainable, sink, per_example=True) as hooks:
        loss = batch_loss(model, examples, pad_id, device)
        torch.autograd.grad(loss, hooks.roots())
        hooks.flush()


# --- per-example gradients from pieces ----------------------------------------------------


def dense_grad(pieces: list[Piece], shape: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    """The per-example gradient of examples ``lo:hi`` formed densely, (hi - lo, *shape)."""
    out = None
    for pc in pieces:
        if isinstance(pc, LinearPiece):
            part = torch.einsum("b...o,b...i->boi", pc.g[lo:hi], pc.a[lo:hi])
        elif isinstance(pc, BiasPiece):
            part = pc.g[lo:hi].reshape(hi - lo, -1, pc.g.shape[-1]).sum(1)
        elif isinstance(pc, EmbeddingPiece):
            part = torch.zeros((hi - lo, *shape), dtype=pc.g.dtype, device=pc.g.device)
            for b in range(lo, hi):
                part[b - lo].index_add_(0, pc.ids[b].reshape(-1), pc.g[b].reshape(-1, shape[-1]))
        else:
            part = pc.grad[lo:hi]
        out = part if out is None else out + part.to(out.dtype)
    return out


def chunks(n_examples: int, shape: tuple[int, ...], itemsize: int) -> list[tuple[int, int]]:
    per = max(1, CHUNK_BYTES // max(1, math.prod(shape) * itemsize))
    return [(lo, min(lo + per, n_examples)) for lo in range(0, n_examples, per)]


def adam_step(g: torch.Tensor) -> torch.Tensor:
    """Adam's first step from zero moments, before −lr: ``g / (|g| + ε)`` (bias-corrected)."""
    return g / (g.abs() + ADAM_EPS)


def n_examples(pieces: list[Piece]) -> int:
    pc = pieces[0]
    return (pc.grad if isinstance(pc, DensePiece) else pc.g).shape[0]


# --- sinks ---------------------------------------------------------------------------------


class WholeProducts:
    """Per example, ``−lr · ⟨G_c, step(G_i)⟩`` for every concept row of ``concepts`` (C, D),
    flattened in ``names`` order; result (B, C) float64 in :attr:`out`."""

    def __init__(self, concepts: torch.Tensor, names: list[str], shapes: dict[str, tuple[int, ...]],
                 optimizer: str, lr: float, batch: int) -> None:
        self.optimizer, self.lr, self.shapes = optimizer, lr, shapes
        self.blocks: dict[str, torch.Tensor] = {}
        off = 0
        for n in names:
            k = math.prod(shapes[n])
            self.blocks[n] = concepts[:, off:off + k]
            off += k
        if off != concepts.shape[1]:
            raise ValueError(f"concept gradients have {concepts.shape[1]} columns, the parameters {off}")
        self.out = torch.zeros((batch, concepts.shape[0]), dtype=torch.float64, device=concepts.device)
        self._ws: torch.Tensor | None = None

    def project_input(self, name: str) -> None:
        return None

    def receive(self, name: str, pieces: list[Piece]) -> None:
        block = self.blocks[name]
        if self.optimizer == "adam":
            self._formed(name, pieces, block, adam_step)
            return
        for pc in pieces:
            self.out += self._sgd(pc, block, self.shapes[name]).double()

    def _formed(self, name: str, pieces: list[Piece], block: torch.Tensor, step) -> None:
        shape = self.shapes[name]
        for lo, hi in chunks(n_examples(pieces), shape, block.element_size()):
            g = step(dense_grad(pieces, shape, lo, hi))
            self.out[lo:hi] += (g.reshape(hi - lo, -1).to(block.dtype) @ block.T).double()

    def _sgd(self, pc: Piece, block: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        c = block.shape[0]
        if isinstance(pc, LinearPiece):
            g, a = pc.g.reshape(pc.g.shape[0], -1, pc.g.shape[-1]), pc.a.reshape(pc.a.shape[0], -1, pc.a.shape[-1])
            w = block.reshape(c, *shape).to(g.dtype)
            if ghost_is_cheaper(g.shape[0], g.shape[1], shape[0], shape[1], c):
                return torch.einsum("btco,bto->bc", (a @ w.reshape(c * shape[0], shape[1]).T).unflatten(-1, (c, shape[0])), g)
            out = torch.zeros((g.shape[0], c), dtype=g.dtype, device=g.device)
            for lo, hi in chunks(g.shape[0], shape, g.element_size()):
                m = torch.bmm(g[lo:hi].transpose(1, 2), a[lo:hi], out=self._workspace((hi - lo, *shape), g))
                out[lo:hi] = m.reshape(hi - lo, -1) @ w.reshape(c, -1).T
            return out
        if isinstance(pc, BiasPiece):
            gs = pc.g.reshape(pc.g.shape[0], -1, pc.g.shape[-1]).sum(1)
            return gs @ block.to(gs.dtype).T
        if isinstance(pc, EmbeddingPiece):
            rows = block.reshape(c, *shape)[:, pc.ids]  # (C, B, T, d): the concepts at the pair's tokens
            return torch.einsum("cbtd,btd->bc", rows.to(pc.g.dtype), pc.g)
        return pc.grad.reshape(pc.grad.shape[0], -1) @ block.to(pc.grad.dtype).T

    def _workspace(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """One buffer for every chunk's per-example gradients, reused across modules and
        batches: a fresh (up to CHUNK_BYTES) tensor per module costs its pages' first touch,
        which on a CPU took longer than forming the gradients in it."""
        n = math.prod(shape)
        ws = self._ws
        if ws is None or ws.numel() < n or ws.dtype != like.dtype or ws.device != like.device:
            ws = self._ws = torch.empty(max(n, CHUNK_BYTES // like.element_size()), dtype=like.dtype, device=like.device)
        return ws[:n].view(shape)

    def result(self) -> torch.Tensor:
        return -self.lr * self.out


def ghost_is_cheaper(b: int, t: int, o: int, i: int, c: int) -> bool:
    """dattri-llm's router for ⟨G_c, Σ_t g_t a_tᵀ⟩: forming the gradient costs b·t·o·i + b·c·o·i
    multiply-adds, the ghost product b·t·c·o·i (cheaper only when t or c is about 1)."""
    return b * t * c * o * i < b * t * o * i + b * c * o * i


class Projections:
    """Per example, ``−lr · P(step(G_i))`` by the per-module factors of ``projector`` (a
    :class:`~policytrace.gradients.projection.Factored`); result (B, D) in :attr:`out`."""

    def __init__(self, projector, optimizer: str, lr: float, batch: int, dtype: torch.dtype, device) -> None:
        self.p, self.optimizer, self.lr = projector, optimizer, lr
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for n in projector.names:
            k = projector.r * projector.r if len(projector.shapes[n]) == 2 else projector.r
            self.offsets[n] = (off, off + k)
            off += k
        self.out = torch.zeros((batch, off), dtype=dtype, device=device)

    def project_input(self, name: str) -> torch.Tensor | None:
        if self.optimizer == "adam" or len(self.p.shapes[name]) != 2:
            return None
        return self.p.factors(name)[1]

    def receive(self, name: str, pieces: list[Piece]) -> None:
        lo_c, hi_c = self.offsets[name]
        if self.optimizer == "adam":
            shape = self.p.shapes[name]
            for lo, hi in chunks(n_examples(pieces), shape, self.out.element_size()):
                self.out[lo:hi, lo_c:hi_c] += self._project(name, adam_step(dense_grad(pieces, shape, lo, hi)))
            return
        for pc in pieces:
            self.out[:, lo_c:hi_c] += self._sgd(name, pc)

    def _project(self, name: str, g: torch.Tensor) -> torch.Tensor:
        f = [x.to(g.dtype) for x in self.p.factors(name)]
        if len(f) == 2:
            return (f[0] @ g @ f[1].T).reshape(g.shape[0], -1)
        return g.reshape(g.shape[0], -1) @ f[0].T

    def _sgd(self, name: str, pc: Piece) -> torch.Tensor:
        f = self.p.factors(name)
        if isinstance(pc, LinearPiece):
            g = pc.g.reshape(pc.g.shape[0], -1, pc.g.shape[-1])
            a = pc.a.reshape(pc.a.shape[0], -1, pc.a.shape[-1])
            g_r = g @ f[0].T.to(g.dtype)
            a_r = a if pc.projected_input else a @ f[1].T.to(a.dtype)
            return torch.einsum("btr,bts->brs", g_r, a_r).reshape(g.shape[0], -1)
        if isinstance(pc, BiasPiece):
            gs = pc.g.reshape(pc.g.shape[0], -1, pc.g.shape[-1]).sum(1)
            return gs @ f[0].T.to(gs.dtype)
        if isinstance(pc, EmbeddingPiece):
            rows = f[0].T.to(pc.g.dtype)[pc.ids]  # (B, T, r): P_out's columns at the tokens
            return torch.einsum("btr,bts->brs", rows, pc.g @ f[1].T.to(pc.g.dtype)).reshape(pc.g.shape[0], -1)
        return self._project(name, pc.grad)

    def result(self) -> torch.Tensor:
        return -self.lr * self.out
