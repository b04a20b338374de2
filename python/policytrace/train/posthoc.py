"""The post-hoc path for runs nobody recorded: TracIn over a ``transformers.Trainer`` run's saved
checkpoints (``OUTPUT_DIR/checkpoint-N/``: ``model.safetensors`` and ``optimizer.pt``).

Between checkpoints N_{k−1} and N_k (N_0 = 0, the base model) the run took N_k − N_{k−1} AdamW
steps of about ``−lr_k u_k ⊙ (Σ_{i∈B} c_i g_i)``; an example sits in a fraction ``1/n`` of the
batch slots, with c_i ≈ 1/|B|, so its expected share of the segment's change of a concept φ is

    −lr_k · (N_k − N_{k−1}) / n · ⟨u_k ⊙ ∇φ(θ_{N_{k−1}}), g_i(θ_{N_{k−1}})⟩

with ``u_k = 1/(√v̂ + ε)`` from checkpoint k's ``exp_avg_sq`` (the recorded path's
``precondition = "checkpoint"``), ``lr_k`` the segment's mean rate (between the rate checkpoint
k − 1's optimizer holds, or the scheduler's base rate, and checkpoint k's), and
the gradients at the segment's start (the base model, then each checkpoint before the last).
What it does not know — which batches held which example, the schedule between checkpoints,
momentum, clipping, the loss coefficients — it averages over, so it is an estimate of the
recorded path (:func:`policytrace.train.trajectory.attribute`), compared with it by Spearman in
the tests. The optimizer state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import RunFolderError
from ..gradients.batched import TrainExample, WholeProducts, per_example


@dataclass
class Checkpoint:
    step: int
    folder: Path


@dataclass
class TracinResult:
    values: np.ndarray
    """(examples, concepts): each example's estimated contribution."""
    checkpoints: list[int]
    lr: list[float]
    seconds: dict = field(default_factory=dict)


def trainer_checkpoints(output_dir) -> list[Checkpoint]:
    """The ``checkpoint-N`` folders of a Trainer output folder, by step."""
    out = Path(output_dir)
    found = []
    for d in out.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append(Checkpoint(int(m.group(1)), d))
    if not found:
        raise RunFolderError(f"{out} holds no checkpoint-N folder: save the run's checkpoints (save_strategy = "
                             "'steps' or 'epoch', save_only_model = False) or record it with RecordingCallback")
    return sorted(found, key=lambda c: c.step)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise RunFolderError(f"{folder} has no model safetensors (save_safetensors = True)")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def optimizer_names(model, names: list[str]) -> list[list[str]]:
    """The Trainer's parameter groups of the trained tensors ``names`` (decayed, then not:
    ``Trainer.create_optimizer``), empty groups dropped."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], forbidden))
    order = [n for n, _ in model.named_parameters() if n in set(names)]
    groups = [[n for n in order if n in decay], [n for n in order if n not in decay]]
    return [g for g in groups if g]


def _adam_state(folder: Path, model, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    f = folder / "optimizer.pt"
    if not f.is_file():
        raise RunFolderError(f"{f} is missing: the checkpoint has no optimizer state (set save_only_model = False)")
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds
        raise RunFolderError(f"{f} could not be read with weights_only=True ({type(e).__name__}: {e})") from e
    groups = optimizer_names(model, names)
    saved = [g["params"] for g in sd["param_groups"] if g["params"]]
    if [len(g) for g in saved] != [len(g) for g in groups]:
        raise RunFolderError(f"{f}: its parameter groups hold {[len(g) for g in saved]} tensors, the trained tensors "
                             f"make {[len(g) for g in groups]}; set requires_grad on exactly the tensors the run trained")
    params = dict(model.named_parameters())
    v, hyper = {}, sd["param_groups"][0]
    for idxs, ns in zip(saved, groups):
        for i, n in zip(idxs, ns):
            st = sd["state"].get(i, {})
            if "exp_avg_sq" not in st:
                raise RunFolderError(f"{f} holds no AdamW second moment for '{n}': the post-hoc path models AdamW runs")
            if tuple(st["exp_avg_sq"].shape) != tuple(params[n].shape):
                raise RunFolderError(f"{f}: the state of '{n}' has shape {list(st['exp_avg_sq'].shape)}, the model's "
                                     f"{list(params[n].shape)} (another model, or other trained tensors)")
            v[n] = st["exp_avg_sq"]
            hyper = {**hyper, "step": float(st["step"])}
    return v, hyper


def _base_lr(folder: Path, fallback: float) -> float:
    f = folder / "scheduler.pt"
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
        return float(sd["base_lrs"][0])
    except Exception:  # no scheduler state, or another scheduler's
        return fallback


def tracin_checkpoints(model, output_dir, examples: list[TrainExample], pad_id: int,
                       grads_fn: Callable[[], torch.Tensor], names: list[str] | None = None,
                       batch: int = 8, log=lambda m: None) -> TracinResult:
    """Each example's TracIn estimate (module docstring) over ``output_dir``'s checkpoints.
    ``model``: the base model (its trained tensors are restored after); ``names``: the trained
    tensors (default: those with ``requires_grad``); ``grads_fn``: the concept gradients (C, D) at
    the model's current weights, flattened in ``names`` order."""
    import time

    t0 = time.perf_counter()
    ckpts = trainer_checkpoints(output_dir)
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if p.requires_grad]
    shapes = {n: tuple(params[n].shape) for n in names}
    base = {n: params[n].detach().clone() for n in names}
    device = next(model.parameters()).device
    n = len(examples)
    values = None
    lrs = []
    prev_step, start, start_lr = 0, base, None
    flags = {k: p.requires_grad for k, p in params.items()}
    try:
        for ck in ckpts:
            v, hyper = _adam_state(ck.folder, model, names)
            end_lr, (_, b2), eps, t = float(hyper["lr"]), hyper["betas"], float(hyper["eps"]), hyper["step"]
            if start_lr is None:  # the first step's: the scheduler's base rate (exact without warmup)
                start_lr = _base_lr(ck.folder, end_lr)
            lr = 0.5 * (start_lr + end_lr)  # the segment's mean rate (trapezoid; the saved rate is the next step's)
            start_lr = end_lr
            lrs.append(lr)
            with torch.no_grad():
                for k in names:
                    params[k].copy_(start[k])
            G = grads_fn()
            bc2 = 1.0 - b2**t
            u = torch.cat([(1.0 / (v[k].double().sqrt() / math.sqrt(bc2) + eps)).reshape(-1) for k in names])
            w = -lr * (ck.step - prev_step) / n
            q = (G.double() * u.to(G.device)[None] * w).to(G.dtype)
            if values is None:
                values = np.zeros((n, G.shape[0]))
            for lo in range(0, n, batch):
                part = examples[lo:lo + batch]
                sink = WholeProducts(q, names, shapes, "sgd", -1.0, len(part))
                per_example(model, names, sink, part, pad_id, device)
                values[lo:lo + len(part)] += sink.result().cpu().numpy()
            log(f"tracin: checkpoint {ck.step} (lr {lr:.3g})")
            w_all = _weights(ck.folder)
            missing = [k for k in names if k not in w_all]
            if missing:
                raise RunFolderError(f"{ck.folder} lacks the trained tensor '{missing[0]}'")
            start = {k: w_all[k].to(dtype=params[k].dtype, device=params[k].device) for k in names}
            prev_step = ck.step
    finally:
        with torch.no_grad():
            for k in names:
                params[k].copy_(base[k])
        for k, p in params.items():
            p.requires_grad_(flags[k])
    return TracinResult(values, [c.step for c in ckpts], lrs, {"total": round(time.perf_counter() - t0, 3)})
