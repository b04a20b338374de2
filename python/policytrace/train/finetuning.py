"""``policytrace finetune``: the ``[train]`` recipe run from the base model on a list of pairs,
with checkpoints and the records trajectory mode attributes.

Layout of ``out_dir``::

    model/                      the fine-tuned model, a HF folder (safetensors) + tokenizer
    checkpoints/step-N/         trained.safetensors (the trained tensors), optimizer.safetensors
                                (m, v), records.json (the steps so far), done.json (digests)
    precond/step-N.safetensors  train.precondition = "step": each step's u = 1/(√v̂+ε)
    records.json                every step: epoch, lr, clip factor, the batch's example indices
                                and their loss coefficients c_i (the batch gradient is Σ c_i g_i)
    done.json                   the finished run's files and digests

Deterministic for a recipe, examples and thread count (byte-identical reruns); killed at any
moment, the same call resumes from the last intact checkpoint and ends with byte-identical files.
"""

from __future__ import annotations

import contextlib

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import _faults, _progress
from .._files import digest_bytes, digest_file, write_atomic
from ..errors import ConfigError, InvalidValueError, NonFiniteError, RunFolderError
from ..gradients.batched import TrainExample, batch_loss
from .config import TrainCfg
from .optim import Optimizer, lr_at

FORMAT = "policytrace.finetune"
VERSION = 1


@dataclass(frozen=True)
class Step:
    """One optimizer step of the plan: its epoch and the indices of its batch's examples
    (the union of its ``grad_accum`` micro-batches, in order)."""

    epoch: int
    micro: tuple[tuple[int, ...], ...]

    @property
    def examples(self) -> tuple[int, ...]:
        return tuple(i for mb in self.micro for i in mb)


def plan(cfg: TrainCfg, n: int) -> list[Step]:
    """Every step of the recipe on ``n`` examples: per epoch a seeded permutation, cut into
    micro-batches of ``batch_size`` (the last may be short), ``grad_accum`` of them a step."""
    if n < 1:
        raise InvalidValueError("finetune needs at least one example")
    steps = []
    for e in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, e]).permutation(n).tolist()
        micro = [tuple(order[i:i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]
        for i in range(0, len(micro), cfg.grad_accum):
            steps.append(Step(e, tuple(micro[i:i + cfg.grad_accum])))
    return steps


def loss_coefficients(cfg: TrainCfg, examples: list[TrainExample], idx: tuple[int, ...],
                      weights: np.ndarray) -> np.ndarray:
    """c_i of the step's batch: its loss is Σ_i c_i · (example i's mean cross-entropy over its
    trained tokens), so the batch gradient is Σ_i c_i g_i. token_mean: c_i = w_i n_i / Σ_j n_j
    (the mean over all the batch's trained tokens, weighted); example_mean: c_i = w_i / |B|."""
    n = np.array([n_trained(examples[i]) for i in idx], dtype=np.float64)
    w = weights[list(idx)]
    if cfg.loss == "token_mean":
        return w * n / n.sum()
    return w / len(idx)


def n_trained(e: TrainExample) -> int:
    """Trained tokens of an example (each predicted from the position before it)."""
    return sum(1 for t in range(1, len(e)) if e.trained[t])


def weighted_loss(model, examples: list[TrainExample], coef: np.ndarray, pad_id: int, device) -> torch.Tensor:
    """Σ_b coef_b · mean cross-entropy of example b over its trained tokens (one padded batch)."""
    return batch_loss(model, examples, pad_id, device, coef)


def check_examples(examples: list[TrainExample], cfg: TrainCfg, ids: list[str]) -> None:
    for i, e in enumerate(examples):
        if not isinstance(e, TrainExample):
            raise InvalidValueError(f"example {i} is a {type(e).__name__}, not a TrainExample")
        if n_trained(e) == 0:
            raise InvalidValueError(f"example '{ids[i]}' has no trained token: set its loss mask (labels = -100 "
                                    "only on the tokens not trained)")
        if len(e) > cfg.max_length:
            raise InvalidValueError(f"example '{ids[i]}' has {len(e)} tokens, more than train.max_length = "
                                    f"{cfg.max_length}")


def examples_digest(examples: list[TrainExample], weights: np.ndarray) -> str:
    blob = json.dumps([[list(e.ids), [int(t) for t in e.trained]] for e in examples]) + json.dumps(weights.tolist())
    return digest_bytes(blob.encode())


# --- the trained tensors ------------------------------------------------------------------


def trained_names(model, cfg: TrainCfg) -> list[str]:
    """The tensors the recipe trains: LoRA's adapters (``train.lora > 0``) or ``train.params``."""
    from ..model.update import selected_names

    if cfg.lora > 0:
        return [n for n, _ in model.named_parameters() if "lora_" in n]
    try:
        return selected_names(model, cfg.params)
    except ConfigError:
        raise ConfigError(f"config 'train.params' = {cfg.params!r} selects no parameter of this model") from None


def add_adapters(model, cfg: TrainCfg, update) -> None:
    from ..model.update import add_lora

    add_lora(model, dataclasses.replace(update, lora_rank=cfg.lora), cfg.seed)


def trained_tensors(model, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}


# --- the folder ----------------------------------------------------------------------------


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())})
    write_atomic(path, data)
    return digest_bytes(data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_json(path: Path, doc) -> str:
    data = json.dumps(doc, indent=1, sort_keys=True)
    write_atomic(path, data)
    return digest_bytes(data.encode())


def intact(folder: Path) -> dict | None:
    """``folder/done.json`` when every file it names has its digest, else None."""
    done = folder / "done.json"
    if not done.is_file():
        return None
    try:
        doc = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for name, d in doc.get("files", {}).items():
        f = folder / name
        if not f.is_file() or digest_file(f) != d:
            return None
    return doc


@dataclass(frozen=True)
class FinetuneResult:
    """What a finished fine-tune left in :attr:`out_dir`."""

    out_dir: Path
    steps: int
    seconds: float
    """Wall-clock seconds of this call (0 when the folder was already complete)."""
    final_loss: float
    resumed_from: int = 0
    """The checkpoint step this call started from (0 = the base model)."""
    trained: dict | None = None
    """``out_dir = None`` (nothing written): the trained tensors' final values."""

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    def records(self) -> dict:
        return json.loads((self.out_dir / "records.json").read_text())


def identity(cfg: TrainCfg, model_identity: str, names: list[str], shapes: dict, digest: str) -> dict:
    return {"format": FORMAT, "version": VERSION, "recipe": cfg.recipe(), "model": model_identity,
            "trained": {n: list(shapes[n]) for n in names}, "examples": digest}


def latest_checkpoint(out: Path, ident: dict) -> tuple[int, Path] | None:
    """The last intact checkpoint of this run; one of another model, recipe or data is refused."""
    best = None
    for d in sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        doc = intact(d)
        if doc is None:
            continue
        if doc.get("identity") != ident:
            theirs = doc.get("identity", {})
            what = [k for k in ("model", "trained", "recipe", "examples") if theirs.get(k) != ident.get(k)]
            raise RunFolderError(f"{d} is a checkpoint of another fine-tune (its {', '.join(what) or 'format'} "
                                 f"differs: e.g. another model); use another --out folder or delete {out}")
        best = (int(d.name.split("-")[1]), d)
    return best


def finetune(cfg, examples: list[TrainExample], out_dir, *, weights=None, progress: bool = True,
             ids: list[str] | None = None, log=print, model=None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` (a pipeline :class:`~policytrace.pipeline.config.Config`, or
    anything with ``.train``, ``.model`` and ``.update``) on ``examples`` with the ``[train]``
    recipe, into ``out_dir`` (see the module's docstring). ``weights``: per-example loss weights
    (default 1); ``ids``: the examples' names for the records and messages; ``model``: a loaded
    :class:`~policytrace.model.loading.LoadedModel` to train (its weights are changed) instead of
    loading ``cfg.model``."""
    from ..model.loading import load_model_cfg

    tcfg: TrainCfg = cfg.train
    if out_dir is None:
        return _in_memory(cfg, examples, weights, progress, model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; name a folder")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(examples))]
    w = _weights(weights, len(examples))
    check_examples(examples, tcfg, ids)
    steps = plan(tcfg, len(examples))
    done = intact(out)
    lm = model if model is not None else load_model_cfg(cfg.model)
    net = lm.model
    if tcfg.lora > 0:
        add_adapters(net, tcfg, cfg.update)
    names = trained_names(net, tcfg)
    params = trained_tensors(net, names)
    ident = identity(tcfg, lm.identity, names, {n: tuple(p.shape) for n, p in params.items()},
                     examples_digest(examples, w))
    if done is not None:
        if done.get("identity") != ident:
            raise RunFolderError(f"{out} holds a finished fine-tune of another model, recipe or data; use another "
                                 "--out folder")
        log(f"{out} is complete; nothing to do")
        rec = json.loads((out / "records.json").read_text())
        return FinetuneResult(out, len(steps), 0.0, rec["steps"][-1]["loss"] if rec["steps"] else 0.0)
    out.mkdir(parents=True, exist_ok=True)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    net.eval()
    opt = Optimizer(tcfg, {n: p.detach() for n, p in params.items()})
    start, records = _resume(out, ident, params, opt, log)
    every = tcfg.checkpoint_every
    epoch_end = {i + 1 for i in range(len(steps)) if i + 1 == len(steps) or steps[i + 1].epoch != steps[i].epoch}
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    bar = _progress.bar(len(steps), "step", progress, initial=start)
    for s in range(start + 1, len(steps) + 1):
        records.append(_step(net, params, opt, tcfg, examples, w, steps, s, pad))
        if tcfg.precondition == "step":
            save_tensors(out / "precond" / f"step-{s}.safetensors",
                         {n: opt.preconditioner(n) for n in names})
        if (every and s % every == 0) or (not every and s in epoch_end) or s == len(steps):
            checkpoint(out, s, params, opt, records, ident, ids)
        _faults.checkpoint("finetune-step")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    finish(out, lm, net, tcfg, records, ident, ids, len(steps), examples, cfg.model)
    return FinetuneResult(out, len(steps), round(seconds, 3), records[-1]["loss"] if records else 0.0, start)


def _weights(weights, n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise InvalidValueError(f"weights must be {n} finite numbers >= 0, one per example")
    return w


def _resume(out: Path, ident: dict, params: dict, opt: Optimizer, log) -> tuple[int, list[dict]]:
    """The last intact checkpoint of this fine-tune, loaded into ``params`` and ``opt``: (its step,
    the records up to it); (0, []) when there is none."""
    ck = latest_checkpoint(out, ident)
    if ck is None:
        return 0, []
    start, folder = ck
    with torch.no_grad():
        for n, t in load_tensors(folder / "trained.safetensors").items():
            params[n].copy_(t)
    opt.load(load_tensors(folder / "optimizer.safetensors"), start)
    log(f"resuming {out} from checkpoint step {start}")
    return start, json.loads((folder / "records.json").read_text())["steps"]


def _step(net, params: dict, opt: Optimizer, tcfg: TrainCfg, examples: list[TrainExample], w: np.ndarray,
          steps: list[Step], s: int, pad: int) -> dict:
    """Optimizer step ``s`` (1-based): its micro-batches' gradients summed, clipped, applied; its record."""
    st = steps[s - 1]
    device = next(net.parameters()).device
    coef = loss_coefficients(tcfg, examples, st.examples, w)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    loss_total, k = 0.0, 0
    for mb in st.micro:
        c = coef[k:k + len(mb)]
        k += len(mb)
        loss = weighted_loss(net, [examples[i] for i in mb], c, pad, device)
        g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, gi in zip(params, g):
            if gi is not None:
                grads[n] += gi
        loss_total += float(loss.detach())
    scale, norm = opt.clip_scale(grads)
    lr = lr_at(tcfg, s, len(steps))
    opt.step({n: p.detach() for n, p in params.items()}, grads, lr, scale)
    if not all(bool(torch.isfinite(p).all()) for p in params.values()):
        raise NonFiniteError(f"the fine-tune diverged at step {s} (train.lr = {tcfg.lr:g}); lower train.lr")
    return {"step": s, "epoch": st.epoch, "lr": lr, "clip": scale, "grad_norm": norm,
            "loss": loss_total, "examples": list(st.examples), "coef": coef.tolist()}


def checkpoint(out: Path, s: int, params: dict, opt: Optimizer, records: list[dict], ident: dict,
               ids: list[str]) -> None:
    folder = out / "checkpoints" / f"step-{s}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"trained.safetensors": save_tensors(folder / "trained.safetensors", params),
             "optimizer.safetensors": save_tensors(folder / "optimizer.safetensors", opt.state()),
             "records.json": write_json(folder / "records.json", {"steps": records})}
    _faults.checkpoint("finetune-before-checkpoint-marker")
    write_json(folder / "done.json", {"step": s, "identity": ident, "files": files})


def finish(out: Path, lm, net, cfg: TrainCfg, records: list[dict], ident: dict, ids: list[str], total: int,
           examples: list[TrainExample], model_cfg=None) -> None:
    """The HF model folder, the records, the examples, and done.json."""
    ckpts = sorted(int(d.name.split("-")[1]) for d in (out / "checkpoints").glob("step-*") if intact(d))
    base = {"name": model_cfg.name if model_cfg is not None else lm.name, "label": lm.name,
            **({"dtype": model_cfg.dtype, "device": model_cfg.device, "chat_template":
                                  model_cfg.chat_template, "gguf_file": model_cfg.gguf_file}
                                 if model_cfg is not None else {})}
    rec = {**ident, "ids": ids, "n_examples": len(ids), "checkpoints": ckpts, "steps": records,
           "precondition": cfg.precondition, "total_steps": total, "base_model": base,
           "pad_id": lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0}
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_model(net, lm.tokenizer, model_dir, cfg)
    files = {"records.json": write_json(out / "records.json", rec),
             "examples.json": write_json(out / "examples.json", [[list(e.ids), [int(t) for t in e.trained]]
                                                                 for e in examples])}
    for f in sorted(model_dir.rglob("*")):
        if f.is_file():
            files[f.relative_to(out).as_posix()] = digest_file(f)
    _faults.checkpoint("finetune-before-done")
    write_json(out / "done.json", {"identity": ident, "files": files})


@contextlib.contextmanager
def as_plain_float(net):
    """A model read from GGUF (the embedded default) carries transformers' GGUF quantizer marks,
    and save_pretrained refuses it although its weights are dequantized floats: while saving, it
    is the plain float model it is (the marks come back after, so the live model is unchanged)."""
    saved = {k: getattr(net, k) for k in ("hf_quantizer", "is_quantized") if getattr(net, k, None)}
    qc = getattr(net.config, "quantization_config", None)
    try:
        for k in saved:
            try:
                setattr(net, k, None if k == "hf_quantizer" else False)
            except AttributeError:  # a read-only property on some transformers versions
                pass
        if qc is not None:
            del net.config.quantization_config
        yield net
    finally:
        for k, v in saved.items():
            try:
                setattr(net, k, v)
            except AttributeError:
                pass
        if qc is not None:
            net.config.quantization_config = qc


def save_model(net, tokenizer, folder: Path, cfg: TrainCfg) -> None:
    """The model as a HF folder (safetensors); LoRA adapters merged into their weights."""
    with as_plain_float(net):
        _save_model(net, tokenizer, folder, cfg)


def _save_model(net, tokenizer, folder: Path, cfg: TrainCfg) -> None:
    if cfg.lora > 0:
        for mod in net.modules():
            if hasattr(mod, "merge") and hasattr(mod, "lora_A"):
                mod.merge()
        state = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k}
        net.save_pretrained(folder, state_dict=state, safe_serialization=True)
    else:
        net.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def pair_examples(tokenizer, pairs, max_length: int) -> tuple[list[str], list[TrainExample]]:
    """The run's pair rows (a polars frame) as training examples: chat ids and loss mask by the
    same rule as every mode (model/chat.py: the trained assistant turns' tokens)."""
    from ..model.chat import chat_pair_tokens
    from ..pipeline.data import chat_pair

    ids, out = [], []
    for r in pairs.iter_rows(named=True):
        t = chat_pair_tokens(tokenizer, chat_pair(r), max_length)
        ids.append(r["id"])
        out.append(TrainExample(tuple(t.ids), tuple(t.mask)))
    return ids, out


def finetune_config(cfg, out_dir, progress: bool = True, log=print) -> FinetuneResult:
    """``policytrace finetune CONFIG``: the config's pairs (``[data]``, the stratified subset of
    ``data.max_pairs``) fine-tuned with its ``[train]`` recipe."""
    from ..model.loading import load_model_cfg
    from ..pipeline.stages import load_inputs

    inputs = load_inputs(cfg)
    lm = load_model_cfg(cfg.model)
    ids, examples = pair_examples(lm.tokenizer, inputs.pairs, cfg.train.max_length)
    log(f"fine-tuning {lm.name} on {len(ids)} pairs: {cfg.train.optimizer}, lr {cfg.train.lr:g}, batch "
        f"{cfg.train.batch_size} x {cfg.train.grad_accum}, {cfg.train.epochs} epochs, {cfg.train.schedule}")
    return finetune(cfg, examples, out_dir, progress=progress, ids=ids, log=log, model=lm)


def _in_memory(cfg, examples: list[TrainExample], weights, progress: bool, model) -> FinetuneResult:
    """The recipe with nothing written (validation's subset retraining): the model's trained
    tensors are left at their final values and returned; the caller resets them."""
    tcfg: TrainCfg = cfg.train
    if model is None:
        raise ConfigError("finetune(out_dir=None) needs model= (a loaded model whose weights it may change)")
    w = np.ones(len(examples)) if weights is None else np.asarray(weights, dtype=np.float64)
    check_examples(examples, tcfg, [str(i) for i in range(len(examples))])
    net = model.model
    names = trained_names(net, tcfg)
    params = trained_tensors(net, names)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = Optimizer(tcfg, {n: p.detach() for n, p in params.items()})
    steps = plan(tcfg, len(examples))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    device = next(net.parameters()).device
    t0 = time.perf_counter()
    loss_total = 0.0
    bar = _progress.bar(len(steps), "step", progress)
    for s, st in enumerate(steps, 1):
        coef = loss_coefficients(tcfg, examples, st.examples, w)
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        k, loss_total = 0, 0.0
        for mb in st.micro:
            loss = weighted_loss(net, [examples[i] for i in mb], coef[k:k + len(mb)], pad, device)
            k += len(mb)
            for n, gi in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if gi is not None:
                    grads[n] += gi
            loss_total += float(loss.detach())
        scale, _ = opt.clip_scale(grads)
        opt.step({n: p.detach() for n, p in params.items()}, grads, lr_at(tcfg, s, len(steps)), scale)
        bar.update(1)
    bar.close()
    for n, p in net.named_parameters():
        p.requires_grad_(flags[n])
    return FinetuneResult(Path("."), len(steps), round(time.perf_counter() - t0, 3), loss_total,
                          trained={n: p.detach().clone() for n, p in params.items()})
