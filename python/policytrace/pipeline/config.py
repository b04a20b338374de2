"""The run configuration: one typed table per TOML table, presets as instances, strict keys.

A config file lists only what differs from the defaults. ``preset`` picks the base the file
then overrides: ``"default"`` (recommended), ``"smda-paper"`` (the SMDA release's choices) or
``"demo"`` (24 pairs). Unknown tables or keys and wrong types are errors naming the key (a typo
must not silently fall back to a default). Every table is a frozen dataclass whose fields
carry their docstrings; the README's configuration table is generated from them
(``python -m policytrace.pipeline.config --markdown``) and a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from .._tables import describe, fail, field_docs, from_mapping, identity_mapping, output_neutral, table, to_mapping
from ..behaviours import BehaviourCfg, resolved_table
from ..errors import ConfigError
from ..model.config import ModelCfg, ProbeCfg, SaeCfg, UpdateCfg
from ..numeric._backend import MAX_THREADS
from ..train.config import TrainCfg


@table("data")
class DataCfg:
    probes: str = ""
    """Probe file or folder (JSONL, Parquet, Arrow, a folder of Parquet/Arrow shards, or a
    `datasets` save_to_disk folder): id, category, the behaviour's flag, and a prompt or
    `messages` ending with a user turn; "" = the behaviour's shipped probes."""
    pairs: str = ""
    """SFT pair file or folder (the same formats): id, category, label, the flag (optional) and
    the conversation (`data.format`); "" = the behaviour's shipped pairs."""
    max_pairs: int = 0
    """0 = all pairs, else a seeded, category-stratified subset of this many."""
    format: Literal["auto", "flat", "messages", "prompt_completion"] = "auto"
    """How a pair row holds its conversation: flat (prompt, response), messages (a chat list of
    {role, content}: system prompts, several turns), prompt_completion (TRL: prompt and
    completion, both strings or both message lists); auto = by the columns present."""
    train_turns: Literal["last", "all"] = "last"
    """Which assistant turns of a chat pair are trained on (the loss mask: their content and
    end-of-turn tokens): the last, or all; of a TRL pair, among its completion's."""
    split: str = ""
    """The split to read from a `datasets` DatasetDict folder or a folder of hub-style shards
    (train-00000-of-00002.parquet, test-...); "" = the only one there."""
    id_column: str = "id"
    """Column of the row's unique id."""
    prompt_column: str = "prompt"
    """Column of the prompt (flat rows, probes, TRL's prompt)."""
    response_column: str = "response"
    """Column of the response (flat pairs)."""
    completion_column: str = "completion"
    """Column of TRL's completion."""
    messages_column: str = "messages"
    """Column of the chat messages."""
    category_column: str = "category"
    """Column of the row's category (probe groups, pair groups, the stratified subset)."""
    label_column: str = "label"
    """Column of the pair's label (its meaning: `behaviour.raising_labels`, ...)."""

    def __post_init__(self) -> None:
        if self.max_pairs < 0:
            raise fail(self, "max_pairs", "must be >= 0 (0 = all pairs)")
        for f in dataclasses.fields(self):
            if f.name.endswith("_column") and not getattr(self, f.name).strip():
                raise fail(self, f.name, "must name a column")


@table("features")
class FeaturesCfg:
    method: Literal["corr", "mean_diff"] = "corr"
    """corr: top-k by |corr(x, y)|; mean_diff: |mean on the flagged side − mean on the other|
    (the paper's rule, over the behaviour's flag: the flagged probes against the others)."""
    k: int = 64
    """At most this many features."""
    threshold: float = -1.0
    """|score| a feature must exceed; < 0 = the method's default (mean_diff: 0.1, corr: 0)."""
    min_active: int = 3
    """A feature must fire on at least this many probes."""
    contexts: int = 8
    """Top-activating token contexts kept per selected feature over the probes, pairs and the
    shipped corpus (feature_contexts.parquet); 0 = none."""
    context_window: int = 6
    """Tokens either side of each context's token."""
    lens_tokens: int = 8
    """Output tokens of each feature's decoder direction through the unembedding (logit lens)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise fail(self, "k", "must be >= 1")
        for name in ("min_active", "contexts", "context_window", "lens_tokens"):
            if getattr(self, name) < 0:
                raise fail(self, name, "must be >= 0")

    @property
    def threshold_or_default(self) -> float | None:
        return None if self.threshold < 0 else self.threshold


@table("policy")
class PolicyCfg:
    lam: float | Literal["gcv"] = "gcv"
    """Ridge penalty λ, or "gcv" to choose it by generalized cross-validation (then fixed)."""
    intercept: bool = True
    """Fit an unpenalized intercept (centres features and scores)."""
    standardize: bool = True
    """Divide each feature by its population std at the base fit (fixed thereafter)."""

    def __post_init__(self) -> None:
        if self.lam != "gcv" and self.lam < 0:
            raise fail(self, "lam", 'must be a number >= 0 or "gcv"')


@table("decompose")
class DecomposeCfg:
    method: Literal["exact", "first_order"] = "exact"
    """exact refits (x-path, y-path, interaction, Shapley split) or the paper's first-order
    derivative."""
    delta_x: Literal["reencode", "gated"] = "reencode"
    """ΔX as SAE codes after − before, or gated: 1[pre(h0) > 0] ⊙ (Δh·W_enc) (the paper's)."""


@table("gradient")
class GradientCfg:
    per_feature: bool = False
    """Also the 2K per-feature outputs (d_coef_x, d_coef_y per feature; needed for interference)."""
    projection_dim: int = 0
    """0 = whole gradients (exact first order; no gradient store). r > 0 = each parameter
    matrix's gradient projected to r x r by seeded random factors (LoGra-style), pair gradients
    kept in an on-disk store reused by later runs on the same model, pairs and update."""
    explain_top: int = 0
    """Run the exact engine on the N pairs with the largest |score| and |dy_mean| and report how
    well the two agree on them."""
    seed: int = 0
    """Seed of the projection matrices."""
    token_budget: int = 2048
    """Tokens per batch of pairs, and of probes in the concept pass: a batch's longest sequence
    times its size stays within this (Bergson's rule). Larger batches use more memory and keep a
    GPU busier; a pair longer than the budget is a batch of its own."""

    def __post_init__(self) -> None:
        if self.projection_dim < 0:
            raise fail(self, "projection_dim", "must be >= 0 (0 = whole gradients)")
        if self.token_budget < 1:
            raise fail(self, "token_budget", "must be >= 1")
        if self.explain_top < 0:
            raise fail(self, "explain_top", "must be >= 0")


@table("run")
class RunCfg:
    # Not part of the config's identity: the cache only holds content-keyed SAEs, and the thread
    # counts a folder was computed with are checked by the fingerprint itself (run.py).
    OUTPUT_NEUTRAL: ClassVar[tuple[str, ...]] = ("threads", "cache_dir")

    mode: Literal["engine", "gradient", "trajectory"] = "engine"
    """engine: one update and one probe pass per pair (exact or first-order decomposition);
    gradient: every output to first order from one backward pass per pair (README, "Gradient
    mode"); trajectory: the `[train]` fine-tune as it ran (AdamW, batches, epochs, schedule),
    each pair's share of every step (README, "Attributing your fine-tuning")."""
    seed: int = 0
    """Seed of the pair subset, the folds, LoRA's init and torch."""
    pair_batch: int = 0
    """Pairs per shard, the unit of resumption; 0 = the mode's own (engine 8, gradient 128: its
    pairs are batched within a shard, so larger shards make larger batches)."""
    threads: int = 0
    """Numeric-core threads (0 = all cores); torch follows its own setting. A run folder records
    the thread counts it was computed with and refuses to be resumed with others."""
    cache_dir: str = ""
    """Where the default SAE is cached; "" = $POLICYTRACE_CACHE or ~/.cache/policytrace."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise fail(self, "seed", "must be between 0 and 2**63 - 1")
        if self.pair_batch < 0:
            raise fail(self, "pair_batch", "must be >= 0 (0 = the mode's own)")
        if not 0 <= self.threads <= MAX_THREADS:
            raise fail(self, "threads", f"must be between 0 (all cores) and {MAX_THREADS}")

    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("POLICYTRACE_CACHE", "~/.cache/policytrace")).expanduser()


TABLES: dict[str, type] = {
    cls.TABLE: cls  # type: ignore[attr-defined]
    for cls in (ModelCfg, SaeCfg, DataCfg, ProbeCfg, BehaviourCfg, FeaturesCfg, PolicyCfg, UpdateCfg,
                DecomposeCfg, GradientCfg, RunCfg, TrainCfg)
}


@dataclasses.dataclass(frozen=True)
class Config:
    """A resolved run configuration: every table, defaults ← preset ← file."""

    preset: str = "default"
    model: ModelCfg = ModelCfg()
    sae: SaeCfg = SaeCfg()
    data: DataCfg = DataCfg()
    probe: ProbeCfg = ProbeCfg()
    behaviour: BehaviourCfg = BehaviourCfg()
    features: FeaturesCfg = FeaturesCfg()
    policy: PolicyCfg = PolicyCfg()
    update: UpdateCfg = UpdateCfg()
    decompose: DecomposeCfg = DecomposeCfg()
    gradient: GradientCfg = GradientCfg()
    run: RunCfg = RunCfg()
    train: TrainCfg = TrainCfg()

    def tables(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in TABLES}

    def to_dict(self) -> dict[str, Any]:
        """Every table's keys (those added later only when set: ``ADDED_LATER``)."""
        return {"preset": self.preset} | {name: identity_mapping(t) for name, t in self.tables().items()}


def _preset(**tables: dict[str, Any]) -> Config:
    return Config(**{name: from_mapping(TABLES[name], values) for name, values in tables.items()})


PRESETS: dict[str, Config] = {
    "default": Config(),
    "smda-paper": _preset(
        probe={"pooling": "eot", "eot_token": "<|eot_id|>"},
        behaviour={"targets": ["I can't"]},
        features={"method": "mean_diff", "threshold": 0.1, "k": 100000, "min_active": 1},
        policy={"lam": 5.0, "intercept": False, "standardize": False},
        update={"optimizer": "sgd", "lr": 1e-4, "steps": 1, "params": "all"},
        decompose={"method": "first_order", "delta_x": "gated"},
    ),
    # The default method on a category-stratified subset of the shipped pairs, sized for a
    # 2-core laptop CPU (README: timings).
    "demo": _preset(data={"max_pairs": 24}),
}
PRESET_DOCS = {
    "default": "the recommended settings",
    "smda-paper": "the SMDA release's choices (pooling at <|eot_id|>, target \"I can't\", mean-diff features > 0.1, "
                  "λ = 5 without intercept or scaling, first order, gated ΔX)",
    "demo": "the default on 24 category-stratified pairs",
}


def _with_behaviour_defaults(cfg: Config) -> Config:
    """Keys left empty in [behaviour] become the behaviour's own (targets, flag, label
    meanings, ...), so the resolved config (and the run folder's config.toml) records what was
    scored and how labels were read."""
    return dataclasses.replace(cfg, behaviour=resolved_table(cfg.behaviour))


def _refuse_empty_openings(behaviour: Any) -> None:
    """An explicit empty target list would score nothing: the key is left out to mean the
    behaviour's own. (An empty anti-target list is how a resolved config says "none".)"""
    if isinstance(behaviour, dict) and isinstance(behaviour.get("targets"), (list, tuple)) and not behaviour["targets"]:
        raise ConfigError("config 'behaviour.targets' is an empty list; leave the key out to use the behaviour's "
                          "own targets, or list at least one opening")


def resolve(user: dict | None = None) -> Config:
    """Defaults ← preset ← ``user`` (a parsed TOML document)."""
    if user is not None and not isinstance(user, dict):
        raise ConfigError(f"a config must be a table of tables, got {type(user).__name__}")
    user = dict(user or {})
    preset = user.pop("preset", "default")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    base = PRESETS[preset]
    for name in user:
        if name not in TABLES:
            raise ConfigError(f"unknown config key '{name}' (known: {', '.join(['preset', *TABLES])})")
    _refuse_empty_openings(user.get("behaviour"))
    tables = {name: from_mapping(TABLES[name], values, getattr(base, name)) for name, values in user.items()}
    cfg = _with_behaviour_defaults(dataclasses.replace(base, preset=preset, **tables))
    check_across_tables(cfg)
    return cfg


LAYER_MODES = ("engine", "gradient")
"""The run modes that measure the mediation curve over `sae.layers`."""


def check_across_tables(cfg: Config) -> None:
    """Settings of different tables that cannot go together."""
    if cfg.sae.layers and cfg.run.mode not in LAYER_MODES:
        raise ConfigError(f"config 'sae.layers' (mediation across layers) works in run.mode = "
                          f"{' or '.join(repr(m) for m in LAYER_MODES)}, not {cfg.run.mode!r}; "
                          "leave sae.layers out (or []) for a trajectory run")


def load(path: str | os.PathLike) -> Config:
    """Read and resolve a TOML config file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config path {path} is a directory, not a TOML file")
    try:
        user = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return resolve(user)


def identity(cfg: Config) -> dict[str, Any]:
    """Every setting that determines a run's outputs, as ``{"table.key": value}``: all fields
    but those a table marks ``OUTPUT_NEUTRAL`` (an opt-out, so a new field counts by default)."""
    out: dict[str, Any] = {"preset": cfg.preset}
    for name, tbl in cfg.tables().items():
        neutral = output_neutral(type(tbl))
        out |= {f"{name}.{k}": v for k, v in identity_mapping(tbl).items() if k not in neutral}
    return out


def digest(cfg: Config) -> str:
    """Hash of :func:`identity` (the run folder checks it on resume)."""
    d: dict[str, Any] = {}
    for dotted, value in identity(cfg).items():
        table_name, _, k = dotted.partition(".")
        if k:
            d.setdefault(table_name, {})[k] = value
        else:
            d[table_name] = value
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every key, in table order)."""
    lines = [f"preset = {json.dumps(cfg.preset)}"]
    for name, values in cfg.to_dict().items():
        if name == "preset":
            continue
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The README's configuration table, generated from the tables' field docstrings."""
    presets = "; ".join(f"`{k}`: {v}" for k, v in PRESET_DOCS.items())
    choices = " | ".join(f"`{p}`" for p in PRESETS)
    rows = ["| key | default | type | meaning |", "|---|---|---|---|",
            f"| `preset` | `\"default\"` | {_cell(choices)} | {_cell(presets)} |"]
    for name, cls in TABLES.items():
        docs, hints, defaults = field_docs(cls), typing.get_type_hints(cls), to_mapping(cls())
        for f in dataclasses.fields(cls):
            rows.append(f"| `{name}.{f.name}` | `{_cell(_toml_value(defaults[f.name]))}` | "
                        f"{_cell(describe(hints[f.name]))} | {_cell(docs.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table(), end="")
    else:
        print(to_toml(resolve({})), end="")
