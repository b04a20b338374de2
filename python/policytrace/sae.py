"""Sparse autoencoders: loading through sae-lens, reading features, and the embedded default.

Any SAE that sae-lens loads works (``SAE.load_from_disk`` or ``SAE.from_pretrained``; standard,
TopK, BatchTopK-as-JumpReLU, JumpReLU). No public SAE exists for the embedded SmolLM2 default,
so :func:`train_topk_sae` trains a small TopK SAE on its residual stream from text that ships
offline, saves it in sae-lens' on-disk format and caches it under a hash of everything that went
into it (model, layer, corpus, sizes, seed, steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError


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
        import torch

        with torch.no_grad():
            x = torch.as_tensor(H, dtype=self.sae.W_enc.dtype, device=self.device)
            return self.sae.encode(x).float().cpu().numpy()

    def pre(self, H: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.as_tensor(H, dtype=self.sae.W_enc.dtype, device=self.device)
            sae_in = self.sae.process_sae_in(x)
            return (sae_in @ self.sae.W_enc + self.sae.b_enc).float().cpu().numpy()

    def w_enc(self, columns: np.ndarray) -> np.ndarray:
        return self.sae.W_enc[:, columns].detach().double().cpu().numpy()


def load_sae(path: str | None = None, release: str | None = None, sae_id: str | None = None, device: str = "cpu") -> Any:
    from sae_lens import SAE

    if path is not None:
        if not (Path(path) / "cfg.json").exists():
            raise ConfigError(f"sae.path '{path}' has no cfg.json (an sae-lens SAE folder is expected)")
        return SAE.load_from_disk(path, device=device)
    if release is not None and sae_id is not None:
        out = SAE.from_pretrained(release, sae_id, device=device)
        return out[0] if isinstance(out, tuple) else out
    raise ConfigError("name an SAE: sae.path, or sae.release and sae.id")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the embedded default SAE (every field enters the cache key)."""

    d_sae: int = 2304
    k: int = 32
    steps: int = 600
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    max_tokens: int = 30_000


def _key(model_name: str, layer: int, corpus_digest: str, cfg: TrainConfig) -> str:
    blob = json.dumps({"model": model_name, "layer": layer, "corpus": corpus_digest, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corpus_texts(prompts: Sequence[str], n_doc: int = 400) -> tuple[list[str], list[str]]:
    """Chat-formatted requests (the given prompts) and generic English from the standard
    library's docstrings, both available offline."""
    import builtins
    import collections
    import json as _json
    import pathlib
    import string
    import textwrap

    docs: list[str] = []
    for mod in (builtins, collections, _json, pathlib, string, textwrap, os, shutil, tempfile, hashlib):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc.split()) >= 12:
                docs.append(" ".join(doc.split())[:600])
    docs = sorted(set(docs))[:n_doc]
    return list(prompts), docs


def collect_activations(lm, layer: int, chats: Sequence[str], docs: Sequence[str], max_tokens: int, batch_size: int = 8,
                        site: str = "resid_post") -> np.ndarray:
    """Residual-stream vectors after block ``layer`` at every token of the corpus."""
    import torch

    from .probe import format_prompt

    tok, model = lm.tokenizer, lm.model
    seqs = [format_prompt(tok, c) for c in chats] + [tok(d, add_special_tokens=False)["input_ids"][:128] for d in docs]
    out, total = [], 0
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            T = max(len(s) for s in batch)
            ids = torch.full((len(batch), T), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(batch):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            h = _block_output_only(model, layer, ids, mask, site)
            h = h[mask.bool()].float().cpu().numpy()
            out.append(h)
            total += len(h)
            if total >= max_tokens:
                break
    return np.concatenate(out)[:max_tokens]


class _Stop(Exception):
    pass


def _block_output_only(model, layer: int, ids, mask, site: str = "resid_post"):
    """Run the decoder only until the activation at (``layer``, ``site``) is read (the blocks
    above cannot change it)."""
    from .model import capture_block_output, decoder_layers

    def stop(*_args, **_kwargs):
        raise _Stop

    with capture_block_output(model, layer, site) as store:
        handle = decoder_layers(model)[layer].register_forward_hook(stop)
        try:
            model.get_decoder()(input_ids=ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            handle.remove()
    return store["h"]


def train_topk_sae(acts: np.ndarray, cfg: TrainConfig, model_name: str, hook_name: str) -> Any:
    """A TopK SAE (sae-lens ``TopKSAE``) fitted to ``acts`` with Adam on the reconstruction
    loss; decoder rows kept at unit norm; deterministic for a seed on CPU."""
    import torch
    from sae_lens.saes import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.as_tensor(acts, dtype=torch.float32)
    d_in = X.shape[1]
    b_dec = X.mean(0)
    W_dec = torch.randn(cfg.d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": torch.nn.Parameter(W_dec.T.clone()),
        "b_enc": torch.nn.Parameter(torch.zeros(cfg.d_sae)),
        "W_dec": torch.nn.Parameter(W_dec),
        "b_dec": torch.nn.Parameter(b_dec.clone()),
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    n = X.shape[0]
    scale = X.sub(b_dec).pow(2).sum(1).mean()
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        x = X[idx]
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        top = torch.topk(pre, cfg.k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        recon = codes @ params["W_dec"] + params["b_dec"]
        loss = (recon - x).pow(2).sum(1).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"].div_(params["W_dec"].norm(dim=1, keepdim=True))
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=d_in,
            d_sae=cfg.d_sae,
            k=cfg.k,
            metadata=SAEMetadata(model_name=model_name, hook_name=hook_name),
        )
    )
    with torch.no_grad():
        for name, p in params.items():
            getattr(sae, name).copy_(p.detach())
    return sae


def sae_quality(sae: Any, acts: np.ndarray) -> dict:
    """Fraction of variance unexplained, mean L0, dead-latent fraction on ``acts``."""
    import torch

    with torch.no_grad():
        x = torch.as_tensor(acts, dtype=torch.float32)
        codes = sae.encode(x)
        recon = sae.decode(codes)
        fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((codes != 0).float().sum(1).mean())
        dead = float(((codes != 0).sum(0) == 0).float().mean())
    return {"fvu": fvu, "l0": l0, "dead_fraction": dead, "n_tokens": int(len(acts))}


def spliced_loss_delta(lm, sae: Any, layer: int, texts: Sequence[str]) -> dict:
    """Next-token loss with the block output replaced by its SAE reconstruction, minus the
    clean loss (the usual 'CE loss increase' of SAE evaluations)."""
    import torch

    from .model import decoder_layers

    tok, model = lm.tokenizer, lm.model
    layers = decoder_layers(model)

    def splice(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        r = sae.decode(sae.encode(h.float())).to(h.dtype)
        return (r,) + tuple(out[1:]) if isinstance(out, tuple) else r

    clean = spliced = count = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:128]])
            if ids.shape[1] < 2:
                continue
            base = model(ids, labels=ids).loss.item()
            handle = layers[layer].register_forward_hook(splice)
            try:
                sp_ = model(ids, labels=ids).loss.item()
            finally:
                handle.remove()
            clean += base
            spliced += sp_
            count += 1
    return {"ce_clean": clean / count, "ce_spliced": spliced / count, "ce_delta": (spliced - clean) / count}


def default_sae(lm, layer: int, prompts: Sequence[str], cache_dir: Path, cfg: TrainConfig, log=print,
                site: str = "resid_post") -> tuple[Path, dict]:
    """The cached default SAE folder (trained on first use) and its quality report."""
    chats, docs = corpus_texts(prompts)
    digest = hashlib.sha256(json.dumps([chats, docs]).encode()).hexdigest()[:16]
    key = _key(lm.name, layer if site == "resid_post" else f"{layer}.{site}", digest, cfg)
    folder = Path(cache_dir) / f"sae-{key}"
    report_path = folder / "quality.json"
    if report_path.exists():
        return folder, json.loads(report_path.read_text())
    log(f"training the default TopK SAE (layer {layer}, {cfg.d_sae} latents, k={cfg.k}); cached at {folder}")
    import torch

    torch.manual_seed(cfg.seed)
    acts = collect_activations(lm, layer, chats, docs, cfg.max_tokens, site=site)
    hook = f"model.layers.{layer}" + {"resid_post": "", "resid_pre": ".input", "attn_out": ".self_attn", "mlp_out": ".mlp"}[site]
    sae = train_topk_sae(acts, cfg, lm.name, hook)
    quality = sae_quality(sae, acts) | spliced_loss_delta(lm, sae, layer, docs[:24]) | {"config": asdict(cfg), "hook": hook}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".sae-"))
    try:
        sae.save_model(str(tmp))
        (tmp / "quality.json").write_text(json.dumps(quality, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, quality
