"""A full attribution job into a run folder: base stages, then the pairs in shards, then the
merge. Only the orchestration lives here; what a shard computes is the run's mode's
(:mod:`policytrace.pipeline.modes`), and every frame it returns has its schema
(:mod:`policytrace.numeric.frames`). Resumable at any moment (SIGKILL included): rerun the same command and it recomputes only
what is missing or damaged, ending with byte-identical outputs. Layout and guarantees:
:mod:`policytrace.pipeline.rundir` and docs/design.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from .. import _faults, _progress
from .._files import digest_bytes, digest_file
from ..behaviours import spec as behaviour_spec
from ..numeric._backend import available_cores, threads as core_threads
from ..errors import NonFiniteError, PolicytraceError, RunFolderError
from ..model.chat import token_pieces
from ..model.loading import default_model_location, model_identity
from ..model.sae import sae_identity
from ..numeric import summarize_interference
from ..numeric.frames import (INTERFERENCE_GROUPS_SCHEMA, INTERFERENCE_SCHEMA, PAIR_BEHAVIOUR_SCHEMA,
                              PAIR_FEATURES_SCHEMA, PAIR_LAYERS_SCHEMA, PAIRS_SCHEMA, Schema, empty)
from . import config as cfgmod
from .config import Config
from .distributed import SINGLE, Ranks, finish, ranks_from_env, runtime_config
from .findings import gates, interference_findings, suspicion_findings
from .modes import Mode, ShardFrames, get_mode
from .rundir import FINAL_OUTPUTS, Fingerprint, RunDir, now
from .sources import source_files
from .stages import BasePass, BaseState, Inputs, ModelSide, base_pass, feature_contexts, load_inputs, prepare

Log = Callable[[str], None]
BASE_OUTPUTS = ("policy.parquet", "policy.json", "features.parquet", "probes.parquet")


def default_log(msg: str) -> None:
    print(f"[policytrace] {msg}", flush=True)


@dataclass
class Timings:
    """Wall-clock seconds per stage of this invocation (informational: kept in the manifest,
    never in an output)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        t = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + t - self._t, 3)
        self._t = t


def fingerprint(cfg: Config, inputs: Inputs) -> Fingerprint:
    """The config digest and the identity of every input a run folder depends on."""
    data = {kind: Path(path) if path else inputs.behaviour.shipped(kind)
            for kind, path in (("probes", cfg.data.probes), ("pairs", cfg.data.pairs))}
    if cfg.model.name:
        model = model_identity(cfg.model.name, cfg.model.gguf_file or None)
    else:
        folder, gguf = default_model_location()
        model = model_identity(str(folder), gguf)
    # The default SAE is a function of the config, the data and the model, all covered above.
    sae = sae_identity(cfg.sae) if cfg.sae.named else "default (trained from the inputs above)"
    inputs = {"probes": digest_source(data["probes"]), "pairs": digest_source(data["pairs"]), "model": model,
              "sae": sae}
    if cfg.sae.named and cfg.sae.extra_layers:  # the other layers' SAE folders (sae.paths)
        from ..model.config import SaeCfg

        inputs["sae_layers"] = " ".join(f"{v}:{sae_identity(SaeCfg(path=cfg.sae.path_of(v)))}"
                                        for v in cfg.sae.extra_layers)
    return Fingerprint(cfgmod.digest(cfg), inputs, _jsonable(cfgmod.identity(cfg)), thread_counts(cfg))


def digest_source(path: Path) -> str:
    """A data file's SHA-256; a folder's (shards, a datasets folder): that of its files' names
    and digests, in order."""
    if not path.is_dir():
        return digest_file(path)
    parts = [f"{f.relative_to(path).as_posix()} {digest_file(f)}" for f in source_files(path)]
    return digest_bytes("\n".join(parts).encode())


def thread_counts(cfg: Config) -> dict[str, int]:
    """The numeric core's and torch's thread counts in this process (0 = all cores resolved)."""
    import torch

    return {"core": core_threads(cfg.run.threads) or available_cores(), "torch": torch.get_num_threads()}


def _jsonable(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def cached_base_pass(rd: RunDir, progress: bool = False, readonly: bool = False) -> Callable[[ModelSide, Inputs], BasePass]:
    """The base probe pass from ``base.npz`` when its marker vouches for it, else computed and
    stored (the one expensive base stage). ``readonly``: a process that must not write (a rank
    other than 0) fails instead."""

    def get(model: ModelSide, inputs: Inputs) -> BasePass:
        # the other layers of sae.layers, read in the same pass, are stored beside H0
        extra = [f"H_layer{ls.layer}" for ls in model.layers]
        if rd.valid_marker("stages/base_pass.json") is not None:
            z = rd.read_npz("base.npz", ("H0", "y0", *extra))
            return BasePass(z["H0"], z["y0"], tuple(z[k] for k in extra))
        if readonly:
            raise RunFolderError(f"{rd.file('base.npz')} is missing or damaged though rank 0 wrote it; "
                                 "run the same command again")
        rd.log("base probe pass" + (f" (layers {', '.join(str(v) for v in sorted([model.hook.layer, *[ls.layer for ls in model.layers]]))})"
                                         if extra else ""))
        bp = base_pass(model, inputs.probes, progress)
        digest = rd.write_npz("base.npz", H0=bp.H0, y0=bp.y0, **dict(zip(extra, bp.H_layers)))
        rd.mark("stages/base_pass.json", {"files": {"base.npz": digest}})
        return bp

    return get


def write_base(rd: RunDir, state: BaseState, progress: bool = False) -> dict:
    """policy, features (with their readable contexts) and probes files, and the base stage's
    marker with its facts."""
    pol = state.policy
    # a resumed folder keeps the contexts its earlier process wrote (minutes of probe, pair and
    # corpus passes; the fingerprint already vouches that they came from these inputs)
    earlier = (rd.valid_marker("stages/base.json") or {}).get("files", {})
    probes = state.inputs.probes.with_columns(pl.Series("y", state.base.y0), pl.Series("y_pred", state.fit.pred))
    files = {
        "policy.parquet": rd.write_parquet("policy.parquet", pol.to_frame()),
        "features.parquet": rd.write_parquet("features.parquet", state.features.frame),
        "probes.parquet": rd.write_parquet("probes.parquet", probes),
    }
    pol.save(rd.file("policy.json"))
    files["policy.json"] = digest_file(rd.file("policy.json"))
    files |= (rd.marker("stages/base_pass.json") or {}).get("files", {})
    files["pair_data.parquet"] = rd.write_parquet("pair_data.parquet", pair_data(state))
    if state.cfg.features.contexts and "feature_contexts.parquet" in earlier:
        files["feature_contexts.parquet"] = earlier["feature_contexts.parquet"]
    elif state.cfg.features.contexts:
        rd.log("feature contexts (probes, pairs, corpus)")
        files["feature_contexts.parquet"] = rd.write_parquet("feature_contexts.parquet",
                                                             feature_contexts(state, progress))
    facts = {"n_probes": probes.height, "n_features": int(len(state.features.columns)), "lam": pol.lam,
             "behaviour": behaviour_spec(state.cfg.behaviour), "sae_quality": state.model.sae_quality,
             "probe_fvu": state.features.probe_fvu, "fidelity": state.fit.fidelity,
             "warnings": [*state.inputs.warnings, *gates(state)]}
    for w in facts["warnings"]:
        rd.log(f"WARNING: {w}")
    rd.mark("stages/base.json", {"files": files, "facts": facts})
    return {"files": files, "facts": facts}


def pair_data(state: BaseState) -> pl.DataFrame:
    """The run's pairs for the report's drill-downs, with what each trained on: its chat tokens
    as text pieces (they join to the rendered conversation) and the loss mask over them."""
    toks = state.model.pair_tokens
    tok = state.model.lm.tokenizer
    return state.inputs.pairs.with_columns(
        pl.Series("tokens", [token_pieces(tok, t) for t in toks], dtype=pl.List(pl.Utf8)),
        pl.Series("loss_mask", [list(t.mask) for t in toks], dtype=pl.List(pl.Boolean)))


def shard_rows(pairs: pl.DataFrame, batch: int) -> list[pl.DataFrame]:
    return [pairs[i : i + batch] for i in range(0, pairs.height, batch)]


FRAME_SCHEMAS: dict[str, Schema] = {"pair_features": PAIR_FEATURES_SCHEMA, "pairs": PAIRS_SCHEMA,
                                    "pair_behaviour": PAIR_BEHAVIOUR_SCHEMA, "pair_layers": PAIR_LAYERS_SCHEMA}
"""A shard's frames, in the order their files are written."""


def write_shard(rd: RunDir, mode: Mode, shard: int, ids: list[str], frames: ShardFrames, started: float) -> dict:
    """The shard's files (deltas, if the mode measured them, then its frames), then its marker;
    nothing is written when a frame holds a non-finite value."""
    named = {name: getattr(frames, name) for name in FRAME_SCHEMAS if getattr(frames, name) is not None}
    for name, f in named.items():
        _check_finite(f, f"shard {shard} ({name})")
    files = {}
    if frames.deltas is not None:
        d = frames.deltas
        files[rd.shard_file("deltas", shard)] = rd.write_npz(rd.shard_file("deltas", shard), dX=d.dX, dy=d.dy,
                                                             ids=np.array(d.ids))
    files |= {rd.shard_file(name, shard): rd.write_parquet(rd.shard_file(name, shard), f) for name, f in named.items()}
    _faults.checkpoint("before-shard-marker")
    record = {"shard": shard, "pairs": ids, "files": files, "seconds": round(time.perf_counter() - started, 3),
              "mode": mode.name}
    rd.mark(rd.shard_marker(shard), record)
    return record


def _check_finite(frame: pl.DataFrame, where: str) -> None:
    floats = [c for c, t in frame.schema.items() if t.is_float()]
    bad = frame.select(pl.col(floats).is_nan().any() | pl.col(floats).is_infinite().any()).row(0)
    for col, is_bad in zip(floats, bad):
        if is_bad:
            raise NonFiniteError(f"{where}: column `{col}` holds NaN or inf; nothing was written for it "
                                 "(check the update's learning rate and the model's dtype)")


def run_pairs(rd: RunDir, state: BaseState, log: Log, progress: bool, ranks: Ranks = SINGLE) -> None:
    """This process's shards (``i % world == rank``), skipping those whose marker vouches for
    intact files."""
    mode = get_mode(state.cfg.run.mode)
    shards = shard_rows(state.inputs.pairs, mode.shard_size(state.cfg))
    mine = [i for i in range(len(shards)) if ranks.owns(i)]
    todo = [i for i in mine if rd.valid_marker(rd.shard_marker(i)) is None]
    if mode.collective:
        # Preparing is a collective call, so all ranks take part while any shard is left, rank 0
        # deciding (every rank must make the same call); its own shards were checked above.
        left = ranks.broadcast(bool(todo) or any(rd.valid_marker(rd.shard_marker(i)) is None
                                                 for i in range(len(shards)) if not ranks.owns(i))
                               if ranks.main else None)
    else:
        left = bool(todo)
    if not left:
        return
    prepared = mode.prepare(state, log, progress, ranks)
    stage = prepared.marker()
    if stage is not None:
        rd.mark(f"stages/{stage[0]}-rank{ranks.rank}.json", {"files": {}, **stage[1]})
    total = sum(len(shards[i]) for i in mine)
    bar = _progress.bar(total, "pair", progress, initial=total - sum(len(shards[i]) for i in todo))
    for i in todo:
        t = time.perf_counter()
        write_shard(rd, mode, i, shards[i]["id"].to_list(), mode.shard(state, prepared, shards[i], bar), t)
    bar.close()


def _merged(rd: RunDir, markers: list[dict], name: str) -> pl.DataFrame:
    """The shards' ``name`` frames in shard order; the schema's empty frame when none has one."""
    parts = [rd.read_parquet(rd.shard_file(name, m["shard"])) for m in markers
             if rd.shard_file(name, m["shard"]) in m["files"]]
    return pl.concat(parts, how="vertical_relaxed") if parts else empty(FRAME_SCHEMAS[name])


def merge(rd: RunDir, state: BaseState, markers: list[dict]) -> dict[str, str]:
    """The final files from the shards (their markers were verified), with the findings that
    need every pair: interference against chance, suspicion."""
    frames = {name: _merged(rd, markers, name) for name in FRAME_SCHEMAS}
    pf = frames["pair_features"]
    for name, f in frames.items():
        _check_finite(f, name)
    fg = state.features.frame.select("feature_id", pl.col("group").alias("feature_group"))
    if pf.height:
        summary = summarize_interference(pf, frames["pairs"], fg)
        pairs, groups = interference_findings(state, pf, frames["pairs"], state.cfg.run.seed)
    else:  # a mode without per-feature shifts (gradient.per_feature off): nothing to interfere
        summary, pairs, groups = empty(INTERFERENCE_SCHEMA), frames["pairs"], empty(INTERFERENCE_GROUPS_SCHEMA)
    pairs = suspicion_findings(state, pairs)
    for col in empty_columns(pairs):
        rd.log(f"WARNING: pairs.parquet column `{col}` is null for every pair"
               + (f" ({pairs['suspicion_reason'][0]})" if col.startswith("suspicion") else ""))
    out = {f"{name}.parquet": rd.write_parquet(f"{name}.parquet", f)
           for name, f in (("pair_features", pf), ("pairs", pairs), ("pair_behaviour", frames["pair_behaviour"]),
                           ("interference", summary), ("interference_groups", groups))}
    assert set(out) == set(FINAL_OUTPUTS)
    if state.layers:  # mediation across layers: only runs with sae.layers write it
        out["pair_layers.parquet"] = rd.write_parquet("pair_layers.parquet", frames["pair_layers"])
    return out


def write_layers(rd: RunDir, state: BaseState) -> tuple[dict[str, str], dict]:
    """``layers.parquet`` (the mediation curve) and its manifest facts; nothing in a one-layer run."""
    if not state.layers:
        return {}, {}
    from .layers import curve

    frame, facts = curve(state, rd.read_parquet("pair_layers.parquet"))
    if facts["best_layer"] is not None:
        share = facts["mediated_share"][str(facts["best_layer"])]
        rd.log(f"mediation across layers: the most at layer {facts['best_layer']} (mediated share "
               f"{share:.3g} of the summed change; " + ", ".join(
                   f"L{k} {'–' if v is None else f'{v:.3g}'}" for k, v in facts["mediated_share"].items()) + ")")
    return {"layers.parquet": rd.write_parquet("layers.parquet", frame)}, {"layers": facts}


def empty_columns(frame: pl.DataFrame) -> list[str]:
    """Columns null in every row: never written without a word (the log and the manifest)."""
    return [c for c in frame.columns if frame.height and frame[c].null_count() == frame.height]


def _open(rd: RunDir, cfg: Config, inputs: Inputs, ranks: Ranks) -> dict | None:
    """Rank 0 checks and prepares the folder; every rank gets its verdict (or its error)."""
    verdict: Any = None
    if ranks.main:
        try:
            verdict = ("complete", rd.open_for_run(fingerprint(cfg, inputs), cfgmod.to_toml(cfg)))
        except PolicytraceError as e:
            verdict = ("error", e)
    kind, value = ranks.broadcast(verdict)
    if kind == "error":
        raise value
    return value


def _base_state(rd: RunDir, cfg: Config, inputs: Inputs, ranks: Ranks, log: Log, progress: bool, clock: Timings):
    """Rank 0 computes and writes the base stages; the others wait, then read them."""
    base = None
    if ranks.main:
        state = prepare(cfg, log, progress, cached_base=cached_base_pass(rd, progress), inputs=inputs, timer=clock.lap)
        base = write_base(rd, state, progress)
        clock.lap("base_outputs")
    ranks.barrier()
    if not ranks.main:
        state = prepare(cfg, lambda _m: None, False, cached_base=cached_base_pass(rd, readonly=True), inputs=inputs)
    return state, base


def execute(cfg: Config, run_dir: str | Path, log: Log = default_log, progress: bool = True) -> dict:
    """Run (or resume, or confirm) the job of ``cfg`` in ``run_dir``; returns the manifest.
    Under torchrun every rank calls this (pipeline.distributed); rank 0 returns the manifest,
    the others ``{"status": "complete", "rank": r}``."""
    ranks = ranks_from_env(cfg.model.device)
    rd = RunDir(run_dir, log if ranks.main else (lambda _m: None))
    clock = Timings()
    inputs = load_inputs(cfg)
    finished = _open(rd, cfg, inputs, ranks)
    if finished is not None:
        if ranks.main:
            log(f"{rd.path} is complete; nothing to do")
        finish(ranks)
        return finished if ranks.main else {"status": "complete", "rank": ranks.rank}
    started = now()
    if ranks.main:
        rd.write_manifest({"config_digest": cfgmod.digest(cfg), "status": "started", "created": started})
    clock.lap("inputs")
    state, base = _base_state(rd, runtime_config(cfg, ranks), inputs, ranks, log, progress, clock)
    run_pairs(rd, state, log, progress and ranks.main, ranks)
    clock.lap("pairs")
    ranks.barrier()
    if not ranks.main:
        finish(ranks)
        return {"status": "complete", "rank": ranks.rank}
    manifest = complete(rd, state, base, clock, started, ranks.world)
    finish(ranks)
    return {"version": 2, **manifest}


def complete(rd: RunDir, state: BaseState, base: dict, clock: Timings, started: str, processes: int) -> dict:
    """Rank 0, every shard done: the merge, the mode's own final files, the manifest."""
    cfg, mode = state.cfg, get_mode(state.cfg.run.mode)
    markers = collect_markers(rd, state)
    files = merge(rd, state, markers)
    layer_files, layer_stage = write_layers(rd, state)
    files |= layer_files
    clock.lap("merge")
    done = mode.finish(state, rd, rd.log)
    if done.files:
        clock.lap("finish")
    manifest = {
        "config_digest": cfgmod.digest(cfg), "status": "complete", "created": started, "finished": now(),
        "stages": {"base": base["facts"], "pairs": _pair_facts(markers) | mode.facts(rd) | {"mode": mode.name}
                   | _empty(rd), **layer_stage, **done.stages},
        "shards": {str(m["shard"]): {"pairs": len(m["pairs"])} for m in markers},
        "files": {**base["files"], **files, **done.files},
        "seconds": clock.seconds, "processes": processes,
    }
    rd.write_manifest(manifest)
    rd.log(f"done in {sum(clock.seconds.values()):.0f} s: {rd.path}")
    return manifest


def collect_markers(rd: RunDir, state: BaseState) -> list[dict]:
    """Every shard's marker, each vouching for intact files (the other ranks wrote theirs)."""
    out = []
    for i in range(len(shard_rows(state.inputs.pairs, get_mode(state.cfg.run.mode).shard_size(state.cfg)))):
        rec = rd.valid_marker(rd.shard_marker(i))
        if rec is None:
            raise RunFolderError(f"{rd.path}: shard {i} was not finished by any process; run the same command again")
        out.append(rec)
    return out


def _empty(rd: RunDir) -> dict:
    empty = empty_columns(rd.read_parquet("pairs.parquet"))
    return {"empty_columns": empty} if empty else {}


def _pair_facts(markers: list[dict]) -> dict:
    n = sum(len(m["pairs"]) for m in markers)
    secs = sum(m.get("seconds", 0.0) for m in markers)
    return {"n_pairs": n, "shards": len(markers), "seconds_per_pair": round(secs / n, 3) if n else None}


def run(config: Config | dict | str | Path, run_dir: str | Path, progress: bool = True, log: Log = default_log) -> dict:
    """A config object, a TOML table or a TOML path → the run's manifest."""
    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = cfgmod.load(config)
    else:
        cfg = cfgmod.resolve(config)
    return execute(cfg, run_dir, log=log, progress=progress)
