"""The embedded default's SAE: a small TopK SAE trained on the model's own activations.

No public SAE exists for the embedded SmolLM2 default, so :func:`default_sae` trains one on
the activations at the SAE's hook site over a fixed offline corpus: the behaviour's own
chat-formatted prompts plus generic English (``data/sae_corpus_docs_v1.jsonl``: 306
docstrings of Python 3.11's standard library, frozen as a versioned file so that the corpus
never depends on the running process). It is saved in sae-lens' on-disk format and cached
under a hash of everything that went into it (model, site, corpus, sizes, seed, steps), so a
notebook and the command line train and reuse the same SAE.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import _progress
from .._files import make_temp_dir, remove_stale_temporaries, write_atomic
from .chat import format_prompt
from .config import SaeCfg
from .loading import LoadedModel
from .sites import HookSite, activation_only, block

CORPUS_FILE = "sae_corpus_docs_v1.jsonl"

# Fixed training settings of the default SAE (not in the config; every one enters the cache key).
BATCH_SIZE = 1024
LR = 1e-3
MAX_TOKENS = 30_000


@dataclass(frozen=True)
class TrainSpec:
    """Everything the trained weights depend on besides model, site and corpus."""

    d_sae: int
    k: int
    steps: int
    seed: int
    batch_size: int = BATCH_SIZE
    lr: float = LR
    max_tokens: int = MAX_TOKENS

    @classmethod
    def from_config(cls, cfg: SaeCfg) -> "TrainSpec":
        return cls(d_sae=cfg.train_d_sae, k=cfg.train_k, steps=cfg.train_steps, seed=cfg.train_seed)

    def key_fields(self) -> dict:
        # The order of the cache key's fields (kept from the first release so caches stay valid).
        return {"d_sae": self.d_sae, "k": self.k, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed, "max_tokens": self.max_tokens}


def generic_docs() -> list[str]:
    """The shipped generic-English part of the corpus."""
    path = resources.files("policytrace.model").joinpath("data", CORPUS_FILE)
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_texts(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Chat-formatted requests (the given prompts) and the shipped generic English."""
    return list(prompts), generic_docs()


def cache_key(model_name: str, site: HookSite, chats: Sequence[str], docs: Sequence[str], spec: TrainSpec) -> str:
    corpus = hashlib.sha256(json.dumps([list(chats), list(docs)]).encode()).hexdigest()[:16]
    blob = json.dumps({"model": model_name, "layer": site.cache_tag, "corpus": corpus, **spec.key_fields()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def collect_activations(lm: LoadedModel, site: HookSite, chats: Sequence[str], docs: Sequence[str],
                        max_tokens: int, batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """Activations at ``site`` at every token of the corpus, up to ``max_tokens``."""
    tok, model = lm.tokenizer, lm.model
    seqs = [format_prompt(tok, c) for c in chats] + [tok(d, add_special_tokens=False)["input_ids"][:128] for d in docs]
    out, total = [], 0
    bar = _progress.bar(max_tokens, "activation token", progress, unit="tok")
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            T = max(len(s) for s in batch)
            ids = torch.full((len(batch), T), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(batch):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            h = activation_only(model, site, ids.to(device), mask.to(device))
            h = h[mask.to(device).bool()].float().cpu().numpy()
            out.append(h)
            bar.update(min(len(h), max_tokens - total))
            total += len(h)
            if total >= max_tokens:
                break
    bar.close()
    return np.concatenate(out)[:max_tokens]


def train_topk_sae(acts: np.ndarray, spec: TrainSpec, model_name: str, hook_name: str, progress: bool = False) -> Any:
    """A TopK SAE (sae-lens ``TopKSAE``) fitted to ``acts`` with Adam on the reconstruction
    loss; decoder rows kept at unit norm; deterministic for a seed on CPU."""
    from sae_lens.saes import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(spec.seed)
    X = torch.as_tensor(acts, dtype=torch.float32)
    d_in = X.shape[1]
    b_dec = X.mean(0)
    W_dec = torch.randn(spec.d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": torch.nn.Parameter(W_dec.T.clone()),
        "b_enc": torch.nn.Parameter(torch.zeros(spec.d_sae)),
        "W_dec": torch.nn.Parameter(W_dec),
        "b_dec": torch.nn.Parameter(b_dec.clone()),
    }
    opt = torch.optim.Adam(params.values(), lr=spec.lr)
    n = X.shape[0]
    scale = X.sub(b_dec).pow(2).sum(1).mean()
    bar = _progress.bar(spec.steps, "SAE step", progress, unit="step")
    for _ in range(spec.steps):
        idx = torch.randint(0, n, (min(spec.batch_size, n),), generator=g)
        x = X[idx]
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        top = torch.topk(pre, spec.k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        recon = codes @ params["W_dec"] + params["b_dec"]
        loss = (recon - x).pow(2).sum(1).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"].div_(params["W_dec"].norm(dim=1, keepdim=True))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=spec.d_sae, k=spec.k,
                                metadata=SAEMetadata(model_name=model_name, hook_name=hook_name)))
    with torch.no_grad():
        for name, p in params.items():
            getattr(sae, name).copy_(p.detach())
    return sae


def sae_quality(sae: Any, acts: np.ndarray) -> dict:
    """Fraction of variance unexplained, mean L0, dead-latent fraction on ``acts``."""
    with torch.no_grad():
        x = torch.as_tensor(acts, dtype=torch.float32)
        codes = sae.encode(x)
        recon = sae.decode(codes)
        fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((codes != 0).float().sum(1).mean())
        dead = float(((codes != 0).sum(0) == 0).float().mean())
    return {"fvu": fvu, "l0": l0, "dead_fraction": dead, "n_tokens": int(len(acts))}


def spliced_loss_delta(lm: LoadedModel, sae: Any, site: HookSite, texts: Sequence[str]) -> dict:
    """Next-token loss with the block output replaced by its SAE reconstruction, minus the
    clean loss (the usual 'CE loss increase' of SAE evaluations)."""
    tok, model = lm.tokenizer, lm.model
    layer_block = block(model, site)
    device = next(model.parameters()).device

    def splice(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        r = sae.decode(sae.encode(h.float())).to(h.dtype)
        return (r,) + tuple(out[1:]) if isinstance(out, tuple) else r

    clean = spliced = count = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:128]], device=device)
            if ids.shape[1] < 2:
                continue
            base = model(ids, labels=ids).loss.item()
            handle = layer_block.register_forward_hook(splice)
            try:
                sp_ = model(ids, labels=ids).loss.item()
            finally:
                handle.remove()
            clean += base
            spliced += sp_
            count += 1
    return {"ce_clean": clean / count, "ce_spliced": spliced / count, "ce_delta": (spliced - clean) / count}


def default_sae(lm: LoadedModel, site: HookSite, prompts: Sequence[str], cache_dir: Path, cfg: SaeCfg,
                log: Callable[[str], None] = print, progress: bool = False) -> tuple[Path, dict]:
    """The cached default SAE folder (trained on first use) and its quality report."""
    spec = TrainSpec.from_config(cfg)
    chats, docs = corpus_texts(prompts)
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"sae-{cache_key(lm.name, site, chats, docs, spec)}"
    report_path = folder / "quality.json"
    remove_stale_temporaries(cache_dir, ".sae.*.tmp")
    if report_path.exists():
        return folder, json.loads(report_path.read_text())
    log(f"training the default TopK SAE (layer {site.layer}, {spec.d_sae} latents, k={spec.k}); cached at {folder}")
    torch.manual_seed(spec.seed)
    acts = collect_activations(lm, site, chats, docs, spec.max_tokens, progress=progress)
    sae = train_topk_sae(acts, spec, lm.name, site.hook_name, progress=progress)
    quality = sae_quality(sae, acts) | spliced_loss_delta(lm, sae, site, docs[:24]) | {
        "config": spec.key_fields(), "hook": site.hook_name}
    tmp = make_temp_dir(cache_dir, "sae")
    try:
        sae.save_model(str(tmp))
        write_atomic(tmp / "quality.json", json.dumps(quality, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, quality
