"""Hook sites: where in a decoder the SAE reads its activation, as one table.

``resid_post`` is the block's own output, the residual stream after it (``hidden_states[l + 1]``
of transformers, not ``hidden_states[l]``: the off-by-one the SMDA release warns about);
``resid_pre`` the block's input; ``attn_out`` / ``mlp_out`` what the attention / MLP
sub-module adds to the stream. :func:`capture` records the activation during any forward;
:func:`hook_name` is sae-lens' name for the same place.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..errors import ConfigError, InvalidValueError
from .config import SITES

# site -> (sub-module attribute names tried in order, suffix of sae-lens' hook name)
_TABLE: dict[str, tuple[tuple[str, ...], str]] = {
    "resid_post": ((), ""),
    "resid_pre": ((), ".input"),
    "attn_out": (("self_attn", "attention", "attn"), ".self_attn"),
    "mlp_out": (("mlp", "feed_forward"), ".mlp"),
}


@dataclass(frozen=True)
class HookSite:
    """One activation of a decoder: block ``layer`` at ``site``."""

    layer: int
    site: str = "resid_post"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ConfigError(f"sae.site must be one of {SITES}, got '{self.site}'")

    @property
    def hook_name(self) -> str:
        """sae-lens' module path for this site on an HF Llama-style model."""
        return f"model.layers.{self.layer}{_TABLE[self.site][1]}"

    @property
    def cache_tag(self) -> int | str:
        """The site's part of the default SAE's cache key (the layer alone for resid_post, so
        keys of earlier versions stay valid)."""
        return self.layer if self.site == "resid_post" else f"{self.layer}.{self.site}"


def decoder_layers(model) -> Any:
    """The list of decoder blocks of any HF decoder with a ``layers`` (or ``h``) list."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for path in ("model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and (n_layers is None or len(obj) == n_layers):
            return obj
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers:
            return mod
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}")


def block(model, site: HookSite):
    layers = decoder_layers(model)
    if not 0 <= site.layer < len(layers):
        raise InvalidValueError(f"sae.layer = {site.layer} is outside 0..{len(layers) - 1} for this model")
    return layers[site.layer]


def site_module(model, site: HookSite):
    """The module whose output (or, for resid_pre, input) is the site's activation."""
    blk = block(model, site)
    names = _TABLE[site.site][0]
    if not names:
        return blk
    for name in names:
        mod = getattr(blk, name, None)
        if mod is not None:
            return mod
    raise ConfigError(f"sae.site = '{site.site}': block {type(blk).__name__} has none of {names}")


def _register(model, site: HookSite, store: dict, key):
    module = site_module(model, site)

    def hook(_module, _inputs, output):
        store[key] = output[0] if isinstance(output, tuple) else output

    def pre_hook(_module, args, kwargs):
        store[key] = args[0] if args else kwargs["hidden_states"]

    if site.site == "resid_pre":
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return module.register_forward_hook(hook)


@contextmanager
def capture(model, site: HookSite) -> Iterator[dict]:
    """Record the site's activation of the next forward passes into ``store["h"]``."""
    store: dict = {}
    handle = _register(model, site, store, "h")
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def capture_many(model, sites: "tuple[HookSite, ...] | list[HookSite]") -> Iterator[dict]:
    """Record several sites' activations of the next forward passes, ``store[i]`` for
    ``sites[i]`` (one forward reads them all)."""
    store: dict = {}
    handles = []
    try:
        for i, site in enumerate(sites):
            handles.append(_register(model, site, store, i))
        yield store
    finally:
        for h in handles:
            h.remove()


def capture_block_output(model, layer: int, site: str = "resid_post"):
    """:func:`capture` by layer and site name (the earlier signature)."""
    return capture(model, HookSite(layer, site))


class _Stop(Exception):
    pass


def activation_only(model, site: HookSite, ids, mask):
    """Run the decoder only until the site's activation is read (the blocks above cannot
    change it): the SAE-training corpus pass costs a fraction of a full forward."""

    def stop(*_args, **_kwargs):
        raise _Stop

    with capture(model, site) as store:
        handle = block(model, site).register_forward_hook(stop)
        try:
            model.get_decoder()(input_ids=ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            handle.remove()
    return store["h"]
