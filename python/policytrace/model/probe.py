"""The probe pass (method step 1, docs/design.md): one forward per batch of chat-formatted probes that
reads the residual stream at the pooling position and scores the behaviour.

The behaviour score of a probe is ``log Σ_s P(s | prompt)`` over target token sequences
``s`` (teacher-forced), minus the same over anti-targets when those are given (log-odds).
Targets are scored from the prompt's KV cache: the prompt runs once, then every target
continuation runs as a short extra batch, and the vocabulary projection is applied only at the
positions whose next-token probability is needed.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import _progress
from ..errors import ConfigError, InvalidValueError
from .chat import encode_prompts, format_prompt
from .config import POOLINGS, ProbeCfg, SaeCfg
from .functional import Functional, decoder_call, upcast
from .sites import HookSite, capture_many

__all__ = ["POOLINGS", "ProbeRunner", "TargetSet", "encode_prompts", "format_prompt"]


@dataclass(frozen=True)
class TargetSet:
    """Token sequences of the behaviour's targets (and anti-targets)."""

    targets: tuple[tuple[int, ...], ...]
    anti_targets: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_strings(cls, tokenizer, targets: Sequence[str], anti_targets: Sequence[str] = ()) -> "TargetSet":
        def toks(strings, field):
            seqs = []
            for s in strings:
                t = tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
                if not t:
                    raise ConfigError(f"behaviour.{field}: '{s}' tokenizes to nothing")
                if t not in seqs:
                    seqs.append(t)
            # A sequence that is a prefix of another would count the longer one twice.
            for a in seqs:
                for b in seqs:
                    if a != b and b[: len(a)] == a:
                        raise ConfigError(
                            f"behaviour.{field}: {tokenizer.decode(list(a))!r} is a prefix of "
                            f"{tokenizer.decode(list(b))!r}; its probability already includes the "
                            "longer one (drop one of them)"
                        )
            return tuple(seqs)

        if not targets:
            raise ConfigError("behaviour.targets is empty")
        return cls(toks(targets, "targets"), toks(anti_targets, "anti_targets"))

    @property
    def all(self) -> tuple[tuple[int, ...], ...]:
        return self.targets + self.anti_targets

    @functools.cached_property
    def continuation(self) -> "Continuation":
        return Continuation.plan(self.all)


@dataclass(frozen=True)
class Continuation:
    """How the tokens after the first are scored: ``rows`` are the distinct continuation inputs
    (each sequence minus its last token, dropping any that is a prefix of another row), and
    ``reads`` say, per sequence ``j`` and continuation token, which row and column hold the
    next-token distribution and which token to read: ``(row, column, token, j)``."""

    rows: tuple[tuple[int, ...], ...]
    reads: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def plan(cls, seqs: Sequence[tuple[int, ...]]) -> "Continuation":
        inputs = list(dict.fromkeys(s[:-1] for s in seqs if len(s) > 1))
        rows = tuple(a for a in inputs if not any(b != a and b[: len(a)] == a for b in inputs))
        reads = []
        for j, s in enumerate(seqs):
            for t in range(1, len(s)):
                r = next(i for i, row in enumerate(rows) if row[:t] == s[:t])
                reads.append((r, t - 1, s[t], j))
        return cls(rows, tuple(reads))


def _copied_cache(prefix_cache, batch: int):
    """The shared prefix's cache for one batch, outside autograd: a copy repeated ``batch`` times."""
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(batch)
    return cache


def _expanded_cache(prefix_cache, batch: int):
    """Inside an autograd graph: a new cache over views of the prefix's keys and values expanded
    to ``batch`` rows (deepcopy refuses non-leaf tensors); the backward of the expansion sums the
    rows' gradients into the one prefix."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
                                        for layer in prefix_cache.layers])


def _eot_position(ids: list[int], eot_id: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == eot_id:
            return i
    return -1


class ProbeRunner:
    """Runs probe passes for one model; ``params`` (a name → tensor dict) runs the same model
    with other weights through ``torch.func.functional_call``, leaving its own untouched."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        layer: int,
        targets: TargetSet,
        pooling: str = ProbeCfg.pooling,
        eot_token: str | None = None,
        batch_size: int = ProbeCfg.batch_size,
        device: str = "cpu",
        share_prefix: bool = ProbeCfg.share_prefix,
        site: str = SaeCfg.site,
    ) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"probe.pooling must be one of {POOLINGS}, got '{pooling}'")
        self.model, self.tokenizer, self.layer = model, tokenizer, layer
        self.targets, self.pooling, self.batch_size, self.device = targets, pooling, batch_size, device
        self.site = site
        # Chat templates put the same system prompt before every probe: run that prefix once
        # per pass and reuse its KV cache (only for pooling at a single position after it).
        self.share_prefix = share_prefix and pooling in ("last", "eot")
        self.eot_id = None
        if pooling == "eot":
            if not eot_token:
                raise ConfigError("probe.pooling = 'eot' needs probe.eot_token (e.g. '<|im_end|>')")
            eid = tokenizer.convert_tokens_to_ids(eot_token)
            if eid is None or eid == tokenizer.unk_token_id:
                raise ConfigError(f"probe.eot_token '{eot_token}' is not a token of this tokenizer")
            self.eot_id = int(eid)
        self.pad_id = int(tokenizer.pad_token_id)
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._fn = Functional(model)
        self.hook = HookSite(layer, site)

    @classmethod
    def from_config(cls, model: Any, tokenizer: Any, hook: HookSite, targets: TargetSet, cfg: ProbeCfg,
                    device: str = "cpu") -> "ProbeRunner":
        """A runner for the ``[probe]`` table."""
        return cls(model, tokenizer, hook.layer, targets, cfg.pooling, cfg.eot_token or None, cfg.batch_size,
                   device, cfg.share_prefix, site=hook.site)

    def pool_positions(self, ids: list[int], pid: str = "?") -> int:
        if self.pooling == "eot":
            pos = _eot_position(ids, self.eot_id)
            if pos < 0:
                raise InvalidValueError(
                    f"probe '{pid}' has no end-of-turn token {self.tokenizer.convert_ids_to_tokens(self.eot_id)!r} "
                    "in its chat-formatted prompt; check probe.eot_token against the chat template"
                )
            return pos
        return len(ids) - 1

    def run(self, prompt_ids: Sequence[list[int]], params: dict | None = None, probe_ids: Sequence[str] | None = None,
            progress: bool = False):
        """Pooled block outputs ``H`` (n, d) as float32 numpy (float64 for a float64 model) and
        scores ``y`` (n,) float64
        (``progress``: a bar over probes, for the one-off base pass)."""
        H, y, _ = self.run_sites(prompt_ids, (), params, probe_ids, progress)
        return H, y

    def run_sites(self, prompt_ids: Sequence[list[int]], sites: Sequence[HookSite], params: dict | None = None,
                  probe_ids: Sequence[str] | None = None, progress: bool = False):
        """:meth:`run` that also reads more ``sites`` in the same forwards: ``(H, y, [H_s, ...])``,
        each ``H_s`` pooled like ``H`` (mediation across layers)."""
        sites = tuple(sites)
        n = len(prompt_ids)
        probe_ids = list(probe_ids) if probe_ids is not None else [str(i) for i in range(n)]
        pools = [self.pool_positions(ids, pid) for ids, pid in zip(prompt_ids, probe_ids)]
        # float32 like the model, float64 for a float64 model (a ΔH of a tiny step survives)
        wide = next(self.model.parameters()).dtype == torch.float64
        Hs = [np.zeros((n, self.model.config.hidden_size), dtype=np.float64 if wide else np.float32)
              for _ in range(1 + len(sites))]
        y = np.zeros(n, dtype=np.float64)
        # Length-bucketed batches: sort by length so padding stays small; results are put back
        # in probe order, and padding never changes them (positions come from the mask).
        if n == 0:
            return Hs[0], y, Hs[1:]
        order = np.argsort([len(p) for p in prompt_ids], kind="stable")
        prefix = self._common_prefix(prompt_ids, pools) if self.share_prefix else []
        bar = _progress.bar(n, "probe", progress)
        with torch.no_grad():
            prefix_cache = self._prefix_cache(prefix, params) if prefix else None
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                hs, s = self._batch_sites([prompt_ids[i] for i in idx], [pools[i] for i in idx], params, prefix,
                                          prefix_cache, sites=(self.hook, *sites))
                for H, h in zip(Hs, hs):
                    H[idx] = (h.double() if wide else h.float()).cpu().numpy()
                y[idx] = s.cpu().numpy()
                bar.update(len(idx))
        bar.close()
        return Hs[0], y, Hs[1:]

    def run_differentiable(self, prompt_ids: Sequence[list[int]], params: dict | None, share_prefix: bool = False):
        """:meth:`run_differentiable_sites` of the runner's own site: ``(H, y)``."""
        hs, y = self.run_differentiable_sites(prompt_ids, params, share_prefix)
        return hs[0], y

    def run_differentiable_sites(self, prompt_ids: Sequence[list[int]], params: dict | None,
                                 share_prefix: bool = False, sites: Sequence[HookSite] = ()):
        """Pooled activations (n, d) and scores (n,) as torch tensors that carry gradients (with
        respect to ``params``, or to whatever requires grad in the model's own forward when
        ``params`` is None). ``share_prefix`` (for poolings at one position) runs the chat
        template's common prefix once, inside the graph: its keys and values are expanded over
        the batch, so the backward sums every probe's gradient into the one prefix (exact for
        sums over probes, such as concept gradients; not per-probe separable). Returns the list
        of pooled activations, the runner's site first, then ``sites``, and the scores."""
        n = len(prompt_ids)
        pools = [self.pool_positions(ids) for ids in prompt_ids]
        order = np.argsort([len(p) for p in prompt_ids], kind="stable")
        share = share_prefix and self.pooling in ("last", "eot")
        prefix = self._common_prefix(prompt_ids, pools) if share and n else []
        prefix_cache = self._prefix_cache(prefix, params) if prefix else None
        all_sites = (self.hook, *sites)
        parts_h: list[list] = [[] for _ in all_sites]
        parts_y, positions = [], []
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            hs, s = self._batch_sites([prompt_ids[i] for i in idx], [pools[i] for i in idx], params, prefix,
                                      prefix_cache, fresh=_expanded_cache, sites=all_sites)
            for part, h in zip(parts_h, hs):
                part.append(h)
            parts_y.append(s)
            positions.extend(idx.tolist())
        inv = torch.as_tensor(np.argsort(positions, kind="stable"))
        return [torch.cat(p)[inv] for p in parts_h], torch.cat(parts_y)[inv]

    @staticmethod
    def _common_prefix(prompt_ids, pools) -> list[int]:
        first = prompt_ids[0]
        m = min(min(len(p) for p in prompt_ids) - 1, min(pools))
        k = 0
        while k < m and all(p[k] == first[k] for p in prompt_ids):
            k += 1
        return list(first[:k])

    def _prefix_cache(self, prefix: list[int], params):
        ids = torch.tensor([prefix], device=self.device)
        mask = torch.ones_like(ids)
        pos = torch.arange(len(prefix), device=self.device)[None]
        _, cache = self._call(params, self._decoder_fn, ids, mask, pos)
        return cache

    def _call(self, params, fn, *args):
        return self._fn.call(params, fn, *args)

    def _batch(self, batch: list[list[int]], pools: list[int], params, prefix=(), prefix_cache=None,
               fresh=None):
        hs, scores = self._batch_sites(batch, pools, params, prefix, prefix_cache, fresh, (self.hook,))
        return hs[0], scores

    def _batch_sites(self, batch: list[list[int]], pools: list[int], params, prefix=(), prefix_cache=None,
                     fresh=None, sites: tuple[HookSite, ...] = ()):
        """Pooled activations at each of ``sites`` (one forward) and the scores."""
        P = len(prefix)
        batch = [seq[P:] for seq in batch]
        pools = [p - P for p in pools]
        B, T = len(batch), max(len(b) for b in batch)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        smask = torch.zeros((B, T), dtype=torch.long)
        for r, seq in enumerate(batch):  # left padding: the last prompt token is at T - 1
            ids[r, T - len(seq) :] = torch.tensor(seq)
            smask[r, T - len(seq) :] = 1
        ids, smask = ids.to(self.device), smask.to(self.device)
        # Positions come from the mask, so padding never shifts them.
        pos = P + (smask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((B, P), dtype=torch.long, device=self.device), smask], dim=1)
        cache = None
        if prefix_cache is not None:
            cache = (fresh or _copied_cache)(prefix_cache, B)
        with capture_many(self.model, sites) as store:
            out = self._call(params, self._decoder_fn, ids, mask, pos, cache)
        pooled = [self._pool(store[i], batch, pools, smask, T) for i in range(len(sites))]
        last_hidden, cache = out
        first = self._call(params, self._head_fn, last_hidden[:, -1])
        logp_first = torch.log_softmax(upcast(first), dim=-1)
        scores = self._score(logp_first, cache, mask, pos, params)
        return pooled, scores

    def _pool(self, hidden_block, batch, pools, smask, T):
        """The pooled activation of one site's (B, T, d) block output."""
        if self.pooling in ("last", "eot"):
            B = hidden_block.shape[0]
            rows = torch.arange(B, device=hidden_block.device)
            cols = torch.tensor([T - len(seq) + p for seq, p in zip(batch, pools)], device=hidden_block.device)
            return hidden_block[rows, cols]
        m = smask.unsqueeze(-1).to(hidden_block.dtype)
        if self.pooling == "mean":
            return (hidden_block * m).sum(1) / m.sum(1)
        return hidden_block.masked_fill(m == 0, float("-inf")).amax(1)

    def _decoder_fn(self, ids, mask, pos, cache=None):
        return decoder_call(self._decoder, ids, mask, pos, cache, use_cache=True)

    def _head_fn(self, h):
        return self._head(h)

    def _cont_fn(self, ids, mask, pos, cache):
        return decoder_call(self._decoder, ids, mask, pos, cache, use_cache=False)[0]

    def _score(self, logp_first, cache, mask, pos, params):
        seqs = self.targets.all
        B = logp_first.shape[0]
        # log P of every sequence: first token from the prompt's last position ...
        seq_logp = torch.stack([logp_first[:, s[0]] for s in seqs], dim=1)  # (B, L)
        plan = self.targets.continuation
        if plan.rows:
            # ... the rest from one continuation batch of B·R rows on the repeated prompt cache,
            # one row per distinct continuation input (sequences sharing a prefix share a row).
            R, Tc = len(plan.rows), max(len(r) for r in plan.rows)
            cont = torch.full((B * R, Tc), self.pad_id, dtype=torch.long, device=mask.device)
            cmask = torch.zeros((B * R, Tc), dtype=torch.long, device=mask.device)
            for r, row in enumerate(plan.rows):
                cont[r::R, : len(row)] = torch.tensor(row, device=mask.device)
                cmask[r::R, : len(row)] = 1
            cache.batch_repeat_interleave(R)
            full_mask = torch.cat([mask.repeat_interleave(R, 0), cmask], dim=1)
            cpos = pos[:, -1:].repeat_interleave(R, 0) + 1 + torch.arange(Tc, device=mask.device)
            hid = self._call(params, self._cont_fn, cont, full_mask, cpos, cache)  # (B·R, Tc, d)
            # One (row, column, token) per continuation token of every sequence and probe.
            rows = torch.tensor([b * R + r for r, _, _, _ in plan.reads for b in range(B)])
            cols = torch.tensor([c for _, c, _, _ in plan.reads for _ in range(B)])
            toks = torch.tensor([t for _, _, t, _ in plan.reads for _ in range(B)])
            lp = torch.log_softmax(upcast(self._call(params, self._head_fn, hid[rows, cols])), dim=-1)
            picked = lp[torch.arange(len(rows)), toks]
            add = torch.zeros_like(seq_logp)
            bi = torch.tensor([b for _ in plan.reads for b in range(B)])
            ji = torch.tensor([j for _, _, _, j in plan.reads for _ in range(B)])
            add.index_put_((bi, ji), picked, accumulate=True)
            seq_logp = seq_logp + add
        nt = len(self.targets.targets)
        y = torch.logsumexp(seq_logp[:, :nt].double(), dim=1)
        if self.targets.anti_targets:
            y = y - torch.logsumexp(seq_logp[:, nt:].double(), dim=1)
        return y
