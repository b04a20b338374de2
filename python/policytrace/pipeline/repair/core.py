"""The orchestration of one repair (the package docstring says what it does)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
from ..._files import digest_file, write_atomic
from ..._tables import to_mapping
from ...errors import ConfigError, RunFolderError
from ..modes import get_mode
from ..rundir import RunDir
from ..selection import Selection, matched_random, select
from ..stages import BaseState
from .config import RepairCfg, UnlearnCfg
from .measure import Meter, moved_back, pair_rows
from .methods import first_order, retrain, unlearn
from .recipe import Finetuned, SequentialRecipe, TrainRecipe, cached_finetune, load_weights, save_model
from .table import pair_table, ranked

VERSION = 1
RESERVED = ("finetuned",)


def _open(run_dir: str | Path, log, progress: bool) -> tuple[RunDir, dict, BaseState]:
    from ..validate import open_state

    return open_state(run_dir, log, progress)


def repair_name(method: str, how: dict, cfg: RepairCfg, unlearn_cfg: UnlearnCfg, probes2: str | None,
                recipe: str = "auto") -> str:
    blob = json.dumps([how, to_mapping(cfg), to_mapping(unlearn_cfg), probes2] + ([recipe] if recipe != "auto" else []),
                      sort_keys=True, default=str)
    return f"{method}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _recipe(rd: RunDir, state: BaseState, kind: str = "auto"):
    """The recipe the run's model was fine-tuned with: ``train`` = its ``[train]`` table (the
    default for a trajectory-mode run), ``sequential`` = its per-pair ``[update]`` taken pair after
    pair (the default otherwise; what ``validate`` retrains with)."""
    cfg = state.cfg
    if kind not in ("auto", "sequential", "train"):
        raise ConfigError(f"--recipe {kind!r} must be auto, sequential or train")
    if kind == "train" or (kind == "auto" and get_mode(cfg.run.mode).fine_tune == "train"):
        if getattr(cfg, "train", None) is None:
            raise ConfigError("--recipe train needs a [train] table (policytrace with issue 21's recipe)")
        if cfg.train.lora > 0:
            raise ConfigError("policytrace repair does not yet repair LoRA fine-tunes (train.lora > 0)")
        return TrainRecipe(cfg, state.model.lm, rd.file("repairs/.work"))
    if cfg.update.lora_rank > 0:
        raise ConfigError("policytrace repair does not yet repair LoRA runs (update.lora_rank > 0): the repaired "
                          "weights would be adapters, not a model folder")
    return SequentialRecipe.for_run(state.model.engine, state.inputs.pairs["id"].to_list(), cfg.run.seed)


def finetuned(rd: RunDir, state: BaseState, log, progress: bool,
              track: dict[str, set[str]] | None = None, recipe_kind: str = "auto") -> tuple[Finetuned, float]:
    """The run's fine-tuned model (and its seconds). With ``track``, the fine-tune is fitted
    again with those selections' steps recorded, which gives first-order removal its records."""
    recipe = _recipe(rd, state, recipe_kind)
    rows = pair_rows(state)
    lm = state.model.lm
    identity = {"fingerprint": rd.read_json("fingerprint.json").get("config_digest")}
    t = time.perf_counter()
    if track and isinstance(recipe, TrainRecipe):
        track = None  # a [train] fine-tune has its trajectory records; nothing to refit
    folder = rd.file(f"repairs/finetuned-{recipe.describe()['kind']}")
    if isinstance(recipe, TrainRecipe):
        return _train_finetuned(rd, state, recipe, rows, log, progress), time.perf_counter() - t
    params, info = cached_finetune(folder, recipe, rows, lm.model, lm.tokenizer, identity, log, progress)
    records = None
    if track:
        log(f"recording the steps of {len(track)} selections: the recipe once more on all {len(rows)} pairs")
        again, sums = recipe.fit(rows, progress=progress, track=track)
        by_members = {frozenset(track[k]): v for k, v in sums.items()}

        def records(ids: list[str], _by=by_members) -> dict:
            key = frozenset(ids)
            if key not in _by:
                raise ConfigError(f"no steps were recorded for the selection of {len(ids)} pairs")
            return _by[key]

        params = again
    return Finetuned(params, recipe, folder, records, info), time.perf_counter() - t


def _train_finetuned(rd: RunDir, state: BaseState, recipe: TrainRecipe, rows: list[dict], log,
                     progress: bool) -> Finetuned:
    """A ``[train]`` fine-tune and its trajectory records: the folder ``train.records`` names (the
    fine-tune the run attributed), else the run's pairs fine-tuned with the recipe once into
    ``RUN/repairs/finetuned-train/`` (kept: its records and checkpoints)."""
    from ...train.finetuning import intact

    lm = state.model.lm
    given = state.cfg.train.records
    folder = Path(given) if given else rd.file("repairs/finetuned-train")
    if given:
        if intact(folder) is None:
            raise RunFolderError(f"train.records = {given!r} is not a finished `policytrace finetune` folder")
        log(f"fine-tuned model: {folder / 'model'} (train.records)")
    else:
        log(f"fine-tuned model: the run's pairs with its [train] recipe in {folder} (reused when finished)")
        try:
            recipe.fit_into(folder, rows, [1.0] * len(rows), progress)
        except RunFolderError:  # a finished fine-tune of another recipe: replaced
            import shutil

            shutil.rmtree(folder)
            recipe.fit_into(folder, rows, [1.0] * len(rows), progress)
    params = load_weights(folder / "model", lm.model)
    info = {"digest": digest_file(folder / "model" / "model.safetensors"), "folder": str(folder)}
    return Finetuned(params, recipe, folder, recipe.records(folder, rows), info)


def _band(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def _causal(result: dict, controls: list[dict], base: dict, ft: dict) -> dict:
    """Per probe set: how far the repair moved the mean score back, the controls' band of the
    same, and their ratio (the repair's move over the controls' mean move)."""
    out = {}
    for name in result["behaviour"]:
        back = result["moved_back"][name]["back"]
        band = _band([c["moved_back"][name]["back"] for c in controls])
        ratio = back / band["mean"] if band.get("n") and band["mean"] != 0 else None
        z = (back - band["mean"]) / band["sd"] if band.get("n", 0) > 1 and band["sd"] > 0 else None
        out[name] = {"finetune_change": ft[name]["mean"] - base[name]["mean"], "back": back,
                     "fraction": result["moved_back"][name]["fraction"], "controls": band, "ratio": ratio, "z": z}
    return out


def repair(run_dir: str | Path, how: dict, cfg: RepairCfg | None = None, unlearn_cfg: UnlearnCfg | None = None, *,
           name: str | None = None, probes2: str | None = None, record_steps: bool = False, recipe: str = "auto",
           progress: bool = True,
           log: Callable[[str], None] = print, opened: tuple[RunDir, dict, BaseState] | None = None) -> dict:
    """One repair of a finished run (module docstring); ``how`` are :func:`~policytrace.
    pipeline.selection.select`'s keywords. Returns the ``repair.json`` document."""
    cfg = cfg if cfg is not None else RepairCfg()
    unlearn_cfg = unlearn_cfg if unlearn_cfg is not None else UnlearnCfg()
    rd, manifest, state = opened if opened is not None else _open(run_dir, log, progress)
    name = name or repair_name(cfg.method, how, cfg, unlearn_cfg, probes2, recipe)
    if name.startswith(RESERVED) or "/" in name or name.startswith("."):
        raise ConfigError(f"--name {name!r} is not a usable repair name (reserved: {', '.join(RESERVED)}; no '/')")
    table = ranked(pair_table(rd, state.cfg, state.inputs), how)
    sel = select(table, **how)
    controls = [matched_random(table, sel, cfg.seed + 1 + i, strata=cfg.strata) for i in range(cfg.controls)]
    selections: list[tuple[str, Selection]] = [("selected", sel)] + [(f"control-{i}", c) for i, c in enumerate(controls)]
    track = {k: set(s.ids) for k, s in selections} if record_steps and cfg.method == "first-order" else None
    timings: dict = {}
    ft, timings["finetune_s"] = finetuned(rd, state, log, progress, track, recipe)
    meter = Meter.for_run(state, probes2)
    rows = pair_rows(state)
    t = time.perf_counter()
    base_beh, ft_beh = meter.behaviour(None), meter.behaviour(ft.params)
    ft_pair_loss = {r["id"]: meter.pair_loss(ft.params, [r]) for r in rows}
    ft_heldout = meter.heldout_loss(ft.params)
    timings["measure_finetuned_s"] = time.perf_counter() - t
    base_mean = base_beh["probes"]["mean"]
    results = []
    for label, s in selections:
        log(f"{cfg.method} on {label} ({len(s)} pairs)")
        t = time.perf_counter()
        params, details = _apply(cfg, unlearn_cfg, ft, meter, rows, list(s.ids), base_mean, str(rd.path), progress)
        timings[f"{label}_s"] = time.perf_counter() - t
        res = _measure(meter, params, rows, list(s.ids), ft_pair_loss, base_beh, ft_beh) | {"how": s.how,
                                                                                         "details": details}
        if label == "selected":
            res["model_digest"] = save_model(rd.file(f"repairs/{name}/model"), state.model.lm.model,
                                             state.model.lm.tokenizer, params)
        timings[f"{label}_with_measure_s"] = time.perf_counter() - t
        results.append(res)
        del params
    doc = {
        "version": VERSION,
        "run": {"config_digest": rd.read_json("fingerprint.json").get("config_digest"),
                "behaviour": state.inputs.behaviour.name, "mode": state.cfg.run.mode, "pairs": len(rows)},
        "method": cfg.method, "settings": to_mapping(cfg),
        "unlearn": to_mapping(unlearn_cfg) if cfg.method == "unlearn" else None,
        "recipe": ft.recipe.describe(), "record_steps": bool(track),
        "probes2": Path(probes2).name if probes2 else None,
        "selection": results[0]["how"] | {"size": len(sel), "ids": list(sel.ids)},
        "base": {"behaviour": base_beh},
        "finetuned": {"behaviour": ft_beh, "heldout_loss": ft_heldout, "digest": ft.info.get("digest")},
        "repaired": results[0], "controls": results[1:],
        "causal": _causal(results[0], results[1:], base_beh, ft_beh),
    }
    return _write(rd, doc, timings, name)


def _apply(cfg: RepairCfg, unlearn_cfg: UnlearnCfg, ft, meter: Meter, rows: list[dict], ids: list[str],
           base_mean: float, run_name: str, progress: bool) -> tuple:
    """The repair method on one selection: (the repaired weights, the method's details)."""
    chosen = set(ids)
    if cfg.method == "retrain":
        return retrain(ft, rows, chosen, cfg.weight, progress)
    if cfg.method == "first-order":
        return first_order(ft, ids, run_name)
    by_id = {r["id"]: r for r in rows}
    return unlearn(ft, meter, [by_id[i] for i in ids], [r for r in rows if r["id"] not in chosen],
                   unlearn_cfg, cfg.seed, base_mean, progress)


def _measure(meter: Meter, params, rows: list[dict], ids: list[str], ft_pair_loss: dict, base_beh: dict,
             ft_beh: dict) -> dict:
    """What one repaired model does: its behaviour, how far it moved back, its cost (loss on the
    kept and the selected pairs, beside the fine-tuned model's, and on the held-out text)."""
    chosen = set(ids)
    by_id = {r["id"]: r for r in rows}
    kept = [r for r in rows if r["id"] not in chosen]
    beh = meter.behaviour(params)
    return {
        "ids": ids, "behaviour": beh,
        "moved_back": {k: moved_back(base_beh[k]["mean"], ft_beh[k]["mean"], beh[k]["mean"]) for k in beh},
        "kept_loss": meter.pair_loss(params, kept),
        "finetuned_kept_loss": float(np.mean([ft_pair_loss[r["id"]] for r in kept])) if kept else None,
        "selected_loss": meter.pair_loss(params, [by_id[i] for i in ids]),
        "finetuned_selected_loss": float(np.mean([ft_pair_loss[i] for i in ids])),
        "heldout_loss": meter.heldout_loss(params),
    }


def _write(rd: RunDir, doc: dict, timings: dict, name: str) -> dict:
    folder = rd.file(f"repairs/{name}")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "repair.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    write_atomic(folder / "timings.json", json.dumps(timings, indent=1, sort_keys=True) + "\n")
    doc["folder"] = str(folder)
    return doc
