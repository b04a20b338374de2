"""Gradients of the trainable parameters read off module hooks, with the weights frozen.

The model runs with its own weights, all frozen (``requires_grad`` off), and only the input
embedding's output requires grad, so a backward pass computes activation gradients and nothing
else (Bergson's collector, HF ``enable_input_require_grads``). Forward hooks keep each trainable
module's input; a tensor hook on its output receives the output's gradient, and the parameter's
gradient is formed from the two by the module's rule (docs/design.md, "Gradient mode"):

* ``nn.Linear`` (the body's projections, LoRA's ``lora_A``/``lora_B``, the LM head):
  ``G = Σ_t g_t a_tᵀ`` (weight) and ``Σ_t g_t`` (bias);
* ``nn.Embedding``: ``G = Σ_t e_{id_t} δ_tᵀ``, a scatter of the output gradients into rows;
* any other module holding trainable parameters (RMSNorm, LayerNorm, Gemma's ``1 + w`` norm):
  the module's own vector-Jacobian product for its parameters alone (``torch.func.vjp`` of a
  functional call on the saved input), vmapped over examples when per-example gradients are
  wanted; such modules are elementwise and cheap.

A parameter used by several modules (a tied embedding and LM head) receives one *piece* per
use; the sink gets all of a parameter's pieces of one backward pass together, as soon as the
last arrived, or at :meth:`GradientHooks.flush` (called after every backward) when some use got
no gradient (e.g. the head, for a cotangent on an earlier layer's activations).

What is done with the pieces is the sink's business (:mod:`policytrace.gradients.batched`:
per-example products or projections for the pairs, sums over probes for the concepts).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigError


@dataclass
class LinearPiece:
    """A Linear use of a weight: its inputs ``a`` (…, I) and output gradients ``g`` (…, O), both
    with the batch first. ``a`` may already be projected (``a @ P_inᵀ``) when the sink asked."""

    a: torch.Tensor
    g: torch.Tensor
    projected_input: bool = False


@dataclass
class BiasPiece:
    """A Linear's bias: the output gradients ``g`` (B, …, O)."""

    g: torch.Tensor


@dataclass
class EmbeddingPiece:
    """A lookup: token ids (B, T) and the output gradients (B, T, d)."""

    ids: torch.Tensor
    g: torch.Tensor


@dataclass
class DensePiece:
    """A parameter of a small module, its gradient formed densely: (B, *shape) per example, or
    (*shape,) summed over the batch (``summed``)."""

    grad: torch.Tensor
    summed: bool


Piece = LinearPiece | BiasPiece | EmbeddingPiece | DensePiece


class Sink(Protocol):
    def project_input(self, name: str) -> torch.Tensor | None:
        """P_in (r, I) when the sink wants a weight's inputs projected in the forward hook."""

    def receive(self, name: str, pieces: list[Piece]) -> None:
        """All pieces of parameter ``name`` from one backward pass."""


@dataclass
class _Use:
    module: torch.nn.Module
    kind: str  # "weight", "bias", "embedding", "small"
    pname: str  # the attribute name in the module


@dataclass
class _Pending:
    pieces: list = field(default_factory=list)


def parameter_uses(model: torch.nn.Module, trainable: list[str]) -> dict[str, list[_Use]]:
    """For each trainable parameter name, every module attribute that holds it (by identity:
    a tied weight has two uses)."""
    by_id = {id(p): n for n, p in model.named_parameters() if n in set(trainable)}
    uses: dict[str, list[_Use]] = defaultdict(list)
    for _, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            name = by_id.get(id(p))
            if name is None:
                continue
            if isinstance(mod, torch.nn.Linear):
                kind = "weight" if pname == "weight" else "bias"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "embedding"
            else:
                kind = "small"
            if not any(u.module is mod and u.pname == pname for u in uses[name]):
                uses[name].append(_Use(mod, kind, pname))
    missing = [n for n in trainable if n not in uses]
    if missing:
        raise ConfigError(f"trainable parameters {missing[:5]} belong to no module the gradient hooks can read")
    return dict(uses)


class GradientHooks:
    """Context manager: hooks on every module using a trainable parameter, feeding ``sink``.

    ``per_example``: small modules' gradients are formed per example (vmap over the batch)
    rather than summed. While active, every input-embedding output requires grad; call
    :meth:`roots` for the leaves to differentiate with respect to."""

    def __init__(self, model: torch.nn.Module, trainable: list[str], sink: Sink, per_example: bool) -> None:
        self.model, self.sink, self.per_example = model, sink, per_example
        self.uses = parameter_uses(model, trainable)
        self._handles: list[Any] = []
        self._roots: list[torch.Tensor] = []
        self._pending: dict[str, _Pending] = {}
        self._calls: dict[str, int] = {}  # forward uses of each parameter since reset()
        self._replaying = False

    # --- registration -------------------------------------------------------------------
    def __enter__(self) -> "GradientHooks":
        modules: dict[int, tuple[torch.nn.Module, list[tuple[str, _Use]]]] = {}
        for name, uses in self.uses.items():
            for u in uses:
                modules.setdefault(id(u.module), (u.module, []))[1].append((name, u))
        embed = self.model.get_input_embeddings()
        if id(embed) not in modules:
            modules[id(embed)] = (embed, [])
        for mod, uses in modules.values():
            self._handles.append(mod.register_forward_hook(self._forward_hook(mod, uses)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._roots.clear()
        self._pending.clear()

    def roots(self) -> list[torch.Tensor]:
        """The embedding outputs of the forward passes since the last :meth:`reset`."""
        return list(self._roots)

    def reset(self) -> None:
        """Forget the roots and the pending pieces (a new forward follows)."""
        self._roots.clear()
        self._pending.clear()
        self._calls.clear()

    def flush(self) -> None:
        """Deliver what one backward pass left pending (uses that received no gradient)."""
        pending, self._pending = self._pending, {}
        for name, pend in pending.items():
            self.sink.receive(name, pend.pieces)

    # --- hooks ---------------------------------------------------------------------------
    def _forward_hook(self, mod: torch.nn.Module, uses: list[tuple[str, _Use]]):
        is_embed = mod is self.model.get_input_embeddings()

        def hook(module, inputs, output):
            if self._replaying:  # a small module's own VJP re-runs its forward: not a use
                return output
            x = inputs[0]
            if is_embed:
                output = output.detach().requires_grad_(True)
                self._roots.append(output)
            if not output.requires_grad:
                return output
            saved = [(name, u, self._saved_input(name, u, x)) for name, u in uses]
            for name, _u, _s in saved:
                self._calls[name] = self._calls.get(name, 0) + 1
            output.register_hook(lambda g, saved=saved: self._backward(module, saved, g))
            return output

        return hook

    def _saved_input(self, name: str, u: _Use, x: torch.Tensor):
        if u.kind == "weight":
            p_in = self.sink.project_input(name)
            return x.detach() @ p_in.T.to(x.dtype) if p_in is not None else x.detach()
        if u.kind in ("embedding", "small"):
            return x.detach()
        return None

    def _backward(self, module, saved, g: torch.Tensor) -> None:
        for name, u, x in saved:
            self._add(name, self._piece(module, name, u, x, g))

    def _piece(self, module, name: str, u: _Use, x, g: torch.Tensor) -> Piece:
        if u.kind == "weight":
            return LinearPiece(x, g, projected_input=self.sink.project_input(name) is not None)
        if u.kind == "bias":
            return BiasPiece(g)
        if u.kind == "embedding":
            return EmbeddingPiece(x, self._row_grads(module, x, g))
        return DensePiece(self._small_grad(module, u.pname, x, g), summed=not self.per_example)

    def _row_grads(self, module, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gradients with respect to each looked-up row. A plain lookup passes the output
        gradients on; an embedding that transforms its rows (Gemma scales them by √d) is
        re-run on a table of exactly the looked-up rows, and its VJP gives them."""
        if module.padding_idx is not None:  # that row never trains (F.embedding's backward)
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        if type(module).forward is torch.nn.Embedding.forward:
            return g
        rows = module.weight.detach()[ids.reshape(-1)]
        pos = torch.arange(rows.shape[0], device=ids.device).reshape(ids.shape)
        # The replay indexes rows by position, so the padding index (handled above) must not
        # zero position padding_idx's row.
        self._replaying, padding = True, module.padding_idx
        module.padding_idx = None
        try:
            vjp = torch.func.vjp(lambda w: torch.func.functional_call(module, {"weight": w}, (pos,)), rows)[1]
            return vjp(g)[0].reshape(g.shape)
        finally:
            self._replaying, module.padding_idx = False, padding

    def _small_grad(self, module, pname: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The module's own VJP for one parameter, holding the others fixed."""
        params = {k: v.detach() for k, v in module.named_parameters(recurse=False)}

        def out(p, xb):
            return torch.func.functional_call(module, {**params, pname: p}, (xb,))

        def vjp(xb, gb):
            return torch.func.vjp(lambda p: out(p, xb), params[pname])[1](gb)[0]

        self._replaying = True
        try:
            return torch.func.vmap(vjp)(x, g) if self.per_example else vjp(x, g)
        finally:
            self._replaying = False

    def _add(self, name: str, piece: Piece) -> None:
        pend = self._pending.setdefault(name, _Pending())
        pend.pieces.append(piece)
        if len(pend.pieces) == self._calls.get(name, 1):
            del self._pending[name]
            self.sink.receive(name, pend.pieces)


class Frozen:
    """Every parameter frozen for the duration (the backward forms activation gradients only),
    restored after."""

    def __init__(self, model) -> None:
        self.model = model
        self.saved: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)
