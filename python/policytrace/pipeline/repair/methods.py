"""The three repairs, each a function from the fine-tuned model and a selection of pairs to new
weights and a record of what it did.

* :func:`retrain` — the run's recipe again from the base weights, the selected pairs dropped
  (weight 0) or their loss multiplied by a weight in (0, 1).
* :func:`first_order` — the fine-tuned weights minus the selected pairs' recorded share of the
  run's updates (a sum over the trajectory records; no training).
* :func:`unlearn` — seeded gradient ascent on the selected pairs' mean loss from the fine-tuned
  weights, each step's gradient clipped, the step size capped, ending at ``max_steps``, at the
  first step that raises the kept pairs' loss by more than ``margin`` (that step undone), or
  once the behaviour is back at the base model's level.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ... import _progress
from ...errors import InvalidValueError, NonFiniteError, RunFolderError
from ..data import chat_pair
from .config import UnlearnCfg
from .measure import Meter
from .recipe import Finetuned, Params


def retrain(ft: Finetuned, rows: list[dict], selected: set[str], weight: float = 0.0,
            progress: bool = False) -> tuple[Params, dict]:
    kept = [r for r in rows if r["id"] not in selected]
    if weight == 0 and not kept:
        raise InvalidValueError("the selection holds every pair of the run: retraining without them trains on nothing")
    weights = [weight if r["id"] in selected else 1.0 for r in rows]
    params, _ = ft.recipe.fit(rows, weights, progress=progress)
    return params, {"weight": weight, "trained_pairs": len(kept) + (len(selected) if weight > 0 else 0)}


def first_order(ft: Finetuned, ids: list[str], run_name: str = "the run") -> tuple[Params, dict]:
    if ft.records is None:
        raise RunFolderError(
            f"{run_name} holds no trajectory records, so the selected pairs' updates cannot be subtracted: first-order "
            "removal needs a recorded fine-tune: the run's [train] recipe (--recipe train, the default for "
            "run.mode = \"trajectory\") keeps trajectory records, or `--record-steps` refits this run's per-pair "
            "recipe once with the selections' steps recorded; or use --method retrain / unlearn")
    upd = ft.records(ids)
    out = dict(ft.params)
    for n, d in upd.items():
        if n not in out:
            raise RunFolderError(f"the trajectory records update parameter '{n}', which the fine-tuned model lacks")
        out[n] = ft.params[n] - d.to(dtype=ft.params[n].dtype, device=ft.params[n].device)
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in upd.values()))
    return out, {"update_norm": norm, "parameters": len(upd)}


def _monitor(kept: list[dict], n: int, seed: int) -> list[dict]:
    if n == 0 or n >= len(kept):
        return kept
    pick = np.random.default_rng([seed, 24]).choice(len(kept), n, replace=False)
    return [kept[int(i)] for i in sorted(pick)]


def unlearn(ft: Finetuned, meter: Meter, sel_rows: list[dict], kept_rows: list[dict], cfg: UnlearnCfg, seed: int,
            base_mean: float, progress: bool = False) -> tuple[Params, dict]:
    """Gradient ascent on ``sel_rows`` (module docstring). ``base_mean``: the base model's mean
    score on the run's probes (the stop rule's target)."""
    engine = meter.state.model.engine
    lr = cfg.lr or engine.cfg.lr
    if lr > cfg.max_lr:
        raise InvalidValueError(f"unlearn.lr = {lr:g} (the run's update.lr) exceeds unlearn.max_lr = {cfg.max_lr:g}; "
                                "give --unlearn-lr at or below the cap")
    if not sel_rows:
        raise InvalidValueError("unlearning needs at least one selected pair")
    monitor = _monitor(kept_rows, cfg.monitor_pairs, seed)
    loss0 = meter.pair_loss(ft.params, monitor) if monitor else None
    ft_mean = meter.mean_y(ft.params) if cfg.stop_at_base else None
    direction = 0.0 if ft_mean is None else (1.0 if ft_mean >= base_mean else -1.0)
    rng = np.random.default_rng([seed, 23])
    order = [int(i) for i in rng.permutation(len(sel_rows))]
    theta, steps, reason, cursor = ft.params, [], "max_steps", 0
    bar = _progress.bar(cfg.max_steps, "unlearn step", progress)
    for step in range(1, cfg.max_steps + 1):
        if cfg.batch == 0:
            batch = sel_rows
        else:
            batch = [sel_rows[order[(cursor + j) % len(order)]] for j in range(min(cfg.batch, len(order)))]
            cursor += len(batch)
        g: dict[str, torch.Tensor] = {}
        for r in batch:
            for n, v in engine.gradient_pair(chat_pair(r), at=theta).items():
                g[n] = g[n] + v if n in g else v.clone()
        for n in g:
            g[n] /= len(batch)
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in g.values()))
        scale = min(1.0, cfg.max_grad_norm / norm) if cfg.max_grad_norm > 0 and norm > 0 else 1.0
        new = {**theta, **{n: theta[n] + (lr * scale) * g[n] for n in g}}
        if not all(bool(torch.isfinite(new[n]).all()) for n in g):
            raise NonFiniteError(f"unlearning step {step} made the weights NaN or inf at unlearn.lr = {lr:g}; lower it")
        rec: dict = {"step": step, "grad_norm": norm, "clipped": scale < 1.0,
                     "pairs": [r["id"] for r in batch] if cfg.batch else len(batch)}
        if monitor:
            rise = meter.pair_loss(new, monitor) - loss0
            rec["kept_loss_rise"] = rise
            if rise > cfg.margin:
                rec["undone"] = True
                steps.append(rec)
                reason = f"kept pairs' loss rose by {rise:.4f} > margin {cfg.margin:g} (step undone)"
                break
        theta = new
        if cfg.stop_at_base:
            m = meter.mean_y(theta)
            rec["mean_y"] = m
            if direction * (m - base_mean) <= 0:
                steps.append(rec)
                reason = "behaviour back at the base level"
                break
        steps.append(rec)
        bar.update(1)
    bar.close()
    taken = sum(1 for s in steps if not s.get("undone"))
    return theta, {"lr": lr, "steps_taken": taken, "stopped": reason, "steps": steps,
                   "monitor_pairs": [r["id"] for r in monitor], "kept_loss_before": loss0}
