"""The method's steps as typed functions of frozen inputs returning frozen results.

    load_inputs → load_model_side → base_pass → select → fit → BaseState
    BaseState.delta(params) → PairDelta (per pair, under updated weights)

Each result is a frozen dataclass, so a stage cannot quietly change what an earlier one
produced; :class:`BaseState` bundles them and is what ``run``, ``validate`` and the baselines
take (never the run object). Everything here is deterministic for a config: ``validate``
rebuilds the same state from a finished run folder. Which results are cached in the run folder
is decided by :mod:`policytrace.pipeline.run` (docs/design.md, "Stages and caching").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from ..behaviours import Behaviour, from_config as behaviour_of
from ..errors import ConfigError, InvalidValueError, NonFiniteError
from ..model.chat import PairTokens, chat_pair_tokens, encode_prompts
from ..model.config import SaeCfg
from ..model.loading import LoadedModel, load_model_cfg
from ..model.probe import ProbeRunner, TargetSet
from ..model.sae import SaeReader, load_sae, sae_identity
from ..model.sae_train import default_sae
from ..model.sites import HookSite, decoder_layers
from ..model.update import UpdateEngine
from ..numeric import Policy, fit_policy, select_features
from ..numeric.fidelity import policy_fidelity
from .config import Config
from .data import chat_pair, load_dataset, probe_chat, stratified

Log = Callable[[str], None]


@dataclass(frozen=True)
class Inputs:
    """The behaviour, its probes, the run's pairs (a stratified subset when data.max_pairs)
    and all pairs of the file (the default SAE's corpus uses every prompt), and what the load
    warned about (``behaviour.on_unknown = "warn"``)."""

    behaviour: Behaviour
    probes: pl.DataFrame
    pairs: pl.DataFrame
    all_pairs: pl.DataFrame
    warnings: tuple[str, ...] = ()

    @property
    def categories(self) -> np.ndarray:
        return self.probes["category"].to_numpy()

    @property
    def flag(self) -> np.ndarray | None:
        """The probes' flag (True on the flagged side), or None when a probe lacks it."""
        col = self.probes[self.behaviour.flag]
        return None if col.null_count() else col.to_numpy().astype(bool)


@dataclass(frozen=True)
class LayerSae:
    """One more layer of the mediation curve (``sae.layers``): its site, the SAE reading it,
    the default SAE's quality (None for a named one) and its identity."""

    hook: HookSite
    reader: SaeReader
    sae_quality: dict | None
    sae_identity: str

    @property
    def layer(self) -> int:
        return self.hook.layer


@dataclass(frozen=True)
class ModelSide:
    """The model, the SAE reading it, and the runners that use both."""

    lm: LoadedModel
    hook: HookSite
    reader: SaeReader
    runner: ProbeRunner
    engine: UpdateEngine
    probe_tokens: list[list[int]]
    sae_quality: dict | None
    sae_identity: str
    pair_tokens: tuple[PairTokens, ...] = ()
    """The run's pairs through the chat template, with their loss masks (checked at load)."""
    layers: tuple[LayerSae, ...] = ()
    """The other layers of the mediation curve (``sae.extra_layers``), in order; () in a
    one-layer run."""

    @property
    def extra_sites(self) -> tuple[HookSite, ...]:
        return tuple(ls.hook for ls in self.layers)


@dataclass(frozen=True)
class BasePass:
    """Pooled activations H0 (n, d) and behaviour scores y0 (n,) under the base weights, and
    the other layers' pooled activations (``ModelSide.layers``' order), read in the same pass."""

    H0: np.ndarray
    y0: np.ndarray
    H_layers: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class FeatureSet:
    """The selected SAE features: their columns, the probe x feature matrix X the policy is
    fit on, and what the gated linearization needs."""

    columns: np.ndarray
    X: np.ndarray
    gated: bool
    pre0: np.ndarray
    frame: pl.DataFrame
    """features.parquet: selection statistics, group, label, top probes."""
    groups: list[str]
    """Each feature's group: the probe category where its mean activation is highest."""
    labels: list[str]
    w_enc: np.ndarray | None = None
    gate: np.ndarray | None = None
    probe_fvu: float | None = None
    """The SAE's fraction of variance unexplained on the probes' pooled activations."""


@dataclass(frozen=True)
class PolicyFit:
    policy: Policy
    pred: np.ndarray
    fidelity: dict


@dataclass(frozen=True)
class LayerFit:
    """One more layer of the mediation curve: its features and policy by the run's own rules."""

    layer: int
    features: FeatureSet
    fit: PolicyFit
    sae_quality: dict | None = None

    @property
    def policy(self) -> Policy:
        return self.fit.policy


@dataclass(frozen=True)
class PairDelta:
    """ΔX (n, K) of the selected features and Δy (n,) under one set of updated weights; with
    more layers, each one's ΔX of its own features (``BaseState.layers``' order)."""

    dX: np.ndarray
    dy: np.ndarray
    dX_layers: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class BaseState:
    """Everything before the pairs, for one config."""

    cfg: Config
    inputs: Inputs
    model: ModelSide
    base: BasePass
    features: FeatureSet
    fit: PolicyFit
    layers: tuple[LayerFit, ...] = ()
    """The other layers of the mediation curve (``sae.extra_layers``' order); () in a one-layer run."""

    @property
    def policy(self) -> Policy:
        return self.fit.policy

    def delta(self, params: dict, pair_id: str = "?") -> PairDelta:
        return pair_delta(self, params, pair_id)


def load_inputs(cfg: Config) -> Inputs:
    behaviour = behaviour_of(cfg.behaviour)
    ds = load_dataset(cfg.data.probes or None, cfg.data.pairs or None, behaviour, cfg.data, cfg.behaviour.on_unknown)
    pairs = stratified(ds.pairs, cfg.data.max_pairs, cfg.run.seed)
    return Inputs(behaviour, ds.probes, pairs, ds.pairs, ds.warnings)


def _sae(cfg: Config, lm: LoadedModel, hook: HookSite, inputs: Inputs, log: Log, progress: bool):
    """The named SAE, or the default one (trained once, cached): (reader, quality, identity)."""
    if cfg.sae.named and hook.layer != cfg.sae.layer:  # another layer of sae.layers: its folder in sae.paths
        path = cfg.sae.path_of(hook.layer)
        sae = load_sae(path, device=cfg.model.device)
        return SaeReader(sae, cfg.model.device), None, sae_identity(SaeCfg(path=path))
    if cfg.sae.named:
        sae = load_sae(cfg.sae.path or None, cfg.sae.release or None, cfg.sae.id or None, cfg.model.device)
        return SaeReader(sae, cfg.model.device), None, sae_identity(cfg.sae)
    prompts = inputs.all_pairs["prompt"].to_list() + inputs.probes["prompt"].to_list()
    eot = lm.tokenizer.convert_tokens_to_ids(cfg.probe.eot_token) if cfg.probe.pooling == "eot" else None
    folder, quality = default_sae(lm, hook, prompts, cfg.run.cache_path(), cfg.sae, log, progress,
                                  pooling=cfg.probe.pooling, eot_id=eot if isinstance(eot, int) else None)
    return SaeReader(load_sae(str(folder), device=cfg.model.device), cfg.model.device), quality, folder.name


def load_model_side(cfg: Config, inputs: Inputs, log: Log, progress: bool = True) -> ModelSide:
    lm = load_model_cfg(cfg.model)
    hook = HookSite(cfg.sae.layer, cfg.sae.site)
    check_layers(cfg, lm.model)
    reader, quality, identity = _sae(cfg, lm, hook, inputs, log, progress)
    hidden = lm.model.config.hidden_size
    if reader.d_in != hidden:
        raise ConfigError(f"the SAE reads {reader.d_in}-dimensional activations but the model's hidden size is "
                          f"{hidden}: SAE and model do not match")
    layers = []
    for layer in cfg.sae.extra_layers:
        site = HookSite(layer, cfg.sae.site)
        if not cfg.sae.named:
            log(f"mediation across layers: the default SAE of layer {layer}")
        r, q, ident = _sae(cfg, lm, site, inputs, log, progress)
        if r.d_in != hidden:
            raise ConfigError(f"the SAE of sae.layers entry {layer} ({cfg.sae.path_of(layer)}) reads {r.d_in}-"
                              f"dimensional activations but the model's hidden size is {hidden}")
        layers.append(LayerSae(site, r, q, ident))
    targets = TargetSet.from_strings(lm.tokenizer, cfg.behaviour.targets, cfg.behaviour.anti_targets)
    runner = ProbeRunner.from_config(lm.model, lm.tokenizer, hook, targets, cfg.probe, cfg.model.device)
    tokens = encode_prompts(lm.tokenizer, probe_chat(inputs.probes), inputs.probes["id"].to_list(), cfg.probe.max_length)
    # Every pair through the chat template now, so a template that hides the trained tokens or
    # an over-long pair stops the run before the base pass, not in the middle of the pairs.
    pair_toks = tuple(chat_pair_tokens(lm.tokenizer, chat_pair(r), cfg.update.max_length)
                      for r in inputs.pairs.iter_rows(named=True))
    engine = UpdateEngine(lm.model, lm.tokenizer, cfg.update, cfg.model.device, seed=cfg.run.seed)
    return ModelSide(lm, hook, reader, runner, engine, tokens, quality, identity, pair_toks, tuple(layers))


def check_layers(cfg: Config, model) -> None:
    """Every layer of ``sae.layers`` is a decoder block of this model."""
    if not cfg.sae.layers:
        return
    depth = len(decoder_layers(model))
    beyond = [v for v in cfg.sae.layers if v >= depth]
    if beyond:
        raise ConfigError(f"config 'sae.layers' holds layer {beyond[0]}, beyond this model's {depth} decoder "
                          f"blocks (0..{depth - 1})")


def base_pass(model: ModelSide, probes: pl.DataFrame, progress: bool = False) -> BasePass:
    """The base probe pass: every layer of the run read in the same forwards."""
    ids = probes["id"].to_list()
    if not model.layers:
        H0, y0 = model.runner.run(model.probe_tokens, probe_ids=ids, progress=progress)
        return BasePass(H0, y0)
    H0, y0, extra = model.runner.run_sites(model.probe_tokens, model.extra_sites, probe_ids=ids, progress=progress)
    return BasePass(H0, y0, tuple(extra))


def _selection(cfg: Config, inputs: Inputs, X_all: sp.csr_matrix, y0: np.ndarray) -> pl.DataFrame:
    f = cfg.features
    if f.method == "mean_diff":
        flag = inputs.flag
        if flag is None:
            raise InvalidValueError(f"features.method = 'mean_diff' needs a `{inputs.behaviour.flag}` flag on every probe")
        return select_features(X_all, y0, groups=flag, method="mean_diff", k=f.k, threshold=f.threshold_or_default,
                               min_active=f.min_active, threads=cfg.run.threads)
    return select_features(X_all, y0, method="corr", k=f.k, threshold=f.threshold_or_default, min_active=f.min_active,
                           threads=cfg.run.threads)


def _chosen(cfg: Config, inputs: Inputs, reader: SaeReader, H0: np.ndarray, y0: np.ndarray, where: str = ""):
    """Codes of ``H0``, the selected features' rows, their columns, pre-activations and X."""
    codes = reader.encode(H0)
    chosen = _selection(cfg, inputs, sp.csr_matrix(codes.astype(np.float64)), y0).filter(pl.col("selected"))
    if chosen.height == 0:
        raise InvalidValueError(f"feature selection chose no feature{where}; lower features.threshold or min_active")
    cols = chosen["column"].to_numpy()
    pre0 = reader.pre(H0)[:, cols].astype(np.float64)
    gated = cfg.decompose.delta_x == "gated"
    X = np.maximum(pre0, 0.0) if gated else codes[:, cols].astype(np.float64)
    return codes, chosen, cols, pre0, gated, X


def select(cfg: Config, inputs: Inputs, model: ModelSide, base: BasePass) -> FeatureSet:
    """Encode the base pass with the SAE, select features, and label each by its group (the probe
    category where it is most active) and its top-activating probe."""
    codes, chosen, cols, pre0, gated, X = _chosen(cfg, inputs, model.reader, base.H0, base.y0)
    probes, cats = inputs.probes, inputs.categories
    levels = sorted(set(cats.tolist()))
    means = np.stack([X[cats == c].mean(0) for c in levels], axis=1)
    groups = [levels[i] for i in means.argmax(1)]
    top = [", ".join(probes["id"][np.argsort(-X[:, j], kind="stable")[:3]].to_list()) for j in range(X.shape[1])]
    labels = [f"{g}: {probes['prompt'][int(np.argmax(X[:, j]))][:60]}" for j, g in enumerate(groups)]
    frame = chosen.select("feature_id", "n_active", "frac_active", "mean", "corr", "score", "rank").with_columns(
        pl.Series("group", groups), pl.Series("label", labels), pl.Series("top_probes", top),
        *readable_columns(cfg, model, X, cats, inputs.flag, cols))
    return FeatureSet(cols, X, gated, pre0, frame, groups, labels,
                      w_enc=model.reader.w_enc(cols) if gated else None, gate=(pre0 > 0) if gated else None,
                      probe_fvu=model.reader.fvu(base.H0, codes))


def select_layer(cfg: Config, inputs: Inputs, ls: LayerSae, H0: np.ndarray, y0: np.ndarray) -> FeatureSet:
    """Another layer's features by the run's rule (what the curve needs: columns, X, the gate,
    groups and the SAE's FVU on the probes; no readable columns)."""
    codes, chosen, cols, pre0, gated, X = _chosen(cfg, inputs, ls.reader, H0, y0, f" at sae.layers entry {ls.layer}")
    cats = inputs.categories
    levels = sorted(set(cats.tolist()))
    means = np.stack([X[cats == c].mean(0) for c in levels], axis=1)
    groups = [levels[i] for i in means.argmax(1)]
    labels = [f"L{ls.layer} {g}" for g in groups]
    frame = chosen.select("feature_id", "n_active", "frac_active", "mean", "corr", "score", "rank")
    return FeatureSet(cols, X, gated, pre0, frame, groups, labels,
                      w_enc=ls.reader.w_enc(cols) if gated else None, gate=(pre0 > 0) if gated else None,
                      probe_fvu=ls.reader.fvu(H0, codes))


def layer_fits(cfg: Config, inputs: Inputs, model: ModelSide, base: BasePass) -> tuple[LayerFit, ...]:
    """Features and policy of every other layer of the curve (the base pass read them all)."""
    out = []
    for ls, H in zip(model.layers, base.H_layers):
        feats = select_layer(cfg, inputs, ls, H, base.y0)
        out.append(LayerFit(ls.layer, feats, fit(cfg, inputs, feats, base), ls.sae_quality))
    return tuple(out)


CATEGORY_SPLIT = pl.List(pl.Struct({"category": pl.String, "n": pl.Int64, "mean": pl.Float64,
                                     "mean_flagged": pl.Float64, "mean_unflagged": pl.Float64,
                                     "frac_active": pl.Float64}))
"""features.parquet's ``by_category``: a feature's activation over each probe category's probes,
and on its flagged and other probes (null where a side has none)."""


def _mean(v: np.ndarray) -> float | None:
    return float(v.mean()) if len(v) else None


def category_split(X: np.ndarray, cats: np.ndarray, flag: np.ndarray | None) -> tuple[list, list, list]:
    """Per feature (column of X): the by-category list, the mean on flagged and on other probes."""
    levels = sorted(set(cats.tolist()))
    side = np.zeros(len(cats), dtype=bool) if flag is None else flag
    by, on, off = [], [], []
    for j in range(X.shape[1]):
        x = X[:, j]
        rows = []
        for c in levels:
            m = cats == c
            rows.append({"category": str(c), "n": int(m.sum()), "mean": float(x[m].mean()),
                         "mean_flagged": None if flag is None else _mean(x[m & side]),
                         "mean_unflagged": None if flag is None else _mean(x[m & ~side]),
                         "frac_active": float((x[m] > 0).mean())})
        by.append(rows)
        on.append(None if flag is None else _mean(x[side]))
        off.append(None if flag is None else _mean(x[~side]))
    return by, on, off


def readable_columns(cfg: Config, model: ModelSide, X: np.ndarray, cats: np.ndarray, flag: np.ndarray | None,
                     cols: np.ndarray) -> list[pl.Series]:
    """features.parquet's columns for a reader: the split by category and side, and the decoder
    direction's top output tokens through the unembedding (logit lens) with their logits."""
    from ..model.readable import logit_lens

    by, on, off = category_split(X, cats, flag)
    n = cfg.features.lens_tokens
    directions = model.reader.sae.W_dec.detach().double().cpu().numpy()[np.asarray(cols, dtype=np.int64)]
    toks, logits = logit_lens(model.lm.model, model.lm.tokenizer, directions, n) if n else ([[]] * len(cols),) * 2
    return [pl.Series("mean_flagged", on, dtype=pl.Float64), pl.Series("mean_unflagged", off, dtype=pl.Float64),
            pl.Series("by_category", by, dtype=CATEGORY_SPLIT),
            pl.Series("lens_tokens", toks, dtype=pl.List(pl.String)),
            pl.Series("lens_logits", logits, dtype=pl.List(pl.Float64))]


def feature_contexts(state: "BaseState", progress: bool = False) -> pl.DataFrame:
    """feature_contexts.parquet: each selected feature's top-activating tokens over the probes,
    the run's pairs (their whole chat tokens) and the shipped corpus (plain, first 128 tokens
    of each docstring), with a window around each (model/readable.py)."""
    from ..model.readable import Source, feature_activations, top_contexts
    from ..model.sae_train import generic_docs

    f, m, cfg = state.features, state.model, state.cfg.features
    tok = m.lm.tokenizer
    sources = [Source("probe", str(i), tuple(t)) for i, t in zip(state.inputs.probes["id"].to_list(), m.probe_tokens)]
    sources += [Source("pair", str(i), tuple(t.ids)) for i, t in zip(state.inputs.pairs["id"].to_list(), m.pair_tokens)]
    sources += [Source("corpus", f"doc-{i}", tuple(tok(d, add_special_tokens=False)["input_ids"][:128]))
                for i, d in enumerate(generic_docs())]
    ids = f.frame["feature_id"].to_list()
    if cfg.contexts == 0:
        acts: list = []
    else:
        acts = feature_activations(m.lm.model, m.reader, m.hook, f.columns, f.gated, [s.ids for s in sources],
                                   int(tok.pad_token_id), progress=progress)
    out = top_contexts(acts, sources, ids, cfg.contexts, cfg.context_window,
                       lambda seq: [tok.decode([int(t)]) for t in seq])
    return pl.DataFrame(out, schema=CONTEXTS_SCHEMA)


CONTEXTS_SCHEMA = {"feature_id": pl.Int64, "rank": pl.Int64, "source": pl.String, "item_id": pl.String,
                   "position": pl.Int64, "token": pl.String, "activation": pl.Float64,
                   "window_tokens": pl.List(pl.String), "window_activations": pl.List(pl.Float64),
                   "window_start": pl.Int64}


def fit(cfg: Config, inputs: Inputs, features: FeatureSet, base: BasePass) -> PolicyFit:
    """The policy on (X, y0), its fitted values, and its held-out fidelity."""
    p = cfg.policy
    policy = fit_policy(features.X, base.y0, lam=p.lam, intercept=p.intercept, standardize=p.standardize,
                        feature_ids=features.frame["feature_id"].to_numpy(), labels=features.labels,
                        threads=cfg.run.threads)
    fidelity = policy_fidelity(features.X, base.y0, inputs.flag, inputs.categories, policy.lam, p.intercept,
                               p.standardize, seed=cfg.run.seed, flag_name=inputs.behaviour.flag)
    return PolicyFit(policy, policy.predict(features.X), fidelity)


def prepare(cfg: Config, log: Log, progress: bool = True,
            cached_base: Callable[[ModelSide, Inputs], BasePass] | None = None,
            inputs: Inputs | None = None, timer: Callable[[str], None] | None = None) -> BaseState:
    """Every stage before the pairs. ``cached_base`` (the run folder's cache of the base pass)
    replaces :func:`base_pass` when given; ``timer(stage)`` is called as each stage ends."""
    lap = timer or (lambda _stage: None)
    torch.manual_seed(cfg.run.seed)
    inputs = inputs if inputs is not None else load_inputs(cfg)
    log(f"{inputs.probes.height} probes, {inputs.pairs.height} of {inputs.all_pairs.height} pairs "
        f"({inputs.behaviour.name})")
    for w in inputs.warnings:
        log(f"WARNING: {w}")
    model = load_model_side(cfg, inputs, log, progress)
    lap("model_and_sae")
    base = cached_base(model, inputs) if cached_base is not None else base_pass(model, inputs.probes, progress)
    lap("base_pass")
    features = select(cfg, inputs, model, base)
    policy_fit = fit(cfg, inputs, features, base)
    layers = layer_fits(cfg, inputs, model, base)
    lap("features_and_policy")
    return BaseState(cfg, inputs, model, base, features, policy_fit, layers)


def pair_delta(state: BaseState, params: dict, pair_id: str = "?") -> PairDelta:
    """ΔX (selected features) and Δy of the probe set under updated weights; non-finite values
    stop the run with an error naming the pair, never reach an output."""
    m, f = state.model, state.features
    ids = state.inputs.probes["id"].to_list()
    if state.layers:
        H1, y1, H1_layers = m.runner.run_sites(m.probe_tokens, m.extra_sites, params=params, probe_ids=ids)
    else:
        H1, y1 = m.runner.run(m.probe_tokens, params=params, probe_ids=ids)
        H1_layers = []
    dX = feature_delta(f, m.reader, state.base.H0, H1)
    dX_layers = tuple(feature_delta(lf.features, ls.reader, H0, H)
                      for lf, ls, H0, H in zip(state.layers, m.layers, state.base.H_layers, H1_layers))
    dy = y1 - state.base.y0
    checks = [("ΔX", dX), ("Δy", dy)] + [(f"ΔX at layer {lf.layer}", d) for lf, d in zip(state.layers, dX_layers)]
    for name, arr in checks:
        if not np.isfinite(arr).all():
            raise NonFiniteError(
                f"pair '{pair_id}': {name} holds NaN or inf after the update (update.lr = {state.cfg.update.lr:g}); "
                "the update diverged or the model overflows in its dtype: lower update.lr or use float32"
            )
    return PairDelta(dX, dy, dX_layers)


def feature_delta(f: FeatureSet, reader: SaeReader, H0: np.ndarray, H1: np.ndarray) -> np.ndarray:
    """ΔX of the features ``f`` read by ``reader`` between pooled activations H0 and H1."""
    if f.gated:
        return f.gate * ((H1.astype(np.float64) - H0.astype(np.float64)) @ f.w_enc)
    return reader.encode(H1)[:, f.columns].astype(np.float64) - f.X
