"""Trajectory mode: the ``[train]`` fine-tune as it ran, each pair's share of every optimizer step
(:mod:`policytrace.train.trajectory`; docs/design.md, "Trajectory mode").

:meth:`TrajectoryMode.prepare` fine-tunes the run's pairs with the recipe (content-keyed under the
cache, or the folder ``train.records`` names: a ``policytrace finetune`` or Trainer-callback run),
takes the gradient-mode concepts' gradients at θ_0 and at each checkpoint, replays the run and
sums every pair's contributions; the attribution is cached beside the fine-tune's key, so a
resumed run does not replay again. The shards read their pairs' rows; the frames are gradient
mode's (every output to first order, ``mode = "trajectory"``). :meth:`finish` writes
``completeness.parquet`` (the final model's measured behaviour change beside the sum of the pairs'
attributions, overall and per probe category) and ``trajectory_steps.parquet`` (every step's
batch members and their contributions: which steps and epochs did the work).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ..._files import digest_file, write_atomic
from ...errors import ConfigError, InvalidValueError, NonFiniteError
from ...gradients.concept_pass import ProbeSide, concept_rows
from ...gradients.projection import projector
from ..distributed import SINGLE, Ranks
from ..rundir import RunDir
from ..stages import BaseState
from . import gradient as gm
from .base import Bar, Finished, Log, Mode, Prepared, RunScores, ShardFrames

COMPLETENESS_MARGIN = 0.20
"""|Σ pair attributions + decay − measured| / |measured| above which the run warns (issue 21's goal)."""


@dataclass(frozen=True)
class TrajectorySetup(Prepared):
    names: list[str]
    """The concepts (gradient mode's list)."""
    values: dict[str, np.ndarray]
    """Pair id -> (C,) contributions."""
    folder: Path
    """The fine-tune attributed."""
    cache: Path
    """The cached attribution (npz)."""
    seconds: dict

    def marker(self) -> tuple[str, dict]:
        return "trajectory", {"finetune": str(self.folder), "seconds": self.seconds, "concepts": len(self.names)}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_examples(state: BaseState, pairs: pl.DataFrame):
    from ...train.finetuning import pair_examples

    return pair_examples(state.model.lm.tokenizer, pairs, state.cfg.train.max_length)


def finetune_folder(state: BaseState, pairs: pl.DataFrame, log: Log, progress: bool) -> Path:
    """The fine-tune of ``pairs`` with the recipe: ``train.records``, or run (once) into the cache."""
    from ...model.loading import load_model_cfg
    from ...train.finetuning import examples_digest, finetune, intact

    cfg = state.cfg
    if cfg.train.lora > 0:
        raise ConfigError("config 'train.lora' > 0: trajectory mode attributes full-weight fine-tunes (set train.lora "
                          "= 0 and train.params to the tensors to train); LoRA fine-tunes run with policytrace finetune")
    if cfg.train.records:
        return Path(cfg.train.records).expanduser()
    ids, exs = run_examples(state, pairs)
    key = _key(state.model.lm.identity, ids, examples_digest(exs, np.ones(len(exs))), cfg.train.recipe(),
               {"dtype": cfg.model.dtype})
    folder = cfg.run.cache_path() / "finetunes" / key
    if intact(folder) is None:
        log(f"trajectory mode: fine-tuning {len(ids)} pairs with the [train] recipe into {folder}")
        lm = load_model_cfg(cfg.model)  # a copy of its own: the run's model stays at θ_0
        finetune(cfg, exs, folder, progress=progress, ids=ids, log=log, model=lm)
        del lm
    return folder


def grads_fn(state: BaseState, names: list[str], shapes: dict, cx: np.ndarray, cy: np.ndarray, progress: bool):
    m = state.model
    side = ProbeSide(m.runner, m.reader, m.probe_tokens, state.features.columns, state.features.gated)
    wide = next(iter(m.engine.base.values())).dtype == torch.float64
    proj = projector({n: torch.Size(shapes[n]) for n in names}, 0, 0, state.cfg.model.device)

    def fn() -> torch.Tensor:
        return concept_rows(m.engine.model, names, side, cx, cy, proj, torch.float64 if wide else torch.float32,
                            state.cfg.gradient.token_budget, progress)

    return fn


def attribution(state: BaseState, pairs: pl.DataFrame, log: Log, progress: bool) -> tuple[Path, Path, dict]:
    """The cached attribution of ``pairs``' fine-tune (computed when missing): (folder, cache, arrays)."""
    from ...train.trajectory import Replay, attribute, concept_gradients_at_points, load_records, recorded_examples

    folder = finetune_folder(state, pairs, log, progress)
    rec = load_records(folder)
    cs = gm.concept_list(state)
    from ..config import digest

    cache = state.cfg.run.cache_path() / "trajectory" / f"{_key(digest(state.cfg), digest_file(folder / 'records.json'), [c.name for c in cs])}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return folder, cache, {k: z[k] for k in z.files}
        except (OSError, ValueError):
            pass  # damaged: recomputed
    exs = recorded_examples(folder)
    check_finetune(state, pairs, folder, rec, exs, log)
    engine = state.model.engine
    fn = grads_fn(state, rec.names, rec.shapes, np.stack([c.cx for c in cs]), np.stack([c.cy for c in cs]), progress)
    pad = state.model.lm.tokenizer.pad_token_id or 0
    tcfg = state.cfg.train
    G = concept_gradients_at_points(Replay(engine.model, rec, exs, pad), rec, fn, log, tcfg.concept_path)
    att = attribute(engine.model, rec, exs, pad, fn, progress=progress, log=log, G=G, path=tcfg.concept_path,
                    second_moment=tcfg.second_moment)
    rows = att.step_rows
    shares = att.values if att.shares is None else att.shares
    values, simulated = att.values, None
    if tcfg.pair_value == "counterfactual":
        values, simulated = counterfactual(engine.model, rec, exs, pad, G, tcfg, log, progress)
    arrays = {"ids": np.array(rec.ids), "values": values, "decay": att.decay, "path": att.path, "shares": shares,
              **({"simulated": simulated} if simulated is not None else {}),
              "names": np.array([c.name for c in cs]),
              "step": np.array([r[0] for r in rows], dtype=np.int64), "epoch": np.array([r[1] for r in rows], dtype=np.int64),
              "example": np.array([r[2] for r in rows], dtype=np.int64),
              "contrib": np.stack([r[3] for r in rows]) if rows else np.zeros((0, len(cs))),
              "lr": np.array([rec.steps[r[0] - 1]["lr"] for r in rows]),
              "seconds": np.array([att.seconds["concept_gradients"], att.seconds["replay"]])}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, buf.getvalue())
    return folder, cache, arrays


def check_finetune(state: BaseState, pairs: pl.DataFrame, folder: Path, rec, exs: list, log: Log) -> None:
    """The fine-tune in ``folder`` is one this run can attribute: it trained on these pairs' tokens
    (or is a Trainer run from this model), full weights of tensors the model has."""
    want = pairs["id"].to_list()
    missing = sorted(set(want) - set(rec.ids))
    if missing:
        raise InvalidValueError(f"{folder} did not train on {len(missing)} of the run's pairs (e.g. '{missing[0]}'); "
                                "point train.records at the fine-tune of these pairs, or leave it empty")
    by_id = dict(zip(rec.ids, exs))
    engine = state.model.engine
    if "callback" in rec.extra:
        # the user's own Trainer run: its examples are the tokens its chat template, loss mask and
        # collator made (examples.json); the run's model must be the one it started from
        check_base(folder, rec, engine)
        log(f"trajectory mode: {folder} is a Trainer run recorded by RecordingCallback; its own tokens and loss "
            "mask are attributed")
    else:
        _, mine = run_examples(state, pairs)
        for pid, e in zip(want, mine):
            if by_id[pid] != e:
                raise InvalidValueError(f"pair '{pid}': the fine-tune in {folder} trained on other tokens than this "
                                        "run reads (another chat template, loss mask or max_length)")
    if state.cfg.train.pair_value == "counterfactual" and "callback" in rec.extra:
        # the simulator re-forms batches and loss weights from the recipe; a Trainer's collator
        # and loss may differ, so the simulated retrains would not be that run's
        raise ConfigError(f"{folder} is a Trainer run recorded by RecordingCallback: train.pair_value = "
                          "\"counterfactual\" simulates retrains with policytrace's own recipe; use \"share\"")
    if rec.recipe.lora > 0:
        raise ConfigError(f"{folder} is a LoRA fine-tune; trajectory mode attributes full-weight fine-tunes")
    params = dict(engine.model.named_parameters())
    bad = [n for n in rec.names if n not in params]
    if bad:
        raise InvalidValueError(f"{folder} trained tensors this model does not have (e.g. '{bad[0]}'): a fine-tune "
                                "of another model")


def counterfactual(model, rec, exs, pad: int, G: list, tcfg, log: Log, progress: bool):
    """(P, C) the pairs' values from simulated subset retrains, and (C,) the simulated full run's change."""
    from ...train.counterfactual import counterfactual_values, mean_path_gradient, pair_gradients
    from ...train.trajectory import Replay, flat

    replay = Replay(model, rec, exs, pad)
    n = tcfg.simulations or max(1024, 8 * len(exs))
    log(f"trajectory: counterfactual pair values ({n} simulated subset retrains)")
    g = pair_gradients(replay, rec, progress)
    theta0 = flat(replay.base, rec.names).to(g.dtype)
    Gbar = mean_path_gradient(rec, G, tcfg.concept_path)
    return counterfactual_values(rec, exs, g, theta0, Gbar, n, tcfg.seed, progress)


def check_base(folder: Path, rec, engine) -> None:
    """A recorded Trainer run started from this run's model: its θ_0 (base.safetensors) is the
    model's own trained tensors."""
    from ...train.finetuning import load_tensors

    f = folder / "base.safetensors"
    if not f.is_file():
        raise InvalidValueError(f"{f} is missing: the Trainer run's records are incomplete; record it again")
    base = load_tensors(f)
    params = dict(engine.model.named_parameters())
    for n in rec.names:
        if n not in params:
            continue  # named below
        mine = params[n].detach().to(device="cpu", dtype=torch.float64)
        theirs = base[n].to(torch.float64)
        if mine.shape != theirs.shape or float((mine - theirs).abs().max()) > 1e-5 * max(1.0, float(theirs.abs().max())):
            raise InvalidValueError(f"{folder} is a Trainer run that started from other weights than model.name "
                                    f"(tensor '{n}' differs): set model.name (and model.dtype) to the model it fine-tuned")


def setup(state: BaseState, pairs: pl.DataFrame, log: Log, progress: bool) -> TrajectorySetup:
    folder, cache, a = attribution(state, pairs, log, progress)
    values = {pid: a["values"][i] for i, pid in enumerate(a["ids"].tolist())}
    secs = {"concept_gradients": float(a["seconds"][0]), "replay": float(a["seconds"][1])}
    return TrajectorySetup(a["names"].tolist(), values, folder, cache, secs)


@dataclass(frozen=True)
class _Names:
    names: list[str]


def frames(state: BaseState, ts: TrajectorySetup, rows: pl.DataFrame) -> ShardFrames:
    out = np.stack([ts.values[i] for i in rows["id"].to_list()]) if rows.height else np.zeros((0, len(ts.names)))
    if not np.isfinite(out).all():
        i = int(np.argwhere(~np.isfinite(out))[0][0])
        raise NonFiniteError(f"pair '{rows['id'][i]}' has a non-finite trajectory-mode output; check train.lr")
    f = gm.frames(state, _Names(ts.names), rows, out)
    return ShardFrames(f.pairs.with_columns(pl.lit(TrajectoryMode.name).alias("mode")), f.pair_behaviour,
                       f.pair_features)


def final_weights(state: BaseState, folder: Path) -> dict:
    from ...train.trajectory import checkpoint_dir, load_records
    from ...train.finetuning import load_tensors

    rec = load_records(folder)
    t = load_tensors(checkpoint_dir(rec, rec.S) / "trained.safetensors")
    base = state.model.engine.base
    return {**base, **{n: v.to(dtype=base[n].dtype, device=base[n].device) for n, v in t.items()}}


def completeness(state: BaseState, a: dict, folder: Path) -> tuple[pl.DataFrame, list[str]]:
    """Per probe set (all, each category): the measured mean Δy of the final model, the sum of the
    pairs' attributed dy, the decay of θ_0's part, the first-order path sum of the replayed
    updates, and the gap."""
    d = state.delta(final_weights(state, folder), "fine-tuned")
    names = a["names"].tolist()
    cats = state.inputs.categories
    rows, warnings = [], []
    groups = [("all", "dy_mean", np.ones(len(cats), dtype=bool))]
    groups += [(str(c), f"dy_cat:{c}", cats == c) for c in sorted(set(cats.tolist()), key=str)]
    for label, concept, mask in groups:
        j = names.index(concept)
        measured = float(d.dy[mask].mean())
        pairs_sum = float(a.get("shares", a["values"])[:, j].sum())  # shares add up; derivatives need not
        decay, path = float(a["decay"][j]), float(a["path"][j])
        simulated = float(a["simulated"][j]) if "simulated" in a else None
        gap = (pairs_sum + decay - measured) / abs(measured) if measured else float("nan")
        ok = bool(abs(gap) <= COMPLETENESS_MARGIN) if measured else False
        rows.append({"probes": label, "n_probes": int(mask.sum()), "measured_dy": measured,
                     "attributed_dy": pairs_sum, "decay_dy": decay, "path_dy": path, "simulated_dy": simulated,
                     "relative_gap": gap,
                     "within_margin": ok})
        if not ok:
            warnings.append(f"completeness ({label} probes): the pairs' attributions sum to {pairs_sum + decay:+.4g} "
                            f"against a measured change of {measured:+.4g} ({100 * gap:+.0f} %, margin "
                            f"{100 * COMPLETENESS_MARGIN:.0f} %); first order along the path gives {path:+.4g}")
    return pl.DataFrame(rows), warnings


def steps_frame(state: BaseState, a: dict) -> pl.DataFrame:
    names = a["names"].tolist()
    ids = a["ids"].tolist()
    c = a["contrib"]
    return pl.DataFrame({"step": a["step"], "epoch": a["epoch"], "lr": a["lr"],
                         "pair_id": [ids[i] for i in a["example"].tolist()],
                         "score": c[:, names.index("score_x")] + c[:, names.index("score_y")],
                         "dy_mean": c[:, names.index("dy_mean")], "mediated_dy": c[:, names.index("mediated_dy")]})




class TrajectoryMode(Mode[TrajectorySetup]):
    name = "trajectory"
    default_shard = 128
    fine_tune = "train"

    def prepare(self, state: BaseState, log: Log, progress: bool, ranks: Ranks = SINGLE) -> TrajectorySetup:
        return setup(state, state.inputs.pairs, log, progress)

    def shard(self, state: BaseState, prepared: TrajectorySetup, rows: pl.DataFrame, bar: Bar) -> ShardFrames:
        f = frames(state, prepared, rows)
        bar.update(rows.height)
        return f

    def finish(self, state: BaseState, rd: RunDir, log: Log) -> Finished:
        folder, _, a = attribution(state, state.inputs.pairs, log, False)
        comp, warnings = completeness(state, a, folder)
        for w in warnings:
            log(f"WARNING: {w}")
        files = {"completeness.parquet": rd.write_parquet("completeness.parquet", comp),
                 "trajectory_steps.parquet": rd.write_parquet("trajectory_steps.parquet", steps_frame(state, a))}
        by_epoch = steps_frame(state, a).group_by("epoch").agg(pl.col("dy_mean").sum()).sort("epoch")
        overall = comp.row(0, named=True)
        facts = {"finetune": str(folder), "completeness": {"measured_dy": overall["measured_dy"],
                                                           "attributed_dy": overall["attributed_dy"],
                                                           "decay_dy": overall["decay_dy"],
                                                           "relative_gap": overall["relative_gap"],
                                                           "margin": COMPLETENESS_MARGIN},
                 "dy_by_epoch": dict(zip([str(e) for e in by_epoch["epoch"].to_list()], by_epoch["dy_mean"].to_list())),
                 "warnings": warnings}
        return Finished(files, {"trajectory": facts})

    def facts(self, rd: RunDir) -> dict:
        m = rd.marker("stages/trajectory-rank0.json")
        return {"trajectory_seconds": m["seconds"]} if m else {}

    def retrainer(self, state: BaseState, seed: int, folder: Path):
        from ..validate.retrain import RecipeRetrainer

        return RecipeRetrainer(state, seed, folder)

    def validation(self, rd: RunDir, manifest: dict, state: BaseState, seed: int, log: Log,
                   progress: bool) -> RunScores:
        scores = gm.run_scores(state, rd.read_parquet("pairs.parquet"), seed)
        scores = {("score_trajectory" if k == "score_gradient" else k): v for k, v in scores.items()}

        def scorer(both: pl.DataFrame, planted: pl.DataFrame) -> dict:
            """The run's pairs and the planted ones fine-tuned together with the recipe, attributed."""
            ts = setup(state, both, log, progress)
            frame = frames(state, ts, both).pairs
            flag = state.inputs.behaviour.flag
            susp = state.inputs.behaviour.suspicion(frame.with_columns(pl.Series(flag, both[flag].to_list())))
            return {"score_trajectory": frame["score"].to_numpy(), "dy_mean": frame["dy_mean"].to_numpy(),
                    "pred_dy_mean": frame["pred_dy_mean"].to_numpy(),
                    "suspicion": susp["suspicion"].fill_null(0.0).to_numpy(),
                    "random": np.random.default_rng(seed + 1).normal(size=both.height)}

        return RunScores(scores, scorer)


def attribution_of_run(rd: RunDir, state: BaseState) -> dict:
    """The cached attribution arrays of a finished trajectory run (the report, validation)."""
    return attribution(state, state.inputs.pairs, rd.log, False)[2]


__all__ = ["COMPLETENESS_MARGIN", "TrajectoryMode", "attribution_of_run", "run_examples"]
