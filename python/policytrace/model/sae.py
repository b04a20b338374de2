"""Sparse autoencoders: loading through sae-lens and reading features.

Any SAE that sae-lens loads works (``SAE.load_from_disk`` or ``SAE.from_pretrained``; standard,
TopK, BatchTopK-as-JumpReLU, JumpReLU). A folder is checked before sae-lens sees it, so a
damaged one fails with a :class:`ConfigError` naming the file instead of a JSON or safetensors
traceback. The embedded default's own SAE is trained by :mod:`policytrace.model.sae_train`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import digest_bytes, sampled_digest
from ..errors import ConfigError
from .config import SaeCfg

WEIGHTS_FILE = "sae_weights.safetensors"


class SaeReader:
    """Features of one sae-lens SAE: ``encode`` (the SAE's own codes) and ``pre`` (encoder
    pre-activations, for the gated linearization ΔX = 1[pre(h0) > 0] ⊙ (Δh·W_enc))."""

    def __init__(self, sae: Any, device: str = "cpu") -> None:
        self.sae = sae.to(device)
        self.sae.eval()
        self.device = device
        self.d_in = int(sae.cfg.d_in)
        self.d_sae = int(sae.cfg.d_sae)

    def encode(self, H: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(H, dtype=self.sae.W_enc.dtype, device=self.device)
            return self.sae.encode(x).float().cpu().numpy()

    def pre(self, H: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(H, dtype=self.sae.W_enc.dtype, device=self.device)
            sae_in = self.sae.process_sae_in(x)
            return (sae_in @ self.sae.W_enc + self.sae.b_enc).float().cpu().numpy()

    def fvu(self, H: np.ndarray, codes: np.ndarray) -> float | None:
        """Fraction of variance of ``H`` its reconstruction from ``codes`` leaves unexplained."""
        with torch.no_grad():
            x = torch.as_tensor(H, dtype=torch.float64)
            recon = self.sae.decode(torch.as_tensor(codes, dtype=self.sae.W_dec.dtype, device=self.device))
            ss = (x - x.mean(0)).pow(2).sum()
            return float((recon.double().cpu() - x).pow(2).sum() / ss) if ss > 0 else None

    def w_enc(self, columns: np.ndarray) -> np.ndarray:
        # A copy: polars hands out read-only arrays, which torch warns about when indexing.
        index = torch.as_tensor(np.array(columns, dtype=np.int64), device=self.sae.W_enc.device)
        return self.sae.W_enc[:, index].detach().double().cpu().numpy()

    def encode_torch(self, H: torch.Tensor, columns: torch.Tensor, gated: bool) -> torch.Tensor:
        """Differentiable codes of the selected ``columns``: the SAE's own (``gated=False``) or
        the dense ReLU encoder proxy (``gated=True``)."""
        sae = self.sae
        if gated:
            pre = sae.process_sae_in(H.to(sae.W_enc.dtype)) @ sae.W_enc + sae.b_enc
            return torch.relu(pre[:, columns])
        return sae.encode(H.to(sae.W_enc.dtype))[:, columns]


def check_sae_folder(path: Path) -> dict:
    """The folder's cfg.json, after checking it and the weights file exist and agree."""
    cfg_path = path / "cfg.json"
    if not path.is_dir():
        raise ConfigError(f"sae.path '{path}' is not a folder (an sae-lens SAE folder is expected)")
    if not cfg_path.is_file():
        raise ConfigError(f"sae.path '{path}' has no cfg.json (an sae-lens SAE folder is expected)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path} is not valid JSON ({e}); the SAE folder is damaged") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("d_in"), int) or not isinstance(cfg.get("d_sae"), int):
        raise ConfigError(f"{cfg_path} has no integer `d_in` and `d_sae`; not an sae-lens SAE config")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"sae.path '{path}' has no {WEIGHTS_FILE}; the SAE folder is incomplete")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError on damaged files
        raise ConfigError(f"{weights} is not a readable safetensors file ({e}); the SAE folder is damaged") from e
    w_enc = shapes.get("W_enc")
    if w_enc is None:
        raise ConfigError(f"{weights} has no W_enc tensor; not an sae-lens SAE")
    if w_enc != (cfg["d_in"], cfg["d_sae"]):
        raise ConfigError(
            f"{cfg_path} says d_in={cfg['d_in']}, d_sae={cfg['d_sae']} but {weights.name} holds W_enc of "
            f"shape {w_enc}; the config and weights do not belong together"
        )
    return cfg


def load_sae(path: str | None = None, release: str | None = None, sae_id: str | None = None, device: str = "cpu") -> Any:
    """An sae-lens SAE from a folder, or from a release and id (needs network on first use)."""
    from sae_lens import SAE

    if path is not None:
        cfg = check_sae_folder(Path(path))
        try:
            sae = SAE.load_from_disk(path, device=device)
        except Exception as e:  # sae-lens: KeyError (architecture), RuntimeError (state dict), ...
            raise ConfigError(f"sae.path '{path}' does not load with sae-lens ({type(e).__name__}: {e}); "
                              "the SAE folder is damaged or of an architecture this sae-lens lacks") from e
        check_sae(sae, str(path), cfg)
        return sae
    if release is not None and sae_id is not None:
        out = SAE.from_pretrained(release, sae_id, device=device)
        return out[0] if isinstance(out, tuple) else out
    raise ConfigError("name an SAE: sae.path, or sae.release and sae.id")


def check_sae(sae: Any, where: str, cfg: dict | None = None) -> None:
    """Refuse an SAE that loads but cannot encode: k above d_sae, non-finite weights."""
    k = (cfg or {}).get("k", getattr(sae.cfg, "k", None))
    if isinstance(k, int) and k > int(sae.cfg.d_sae):
        raise ConfigError(f"{where}: its cfg.json says k = {k} active latents but d_sae = {sae.cfg.d_sae}")
    for name, p in sae.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"{where}: the SAE's {name} holds NaN or inf; the weights are damaged")


def sae_identity(cfg: SaeCfg) -> str:
    """What a resumed run must find again: a named folder's config and sampled weights, or the
    release and id. (The default SAE's identity is its cache key.)"""
    if cfg.path:
        folder = Path(cfg.path)
        parts = [f.name + ":" + sampled_digest(f) for f in sorted(folder.iterdir()) if f.is_file()]
        return digest_bytes("\n".join(parts).encode())
    return digest_bytes(f"release:{cfg.release}:{cfg.id}".encode())
