"""Running a model with other weights, and the few transformers calls whose spelling changed.

:class:`Functional` runs any function of the model (its decoder, its head) while
``torch.func.functional_call`` has swapped in another set of weights: the probe pass, the
update engine and the gradient code share it, and the model's own parameters are never
written. :func:`decoder_call` passes a KV cache under the keyword the installed transformers
expects (``cache`` from 5.24; ``past_key_values`` before), so no deprecation warning is raised
and both spellings of the library work.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch


class _Swap(torch.nn.Module):
    """A module whose ``forward(fn, *args)`` runs ``fn``: functional_call swaps the wrapped
    model's parameters (tied weights follow their tie) for the duration of that call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, fn: Callable, *args):
        return fn(*args)


class Functional:
    """``call(params, fn, *args)``: ``fn(*args)`` with the model's weights replaced by ``params``
    (a name → tensor dict covering some or all parameters; ``None`` = the model's own)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._swap = _Swap(model)

    def call(self, params: dict | None, fn: Callable, *args):
        if params is None:
            return fn(*args)
        return torch.func.functional_call(self._swap, {f"m.{k}": v for k, v in params.items()}, (fn, *args))


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Probabilities in at least float32 (half-precision log-softmax loses the tail), and in
    float64 when the model runs in float64."""
    return t if t.dtype == torch.float64 else t.float()


_CACHE_KW: dict[type, str] = {}


def _cache_keyword(decoder: torch.nn.Module) -> str:
    cls = type(decoder)
    if cls not in _CACHE_KW:
        params = inspect.signature(decoder.forward).parameters
        _CACHE_KW[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW[cls]


def decoder_call(decoder: torch.nn.Module, ids, mask, pos, cache: Any = None, use_cache: bool = True):
    """The decoder's last hidden state and its KV cache (``None`` unless ``use_cache``)."""
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                  **{_cache_keyword(decoder): cache})
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.last_hidden_state, new_cache
