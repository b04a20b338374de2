"""The embedded default's SAE: a small TopK SAE trained on the model's own activations.

No public SAE exists for the embedded SmolLM2 default, so :func:`default_sae` trains one on
the activations at the SAE's hook site over a fixed offline corpus built from shipped text
(``data/sae_corpus_docs_v1.jsonl``: 306 docstrings of Python 3.11's standard library, frozen as
a versioned file so that the corpus never depends on the running process).

Recipe 2 (:data:`RECIPE`, the default since 0.3.0) trains on the distribution the probe pass
reads. Every request is chat-formatted with the generation prompt appended, exactly as a probe:
the behaviour's probes and pairs' prompts, each corpus docstring and each of its sentences as a
user turn. Two kinds of rows come out: *token rows* (every position of those requests, the
template's shared prefix once, plus the docstrings as plain text) and *pooled rows* (the one
position per request the policy reads, ``probe.pooling``'s). Each Adam batch draws
:data:`POOLED_SHARE` of its rows from the pooled ones, and the loss is the batch's fraction of
variance unexplained on each kind, summed: the pooled rows' FVU is taken about their own mean,
as the run measures it on the probes, so the small between-request variation of that one
position is what the SAE learns to keep. (Recipe 1 trained on 30,000 token rows of the prompts
and the plain docstrings; its FVU on the pooled probe activations was 0.75.) The SAE is saved
in sae-lens' on-disk format and cached under a hash of everything that went into it (recipe,
model, site, pooling, corpus, sizes, seed, steps), so a notebook and the command line train and
reuse the same SAE.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from .sites import HookSite, activation_only, block, capture

CORPUS_FILE = "sae_corpus_docs_v1.jsonl"

# Fixed training settings of the default SAE (not in the config; every one enters the cache key).
BATCH_SIZE = 1024
LR = 3e-3
MAX_TOKENS = 60_000
RECIPE = 2
"""The default SAE's training recipe (module docstring); part of the cache key."""
POOLED_SHARE = 0.5
"""Share of each batch drawn from the pooled rows (recipe 2)."""
MIN_SENTENCE = 20
"""Shortest corpus sentence (characters) that becomes a request of its own."""


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
    pooled_share: float = POOLED_SHARE
    recipe: int = RECIPE

    @classmethod
    def from_config(cls, cfg: SaeCfg) -> "TrainSpec":
        return cls(d_sae=cfg.train_d_sae, k=cfg.train_k, steps=cfg.train_steps, seed=cfg.train_seed)

    def key_fields(self) -> dict:
        # The order of the cache key's fields (recipe 1's, then what recipe 2 added).
        return {"d_sae": self.d_sae, "k": self.k, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed, "max_tokens": self.max_tokens,
                "pooled_share": self.pooled_share, "recipe": self.recipe}


def generic_docs() -> list[str]:
    """The shipped generic-English part of the corpus."""
    path = resources.files("policytrace.model").joinpath("data", CORPUS_FILE)
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sentences(docs: Sequence[str], min_chars: int = MIN_SENTENCE) -> list[str]:
    """The docstrings' sentences (split after . ! ?) of at least ``min_chars`` characters."""
    return [s for d in docs for s in re.split(r"(?<=[.!?])\s+", d.strip()) if len(s) >= min_chars]


def corpus_texts(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """The requests that are chat-formatted (the given prompts, then every corpus docstring and
    every sentence of one as a user turn) and the shipped generic English read as plain text."""
    docs = generic_docs()
    return list(prompts) + docs + sentences(docs), docs


def cache_key(model_name: str, site: HookSite, chats: Sequence[str], docs: Sequence[str], spec: TrainSpec,
              pooling: str = "last") -> str:
    corpus = hashlib.sha256(json.dumps([list(chats), list(docs)]).encode()).hexdigest()[:16]
    blob = json.dumps({"model": model_name, "layer": site.cache_tag, "corpus": corpus, "pooling": pooling,
                       **spec.key_fields()}, sort_keys=True)
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


@dataclass(frozen=True)
class Corpus:
    """Recipe 2's training rows at one hook site."""

    tokens: np.ndarray
    """(n_tokens, d): every position of the chat-formatted requests (their shared template
    prefix once) and of the plain docstrings, up to ``max_tokens``."""
    pooled: np.ndarray
    """(n_requests, d): the position the probe pass pools at, one per request."""


def pool_position(ids: Sequence[int], pooling: str = "last", eot_id: int | None = None) -> int:
    """Where a request's pooled row is read: the last end-of-turn token for ``pooling = "eot"``,
    else the last prompt token (``mean`` and ``max`` read every token; their pooled row is the
    last one's)."""
    if pooling == "eot" and eot_id is not None:
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == eot_id:
                return i
    return len(ids) - 1


def _shared_prefix(seqs: Sequence[Sequence[int]], pools: Sequence[int]) -> int:
    first, k = seqs[0], 0
    m = min(min(len(s) for s in seqs) - 1, min(pools))
    while k < m and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


def collect_corpus(lm: LoadedModel, site: HookSite, chats: Sequence[str], docs: Sequence[str], max_tokens: int,
                   pooling: str = "last", eot_id: int | None = None, batch_size: int = 16,
                   progress: bool = False) -> Corpus:
    """Token and pooled rows at ``site``: the chat-formatted ``chats`` (their common template
    prefix run once and its KV cache reused, left-padded like the probe pass), then ``docs``
    as plain text (first 128 tokens each). Token rows stop at ``max_tokens``; every request
    gives its pooled row (the requests come first, so their rows are never cut)."""
    from .functional import decoder_call
    from .probe import _copied_cache

    tok, model = lm.tokenizer, lm.model
    device = next(model.parameters()).device
    reqs = [format_prompt(tok, c) for c in chats]
    pools = [pool_position(r, pooling, eot_id) for r in reqs]
    P = _shared_prefix(reqs, pools) if reqs else 0
    tokens, pooled, total = [], [], 0
    bar = _progress.bar(len(reqs) + len(docs), "SAE corpus request", progress)
    decoder = model.get_decoder()
    with torch.no_grad():
        cache = None
        if P:
            ids = torch.tensor([reqs[0][:P]], device=device)
            with capture(model, site) as store:
                _, cache = decoder_call(decoder, ids, torch.ones_like(ids), torch.arange(P, device=device)[None])
            tokens.append(store["h"][0].float().cpu().numpy())
            total += P
        order = np.argsort([len(r) for r in reqs], kind="stable")
        out_pooled = np.zeros((len(reqs), model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(reqs), batch_size):
            idx = order[start : start + batch_size]
            batch = [reqs[i][P:] for i in idx]
            B, T = len(batch), max(len(b) for b in batch)
            ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
            smask = torch.zeros((B, T), dtype=torch.long)
            for r, seq in enumerate(batch):
                ids[r, T - len(seq):] = torch.tensor(seq)
                smask[r, T - len(seq):] = 1
            ids, smask = ids.to(device), smask.to(device)
            pos = P + (smask.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([torch.ones((B, P), dtype=torch.long, device=device), smask], dim=1)
            h = _until_site(model, site, ids, mask, pos, _copied_cache(cache, B) if cache is not None else None)
            h = h.float().cpu().numpy()
            for r, i in enumerate(idx):
                off = T - len(batch[r])
                out_pooled[i] = h[r, off + pools[i] - P]
                if total < max_tokens:
                    rows = h[r, off:][: max_tokens - total]
                    tokens.append(rows)
                    total += len(rows)
            bar.update(B)
        pooled.append(out_pooled)
        for start in range(0, len(docs), batch_size):
            if total >= max_tokens:
                break
            seqs = [tok(d, add_special_tokens=False)["input_ids"][:128] for d in docs[start : start + batch_size]]
            seqs = [s for s in seqs if s]
            if not seqs:
                continue
            T = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
            m = torch.zeros_like(ids)
            for r, s_ in enumerate(seqs):
                ids[r, : len(s_)] = torch.tensor(s_)
                m[r, : len(s_)] = 1
            h = activation_only(model, site, ids.to(device), m.to(device))
            rows = h[m.to(device).bool()].float().cpu().numpy()[: max_tokens - total]
            tokens.append(rows)
            total += len(rows)
            bar.update(len(seqs))
    bar.close()
    d = model.config.hidden_size
    return Corpus(np.concatenate(tokens) if tokens else np.zeros((0, d), np.float32),
                  np.concatenate(pooled) if pooled else np.zeros((0, d), np.float32))


def _until_site(model, site: HookSite, ids, mask, pos, cache):
    """The site's activation of a decoder call with a KV cache, stopping after the site's block."""
    from .functional import decoder_call
    from .sites import _Stop

    def stop(*_args, **_kwargs):
        raise _Stop

    with capture(model, site) as store:
        handle = block(model, site).register_forward_hook(stop)
        try:
            decoder_call(model.get_decoder(), ids, mask, pos, cache, use_cache=cache is not None)
        except _Stop:
            pass
        finally:
            handle.remove()
    return store["h"]


def train_topk_sae(acts: np.ndarray, spec: TrainSpec, model_name: str, hook_name: str, progress: bool = False,
                   pooled: np.ndarray | None = None, on_step: Callable[[float], None] | None = None) -> Any:
    """A TopK SAE (sae-lens ``TopKSAE``) fitted to ``acts`` with Adam on the reconstruction
    loss; decoder rows kept at unit norm; deterministic for a seed on CPU.

    With ``pooled`` rows (recipe 2), each batch draws ``spec.pooled_share`` of its rows from
    them and the loss is the batch's FVU on the token rows plus its FVU on the pooled rows,
    each relative to that kind's variance about its own mean."""
    from sae_lens.saes import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(spec.seed)
    X = torch.as_tensor(acts, dtype=torch.float32)
    d_in = X.shape[1]
    Q = None if pooled is None or len(pooled) == 0 else torch.as_tensor(pooled, dtype=torch.float32)
    n_pool = 0 if Q is None else int(round(spec.batch_size * spec.pooled_share))
    b_dec = X.mean(0) if Q is None else torch.cat([X, Q]).mean(0)
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
    if Q is None:
        scale = X.sub(b_dec).pow(2).sum(1).mean()
    else:
        scale = X.sub(X.mean(0)).pow(2).sum(1).mean()
        pool_scale = Q.sub(Q.mean(0)).pow(2).sum(1).mean().clamp(min=1e-12)
    n_tok = min(spec.batch_size - n_pool, n)
    bar = _progress.bar(spec.steps, "SAE step", progress, unit="step")
    for _ in range(spec.steps):
        idx = torch.randint(0, n, (n_tok,), generator=g)
        x = X[idx]
        if n_pool:
            x = torch.cat([x, Q[torch.randint(0, len(Q), (n_pool,), generator=g)]])
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        top = torch.topk(pre, spec.k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        recon = codes @ params["W_dec"] + params["b_dec"]
        err = (recon - x).pow(2).sum(1)
        loss = err[:n_tok].mean() / scale
        if n_pool:
            loss = loss + err[n_tok:].mean() / pool_scale
        if on_step is not None:
            on_step(float(loss.detach()))
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
                log: Callable[[str], None] = print, progress: bool = False, pooling: str = "last",
                eot_id: int | None = None) -> tuple[Path, dict]:
    """The cached default SAE folder (trained on first use, recipe 2) and its quality report:
    FVU, L0 and dead fraction on the token rows, ``fvu_pooled`` on the pooled rows (about their
    own mean, as the run measures it on the probes), and the spliced next-token loss."""
    spec = TrainSpec.from_config(cfg)
    chats, docs = corpus_texts(prompts)
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"sae-{cache_key(lm.name, site, chats, docs, spec, pooling)}"
    report_path = folder / "quality.json"
    remove_stale_temporaries(cache_dir, ".sae.*.tmp")
    if report_path.exists():
        return folder, json.loads(report_path.read_text())
    log(f"training the default TopK SAE (recipe {spec.recipe}: layer {site.layer}, {spec.d_sae} latents, "
        f"k={spec.k}, {spec.steps} steps on {len(chats)} chat requests and {len(docs)} documents); cached at {folder}")
    torch.manual_seed(spec.seed)
    corpus = collect_corpus(lm, site, chats, docs, spec.max_tokens, pooling, eot_id, progress=progress)
    sae = train_topk_sae(corpus.tokens, spec, lm.name, site.hook_name, progress=progress, pooled=corpus.pooled)
    pooled_q = sae_quality(sae, corpus.pooled)
    quality = sae_quality(sae, corpus.tokens) | {"fvu_pooled": pooled_q["fvu"], "l0_pooled": pooled_q["l0"],
                                                 "n_pooled": pooled_q["n_tokens"]} \
        | spliced_loss_delta(lm, sae, site, docs[:24]) | {"config": spec.key_fields(), "hook": site.hook_name,
                                                          "pooling": pooling}
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
