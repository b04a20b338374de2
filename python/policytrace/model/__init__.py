"""Layer 2, the PyTorch side: loading a model, hook sites, the probe pass, the per-pair update,
SAE loading and the default SAE's training (the ``[model]`` extra). See docs/design.md.

Names are imported on first use, so ``policytrace.model.config`` (the configuration tables)
loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoadedModel": "loading",
    "load_model": "loading",
    "load_model_cfg": "loading",
    "default_model_location": "loading",
    "HookSite": "sites",
    "capture": "sites",
    "capture_block_output": "sites",
    "decoder_layers": "sites",
    "ProbeRunner": "probe",
    "TargetSet": "probe",
    "encode_prompts": "chat",
    "format_prompt": "chat",
    "pair_tokens": "chat",
    "ChatPair": "chat",
    "PairTokens": "chat",
    "chat_pair_tokens": "chat",
    "format_chat": "chat",
    "token_pieces": "chat",
    "UpdateEngine": "update",
    "SaeReader": "sae",
    "load_sae": "sae",
    "default_sae": "sae_train",
    "Functional": "functional",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
