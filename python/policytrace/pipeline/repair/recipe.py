"""How a run's model was fine-tuned, so that a repair can fine-tune it again without (or with less
of) some pairs, and the fine-tuned weights a repair starts from.

A :class:`Recipe` fits weights from the base model on a list of pair rows with per-pair loss
weights. :class:`SequentialRecipe` is the recipe a run in engine or gradient mode implies (the
one ``validate`` retrains with): the run's ``[update]`` taken pair after pair from the base
weights, every pair once, in one seeded order of *all* the run's pairs; a retraining without some
pairs skips them in that same order, so it differs from the fine-tune only in those pairs.
While fitting, it can add up the steps that chosen sets of pairs took (``track``): the exact
record a first-order removal subtracts (:class:`TrackedSteps`).

The fine-tuned model of such a run is ``SequentialRecipe.fit`` on every pair; it is cached in
``RUN/repairs/finetuned/`` as a HF model folder (safetensors) with ``info.json`` naming the
recipe, and reloaded while the recipe and the run are the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ... import _progress
from ..._files import digest_file, write_atomic
from ...errors import InvalidValueError, RunFolderError
from ..data import chat_pair

Params = dict[str, torch.Tensor]


class Recipe(Protocol):
    """Fits weights from the base model on pair rows (``weights``: per-row loss weights, 1 =
    as in the fine-tune; None = all 1)."""

    def fit(self, rows: list[dict], weights: list[float] | None = None, progress: bool = False,
            track: dict[str, set[str]] | None = None) -> tuple[Params, dict[str, Params]]: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class TrackedSteps:
    """The summed steps that named sets of pairs took during one fine-tune: for each set, the
    sum over its pairs of (weights after the pair's update − weights before it), per trained
    parameter. Subtracting a set's sum from the fine-tuned weights is first-order removal."""

    sums: dict[str, Params]
    members: dict[str, tuple[str, ...]]

    def attributed_update(self, name: str) -> Params:
        if name not in self.sums:
            raise InvalidValueError(f"no recorded steps for the selection '{name}' (recorded: {sorted(self.sums)})")
        return self.sums[name]


@dataclass(frozen=True)
class SequentialRecipe:
    """The run's per-pair update, pair after pair, from the base weights (module docstring)."""

    engine: Any
    """The run's :class:`~policytrace.model.update.UpdateEngine` (its ``[update]`` recipe)."""
    order_ids: tuple[str, ...]
    """Every pair of the run in training order (seeded)."""
    seed: int = 0

    @classmethod
    def for_run(cls, engine, pair_ids: list[str], seed: int) -> "SequentialRecipe":
        order = np.random.default_rng([seed, len(pair_ids), 22]).permutation(len(pair_ids))
        return cls(engine, tuple(pair_ids[int(i)] for i in order), seed)

    def describe(self) -> dict:
        c = self.engine.cfg
        return {"kind": "sequential", "optimizer": c.optimizer, "lr": c.lr, "steps": c.steps,
                "params": c.params if isinstance(c.params, str) else list(c.params), "lora_rank": c.lora_rank,
                "seed": self.seed, "order": list(self.order_ids)}

    def fit(self, rows: list[dict], weights: list[float] | None = None, progress: bool = False,
            track: dict[str, set[str]] | None = None) -> tuple[Params, dict[str, Params]]:
        """Weights after the update on each of ``rows`` (weight 0: skipped) in the recipe's
        order; and, per ``track`` entry, the summed steps of its pairs."""
        by_id = {r["id"]: (r, 1.0 if weights is None else float(w))
                 for r, w in zip(rows, weights if weights is not None else [None] * len(rows))}
        unknown = sorted(set(by_id) - set(self.order_ids))
        if unknown:
            raise InvalidValueError(f"pairs {unknown[:5]} are not in the recipe's order (pairs of another run?)")
        for i, (_, w) in by_id.items():
            if not (np.isfinite(w) and w >= 0):
                raise InvalidValueError(f"pair '{i}': loss weight {w} must be a finite number >= 0")
        track = track or {}
        sums: dict[str, Params] = {}
        engine, params = self.engine, None
        todo = [i for i in self.order_ids if i in by_id and by_id[i][1] > 0]
        bar = _progress.bar(len(todo), "pair", progress)
        for pid in todo:
            row, w = by_id[pid]
            before = params if params is not None else engine.base
            params = engine.update_pair(chat_pair(row), from_params=params, weight=w)
            for name, members in track.items():
                if pid in members:
                    acc = sums.setdefault(name, {n: torch.zeros_like(engine.base[n]) for n in engine.trainable})
                    for n in engine.trainable:
                        acc[n] += params[n] - before[n]
            bar.update(1)
        bar.close()
        return (params if params is not None else dict(engine.base)), sums


def save_model(folder: Path, model, tokenizer, params: Params) -> str:
    """``params`` (a full name → tensor dict of ``model``'s parameters) as a HF model folder:
    the model's config, ``model.safetensors`` and the tokenizer. Returns the weights' digest."""
    from safetensors.torch import save_file

    from ...train.finetuning import as_plain_float

    folder.mkdir(parents=True, exist_ok=True)
    with as_plain_float(model):  # dequantized floats (a GGUF-read model): saved as the plain one it is
        model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in params]
    if missing:
        raise InvalidValueError(f"the weights to save lack {len(missing)} parameters, e.g. '{missing[0]}'")
    tmp = folder / "model.safetensors.tmp"
    save_file({n: params[n].detach().contiguous().cpu() for n in names}, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    return digest_file(folder / "model.safetensors")


def load_weights(folder: Path, model) -> Params:
    """The weights of a folder :func:`save_model` wrote, as tensors of ``model``'s dtype and device."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.exists():
        raise RunFolderError(f"{folder} holds no model.safetensors")
    loaded = load_file(str(path))
    ref = dict(model.named_parameters())
    missing = sorted(set(ref) - set(loaded))
    if missing:
        raise RunFolderError(f"{path} lacks parameter '{missing[0]}' of the run's model (another model?)")
    return {n: loaded[n].to(dtype=p.dtype, device=p.device) for n, p in ref.items()}


def recipe_key(recipe: Recipe, extra: dict) -> str:
    return hashlib.sha256(json.dumps([recipe.describe(), extra], sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Finetuned:
    """The fine-tuned weights a repair starts from, the recipe that made them and, when the
    fine-tune was recorded, the steps it can attribute to pairs."""

    params: Params
    recipe: Recipe
    folder: Path
    records: Callable[[list[str]], Params] | None = None
    """``records(pair_ids)`` → the selected pairs' summed share of the run's updates; None when
    the run kept no trajectory records."""
    info: dict = field(default_factory=dict)


def cached_finetune(folder: Path, recipe: Recipe, rows: list[dict], model, tokenizer, identity: dict,
                    log: Callable[[str], None], progress: bool) -> tuple[Params, dict]:
    """The recipe fitted on every row, cached in ``folder`` (reused while ``info.json`` names the
    same recipe and run and the weights still have their digest)."""
    key = recipe_key(recipe, identity)
    info_path = folder / "info.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            info = {}
        if info.get("key") == key and (folder / "model.safetensors").exists() \
                and digest_file(folder / "model.safetensors") == info.get("digest"):
            log(f"fine-tuned model: cached in {folder}")
            return load_weights(folder, model), info
    log(f"fine-tuning on all {len(rows)} pairs with the run's recipe (cached in {folder})")
    params, _ = recipe.fit(rows, progress=progress)
    digest = save_model(folder, model, tokenizer, params)
    info = {"key": key, "digest": digest, "recipe": recipe.describe(), "run": identity}
    write_atomic(info_path, json.dumps(info, indent=1))
    return params, info


@dataclass(frozen=True)
class TrainRecipe:
    """The run's ``[train]`` recipe (:func:`policytrace.train.finetune`: AdamW or SGD with
    momentum over seeded mini-batches, epochs, a schedule) from the base weights. Dropped pairs
    (weight 0) are left out of the examples, so the batches are re-planned over the kept pairs
    as a fine-tune without them would be; a weight in (0, 1) scales the pair's loss coefficient.
    Each fit trains a private copy of the base model in a scratch folder under ``work``, reads
    the fine-tuned weights and removes the folder."""

    cfg: Any
    """The run's resolved config (its ``train`` and ``model`` tables)."""
    lm: Any
    """The run's loaded model (its weights are copied, never trained)."""
    work: Path

    def describe(self) -> dict:
        return {"kind": "train", **self.cfg.train.recipe()}

    def examples(self, rows: list[dict]) -> list:
        """The rows as the fine-tune's examples (chat ids and loss mask: model/chat.py's rule)."""
        from ...gradients.batched import TrainExample
        from ...model.chat import chat_pair_tokens

        out = []
        for r in rows:
            t = chat_pair_tokens(self.lm.tokenizer, chat_pair(r), self.cfg.train.max_length)
            out.append(TrainExample(tuple(t.ids), tuple(t.mask)))
        return out

    def fit_into(self, out: Path, rows: list[dict], weights: list[float], progress: bool = False) -> Params:
        """``policytrace finetune`` of ``rows`` (weights > 0) on a private copy of the base model
        into ``out`` (kept: its records and checkpoints); the fine-tuned weights."""
        import copy

        from ...model.loading import LoadedModel
        from ...train.finetuning import finetune

        keep = [(r, x) for r, x in zip(rows, weights) if x > 0]
        if not keep:
            raise InvalidValueError("every pair has loss weight 0: nothing to fine-tune on")
        net = copy.deepcopy(self.lm.model)  # finetune saves a GGUF-read copy as the float model it is
        lm = LoadedModel(net, self.lm.tokenizer, self.lm.name, self.lm.identity)
        try:
            finetune(self.cfg, self.examples([r for r, _ in keep]), out, weights=np.array([x for _, x in keep]),
                     progress=progress, ids=[r["id"] for r, _ in keep], log=lambda m: None, model=lm)
        finally:
            del net, lm
        return load_weights(out / "model", self.lm.model)

    def fit(self, rows: list[dict], weights: list[float] | None = None, progress: bool = False,
            track: dict[str, set[str]] | None = None) -> tuple[Params, dict[str, Params]]:
        import shutil

        from ..._files import digest_bytes

        if track:
            raise InvalidValueError("steps of a [train] fine-tune are attributed by its trajectory records, not "
                                    "tracked during a refit; --record-steps is for runs of the per-pair recipe")
        w = [1.0] * len(rows) if weights is None else [float(x) for x in weights]
        key = digest_bytes(json.dumps([self.describe(), [r["id"] for r in rows], w]).encode())[:16]
        out = self.work / key
        if out.exists():
            shutil.rmtree(out)
        try:
            params = self.fit_into(out, rows, w, progress)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return params, {}

    def records(self, folder: Path, rows: list[dict]) -> Callable[[list[str]], Params]:
        """First-order removal's records of the fine-tune in ``folder`` (over ``rows``, in the
        fine-tune's order): issue 21's :func:`~policytrace.train.trajectory.attributed_update`,
        a replay of the recorded run on a private copy of the base model per call."""
        import copy

        from ...train.trajectory import attributed_update

        examples = self.examples(rows)
        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer.pad_token_id is not None else 0

        def records(ids: list[str]) -> Params:
            net = copy.deepcopy(self.lm.model)
            try:
                return attributed_update(folder, ids, model=net, examples=examples, pad_id=pad)
            finally:
                del net

        return records
