"""Recording the user's own ``transformers.Trainer`` run (TRL's ``SFTTrainer`` too) in the folder
format of :mod:`.finetuning`, so that trajectory mode (``train.records``), ``attributed_update``
and ``policytrace repair`` read it unchanged::

    cb = RecordingCallback("runs/sft-records").attach(trainer)   # before trainer.train()
    trainer.train()

:meth:`RecordingCallback.attach` adds an index column to the train dataset (kept through the
Trainer's column removal) and wraps the trainer's data collator, ``compute_loss`` and its
accelerator's ``clip_grad_norm_``: the collator hands each batch's dataset rows and their tokens
as the user's collator made them (the chat template, padding, ``labels = -100`` loss mask), the
loss wrapper takes them off before the model sees the batch and reads ``num_items_in_batch``
(the Trainer's token-mean normalisation), the clip wrapper keeps the gradient norm the Trainer
computes before clipping. Per optimizer step the callback keeps the batch's rows, the learning
rate (the optimizer's), the clip factor and the loss coefficients — nothing the Trainer does not
already compute; no extra forward or backward (one check on the first step compares the
Trainer's loss with the recorded coefficients, from the logits the model already returned). At
checkpoints (every ``checkpoint_every`` optimizer steps, else every epoch's end, and the last
step) it writes the trained tensors and the optimizer's ``exp_avg``/``exp_avg_sq``
(``momentum_buffer`` for SGD) as safetensors; at the end ``records.json``, ``examples.json``,
``base.safetensors`` (θ_0 of the trained tensors), ``model/`` and ``done.json``.

Where it cannot tell what was trained on, it stops with a :class:`~policytrace.errors.ConfigError`
naming what to set: no ``labels`` in the batches, labels that are not the input ids, padding on
the left or trained on, packing or padding-free batches, label smoothing, a loss that is not the
mean cross-entropy over the ``labels != -100`` tokens, an optimizer other than AdamW / Adam
without decay / SGD, several processes, a PEFT model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .._files import digest_file
from ..errors import ConfigError, InvalidValueError, RunFolderError
from ..gradients.batched import TrainExample
from .config import TrainCfg
from .finetuning import examples_digest, identity, save_tensors, write_json

try:  # the callback base class; transformers is in the model extra
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the model extra is missing
    TrainerCallback = object  # type: ignore[misc,assignment]

logger = logging.getLogger("policytrace.train.callback")

INDEX = "_policytrace_index"
"""The train dataset's added column: each row's position in the dataset."""
ROWS = "_policytrace_rows"
"""The batch key the collator wrapper adds (taken off again before the model sees the batch)."""

NO_LABELS = ("the training batches carry no 'labels', so policytrace cannot tell which tokens were trained on: use a "
             "data collator that sets labels (-100 on the tokens not trained), e.g. "
             "DataCollatorForLanguageModeling(tokenizer, mlm=False), or TRL's SFTTrainer (completion_only_loss / "
             "assistant_only_loss)")
SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine"}


class _Rows:
    """What the collator saw of a batch: per row its dataset index, token ids and trained mask.
    An opaque object: the Trainer's input preparation passes it through untouched."""

    __slots__ = ("index", "ids", "trained")

    def __init__(self, index: list[int], ids: list[tuple[int, ...]], trained: list[tuple[bool, ...]]) -> None:
        self.index, self.ids, self.trained = index, ids, trained


def batch_rows(batch: Mapping) -> tuple[list[tuple[int, ...]], list[tuple[bool, ...]]]:
    """Each row's real tokens and trained mask from a collated causal-LM batch (right padding;
    token t is trained when ``labels[t] != -100``, t ≥ 1, the Trainer's shifted loss)."""
    if "labels" not in batch:
        raise ConfigError(NO_LABELS)
    for key in ("shift_labels", "cu_seq_lens_q", "seq_idx"):
        if key in batch:
            raise ConfigError(f"the batches carry '{key}' (packed or padding-free batches): policytrace records one "
                              "example per row; set packing = False and padding_free = False")
    ids, labels = batch["input_ids"], batch["labels"]
    if not (torch.is_tensor(ids) and torch.is_tensor(labels)) or ids.shape != labels.shape or ids.dim() != 2:
        raise ConfigError("the batches' input_ids and labels must be tensors of the same (batch, length) shape; "
                          "use a collator that returns tensors (return_tensors='pt')")
    ids, labels = ids.cpu(), labels.cpu()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
    if not bool((mask.cummin(dim=1).values == mask).all()):
        raise ConfigError("a batch is padded on the left (or has holes in its attention_mask): policytrace replays "
                          "right-padded rows; set tokenizer.padding_side = 'right' (or the collator's padding_side)")
    if bool((labels.ne(-100) & ~mask).any()):
        raise ConfigError("the labels train on padding tokens: set labels = -100 where attention_mask is 0 "
                          "(DataCollatorForLanguageModeling does)")
    trained = labels.ne(-100)
    trained[:, 0] = False  # the first token is never predicted
    if bool((trained & labels.ne(ids)).any()):
        raise ConfigError("the labels differ from the input ids on trained tokens: policytrace attributes the "
                          "causal LM loss on the batch's own tokens; set labels = input_ids (-100 where not trained)")
    if "position_ids" in batch:
        pos = batch["position_ids"].cpu()
        want = torch.arange(ids.shape[1]).expand_as(ids)
        if pos.shape != ids.shape or bool((pos.ne(want) & mask).any()):
            raise ConfigError("the batches' position_ids restart inside a row (packed or padding-free batches): set "
                              "packing = False and padding_free = False")
    n = mask.sum(dim=1).tolist()
    ids_l, tr_l = ids.tolist(), trained.tolist()
    return ([tuple(ids_l[b][:n[b]]) for b in range(len(n))], [tuple(tr_l[b][:n[b]]) for b in range(len(n))])


class IndexCollator:
    """The trainer's collator, passing each row's dataset index and tokens along the batch."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, features):
        if not features or not isinstance(features[0], Mapping) or INDEX not in features[0]:
            return self.inner(features)
        index = [int(f[INDEX]) for f in features]
        batch = self.inner([{k: v for k, v in f.items() if k != INDEX} for f in features])
        ids, trained = batch_rows(batch)
        batch[ROWS] = _Rows(index, ids, trained)
        return batch


class _Indexed(torch.utils.data.Dataset):
    """A map-style dataset of mappings with the index column added."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        row = self.inner[i]
        if not isinstance(row, Mapping):
            raise ConfigError(f"the train dataset's rows are {type(row).__name__}, not mappings (input_ids, labels, ...)")
        return {**row, INDEX: i}


def _unwrap_optimizer(opt):
    while type(opt) not in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD) and hasattr(opt, "optimizer"):
        opt = opt.optimizer  # accelerate's AcceleratedOptimizer and the like
    return opt


class RecordingCallback(TrainerCallback):
    """Records a ``transformers.Trainer`` run for trajectory mode (module docstring).

    ``out_dir``: the records' folder (new, or empty); ``ids``: the examples' names — a list
    (one per train dataset row) or the name of a dataset column (default: the column ``id`` when
    there is one, else the row numbers); ``checkpoint_every``: optimizer steps between checkpoints
    (0 = every epoch's end); ``precondition``: "checkpoint" (trajectory mode reads AdamW's v from
    each checkpoint) or "step" (each step's 1/(√v̂+ε) written too: exact, one vector of the
    trained size per step); ``model_name``: the base model's hub id or folder, as a run's
    ``model.name`` names it (default: the model's ``name_or_path``); ``save_model``: write the
    final model to ``out_dir/model`` (``policytrace repair`` reads it)."""

    def __init__(self, out_dir, *, ids=None, checkpoint_every: int = 0, precondition: str = "checkpoint",
                 model_name: str | None = None, save_model: bool = True, check_loss: bool = True) -> None:
        if precondition not in ("checkpoint", "step"):
            raise ConfigError(f"precondition must be 'checkpoint' or 'step' (got {precondition!r})")
        if checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (got {checkpoint_every})")
        self.out = Path(out_dir)
        self.ids_arg = ids
        self.checkpoint_every = checkpoint_every
        self.precondition = precondition
        self.model_name = model_name
        self.save_model = save_model
        self.check_loss = check_loss
        self.trainer = None
        self.seconds = 0.0
        """Wall-clock seconds the callback's own work took (its hooks and files)."""
        self.file_seconds = 0.0
        """Of :attr:`seconds`, writing θ_0, the checkpoints and the final files."""

    # --- attaching ------------------------------------------------------------------------

    def attach(self, trainer) -> "RecordingCallback":
        """Prepare ``trainer`` (dataset index, collator, loss and clip wrappers) and add this
        callback to it. Call once, before ``trainer.train()``."""
        t0 = time.perf_counter()
        args = trainer.args
        if getattr(args, "world_size", 1) > 1:
            raise ConfigError("RecordingCallback records a single-process run (world_size > 1 given): run the "
                              "fine-tune on one process")
        for flag in ("packing", "padding_free"):
            if getattr(args, flag, False):
                raise ConfigError(f"{flag} = True: policytrace records one example per batch row; set {flag} = False")
        if getattr(args, "label_smoothing_factor", 0.0):
            raise ConfigError("label_smoothing_factor > 0: policytrace attributes the plain cross-entropy; set "
                              "label_smoothing_factor = 0")
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise ConfigError("the trainer has a compute_loss_func: policytrace attributes the token-mean "
                              "cross-entropy of the labels; set compute_loss_func = None")
        try:
            from peft import PeftModel

            if isinstance(trainer.model, PeftModel):
                raise ConfigError("the trainer's model is a PEFT (LoRA) model: trajectory mode attributes full-weight "
                                  "fine-tunes; train chosen tensors of the model itself (requires_grad) instead")
        except ImportError:  # pragma: no cover
            pass
        ds = trainer.train_dataset
        if ds is None:
            raise ConfigError("the trainer has no train_dataset")
        if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
            raise ConfigError("the train dataset is iterable: policytrace names each step's rows by their index; pass "
                              "a map-style dataset (a datasets.Dataset or a torch Dataset with __len__)")
        self.n = len(ds)
        self.ids = self._resolve_ids(ds)
        try:
            import datasets

            is_hf = isinstance(ds, datasets.Dataset)
        except ImportError:  # pragma: no cover
            is_hf = False
        if is_hf:
            if INDEX in ds.column_names:
                raise ConfigError(f"the train dataset already has a '{INDEX}' column: attach the callback once")
            trainer.train_dataset = ds.add_column(INDEX, list(range(self.n)))
        else:
            trainer.train_dataset = _Indexed(ds)
        self.dataset = trainer.train_dataset
        if getattr(args, "remove_unused_columns", False) and hasattr(trainer, "_set_signature_columns_if_needed"):
            trainer._set_signature_columns_if_needed()
            if INDEX not in trainer._signature_columns:
                trainer._signature_columns.append(INDEX)
        if trainer.data_collator is None:
            raise ConfigError("the trainer has no data_collator; set one that returns labels")
        self.collator = IndexCollator(trainer.data_collator)
        trainer.data_collator = self.collator
        self._wrap_compute_loss(trainer)
        self._wrap_clip(trainer)
        trainer.add_callback(self)
        self.trainer = trainer
        self.seconds += time.perf_counter() - t0
        return self

    def _resolve_ids(self, ds) -> list[str]:
        given = self.ids_arg
        cols = getattr(ds, "column_names", None) or []
        if given is None:
            if "id" in cols:
                given = "id"
            else:
                return [str(i) for i in range(self.n)]
        if isinstance(given, str):
            if given not in cols:
                raise ConfigError(f"ids = {given!r} is not a column of the train dataset (columns: {cols}); pass ids= a "
                                  "column name or a list with one name per row")
            out = [str(v) for v in ds[given]]
        else:
            out = [str(v) for v in given]
        if len(out) != self.n:
            raise ConfigError(f"ids has {len(out)} names for a train dataset of {self.n} rows; give one per row")
        if len(set(out)) != len(out):
            raise ConfigError("ids repeat: give every train dataset row its own name")
        return out

    def _wrap_compute_loss(self, trainer) -> None:
        inner = trainer.compute_loss
        cb = self

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
            rows = inputs.pop(ROWS, None) if isinstance(inputs, dict) or hasattr(inputs, "pop") else None
            if rows is None or not model.training:
                return inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw)
            t0 = time.perf_counter()
            cb._micro.append(rows)
            cb._token_mean = bool(num_items_in_batch is not None and getattr(trainer, "model_accepts_loss_kwargs", False))
            check = cb.check_loss and not cb._checked
            cb.seconds += time.perf_counter() - t0
            if not check:
                out = inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw)
                loss = out[0] if return_outputs else out
                cb._losses.append(loss.detach())
                return out
            labels = inputs.get("labels")
            loss, outputs = inner(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kw)
            t0 = time.perf_counter()
            cb._losses.append(loss.detach())
            cb._check_first_loss(loss, outputs, labels, num_items_in_batch)
            cb.seconds += time.perf_counter() - t0
            return (loss, outputs) if return_outputs else loss

        trainer.compute_loss = compute_loss

    def _wrap_clip(self, trainer) -> None:
        acc = trainer.accelerator
        inner = acc.clip_grad_norm_
        cb = self

        def clip_grad_norm_(parameters, max_norm, *a, **kw):
            norm = inner(parameters, max_norm, *a, **kw)
            if cb._norm is None:
                cb._norm = norm.detach() if torch.is_tensor(norm) else norm
            return norm

        acc.clip_grad_norm_ = clip_grad_norm_

    # --- the run ----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.trainer is None:
            raise ConfigError("RecordingCallback was not attached: call RecordingCallback(out_dir).attach(trainer) "
                              "before trainer.train() (instead of passing it in callbacks=)")
        t0 = time.perf_counter()
        if state.global_step > 0:
            raise ConfigError("the run resumes from a Trainer checkpoint: RecordingCallback records whole runs from "
                              "step 0; train without resume_from_checkpoint")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise RunFolderError(f"{self.out} exists and is not an empty folder; name a new out_dir for the records")
        self.model = model
        opt = _unwrap_optimizer(optimizer)
        self.opt = opt
        by_param = {p: n for n, p in model.named_parameters()}
        names, groups = [], set()
        for gi, g in enumerate(opt.param_groups):
            for p in g["params"]:
                if p.requires_grad and p in by_param:
                    names.append(by_param[p])
                    groups.add(gi)
        if not names:
            raise ConfigError("the optimizer trains no parameter of the model")
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        self.names = sorted(names, key=order.__getitem__)
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in self.names}
        self.optimizer_kind, self.recipe_fields = self._read_optimizer(opt, args, groups)
        self.max_grad_norm = float(args.max_grad_norm or 0.0)
        self.out.mkdir(parents=True, exist_ok=True)
        t1 = time.perf_counter()
        self.files = {"base.safetensors": save_tensors(self.out / "base.safetensors", self.params)}
        self.file_seconds += time.perf_counter() - t1
        drop = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        drop += [k for k in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                             "dropout") if float(getattr(getattr(model, "config", None), k, 0) or 0) > 0]
        self.warnings = []
        if drop:
            self.warnings.append(f"the model trains with dropout ({drop[0]}): the replay runs without it, so the "
                                 "attribution approximates the run; set the model's dropout to 0 for an exact record")
            logger.warning(self.warnings[-1])
        self.steps: list[dict] = []
        self.checkpoints: list[int] = []
        self.seen: dict[int, TrainExample] = {}
        self._micro: list[_Rows] = []
        self._losses: list[torch.Tensor] = []
        self._norm = None
        self._lr = None
        self._checked = False
        self._token_mean = True
        self.epoch = -1
        self.total = state.max_steps
        self.seconds += time.perf_counter() - t0

    def _read_optimizer(self, opt, args, groups: set[int]) -> tuple[str, dict]:
        """The recipe's optimizer fields from the torch optimizer; others refused naming ``optim``."""
        name = getattr(args, "optim", "?")
        name = getattr(name, "value", name)
        gs = [opt.param_groups[i] for i in sorted(groups)]

        def same(key):
            vals = {json.dumps(g.get(key), default=str) for g in gs}
            if len(vals) > 1:
                what = {"weight_decay": "set weight_decay = 0, or train no bias / norm tensors (the Trainer does not "
                                        "decay them)", "lr": "give every trained tensor the same learning rate"}
                raise ConfigError(f"the optimizer's parameter groups differ in {key} ({', '.join(sorted(vals))}): "
                                  f"policytrace models one {key} for every trained tensor; "
                                  f"{what.get(key, 'use one parameter group')}")
            return gs[0].get(key)

        for key in ("lr", "weight_decay"):
            same(key)
        wd = float(same("weight_decay") or 0.0)
        if type(opt) in (torch.optim.AdamW, torch.optim.Adam):
            for key in ("betas", "eps", "amsgrad", "maximize"):
                same(key)
            g = gs[0]
            if g.get("amsgrad") or g.get("maximize"):
                raise ConfigError(f"optim = {name!r} with amsgrad or maximize: policytrace models plain AdamW; set "
                                  "optim = 'adamw_torch' without them")
            if type(opt) is torch.optim.Adam and wd > 0:
                raise ConfigError(f"optim = {name!r} is Adam with coupled (L2) weight decay: policytrace models AdamW's "
                                  "decoupled decay; set optim = 'adamw_torch'")
            if g.get("decoupled_weight_decay") is False and type(opt) is torch.optim.AdamW:
                raise ConfigError(f"optim = {name!r} without decoupled weight decay; set optim = 'adamw_torch'")
            b1, b2 = (float(b) for b in g["betas"])
            return "adamw", {"optimizer": "adamw", "betas": (b1, b2), "eps": float(g["eps"]), "weight_decay": wd}
        if type(opt) is torch.optim.SGD:
            for key in ("momentum", "dampening", "nesterov", "maximize"):
                same(key)
            g = gs[0]
            mu = float(g.get("momentum") or 0.0)
            if g.get("nesterov") or float(g.get("dampening") or 0.0) or g.get("maximize"):
                raise ConfigError(f"optim = {name!r} with nesterov, dampening or maximize: policytrace models SGD "
                                  "with plain momentum; set optim_args without them")
            if wd > 0 and mu > 0:
                raise ConfigError(f"optim = {name!r}: SGD's weight decay is coupled (L2), which policytrace models only "
                                  "without momentum; set weight_decay = 0 or momentum = 0")
            return "sgd", {"optimizer": "sgd", "momentum": mu, "weight_decay": wd}
        raise ConfigError(f"optim = {name!r} ({type(opt).__name__}): policytrace models AdamW and SGD with momentum; "
                          "set optim = 'adamw_torch' (or 'adamw_torch_fused', 'sgd')")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._lr = float(self.opt.param_groups[0]["lr"])

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.precondition == "step" and self.optimizer_kind == "adamw":
            t0 = time.perf_counter()
            s = state.global_step + 1
            save_tensors(self.out / "precond" / f"step-{s}.safetensors",
                         {n: self._u(n, s) for n in self.names})
            self.seconds += time.perf_counter() - t0

    def _u(self, name: str, s: int) -> torch.Tensor:
        st = self.opt.state[self.params[name]]
        b2, eps = self.recipe_fields["betas"][1], self.recipe_fields["eps"]
        return 1.0 / ((st["exp_avg_sq"].sqrt() / math.sqrt(1.0 - b2**s)) + eps)

    def on_step_end(self, args, state, control, **kwargs):
        t0 = time.perf_counter()
        s = state.global_step
        micro, self._micro = self._micro, []
        if not micro:
            raise ConfigError("a training step saw no recorded batch: the trainer's data collator or compute_loss was "
                              "replaced after attach(); call attach() last, just before trainer.train()")
        n = [[sum(tr) for tr in r.trained] for r in micro]
        if self._token_mean:
            N = sum(sum(x) for x in n)
            coef = [[k / N if N else 0.0 for k in x] for x in n]
        else:  # each micro-batch's own token mean, divided by the step's micro-batch count
            coef = [[k / (sum(x) * len(micro)) if sum(x) else 0.0 for k in x] for x in n]
        examples, c = [], []
        for r, cs in zip(micro, coef):
            for b, i in enumerate(r.index):
                e = TrainExample(r.ids[b], r.trained[b])
                old = self.seen.setdefault(i, e)
                if old != e:
                    raise InvalidValueError(f"dataset row {i} ('{self.ids[i]}') came out of the collator with other "
                                            "tokens or labels than before: policytrace attributes fixed examples; "
                                            "make the collator deterministic")
                if cs[b] > 0:
                    examples.append(i)
                    c.append(cs[b])
        losses, self._losses = self._losses, []
        self.steps.append({"step": s, "epoch": self.epoch, "lr": self._lr, "_norm": self._norm,
                           "_loss": torch.stack([x.float() for x in losses]).sum() if losses else 0.0,
                           "examples": examples, "coef": c})
        self._norm = None
        if self.checkpoint_every and s % self.checkpoint_every == 0:
            self._checkpoint(s)
        self.seconds += time.perf_counter() - t0

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.checkpoint_every and self.steps:
            t0 = time.perf_counter()
            self._checkpoint(state.global_step)
            self.seconds += time.perf_counter() - t0

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        t0 = time.perf_counter()
        if not self.steps:
            raise InvalidValueError("the run took no optimizer step; nothing to record")
        S = self.steps[-1]["step"]
        self._checkpoint(S)
        t1 = time.perf_counter()
        self._finish(S, processing_class if processing_class is not None else kwargs.get("tokenizer"))
        self.file_seconds += time.perf_counter() - t1
        self.seconds += time.perf_counter() - t0

    # --- files ----------------------------------------------------------------------------

    def _settle(self) -> None:
        """Turn the steps' device scalars into numbers (one sync per checkpoint, not per step)."""
        for st in self.steps:
            if "_norm" in st:
                norm = st.pop("_norm")
                norm = float(norm) if norm is not None else float("nan")
                m = self.max_grad_norm
                st["grad_norm"] = norm
                st["clip"] = min(1.0, m / (norm + 1e-6)) if m > 0 else 1.0
                st["loss"] = float(st.pop("_loss"))

    def _recipe(self) -> TrainCfg:
        args = self.trainer.args
        kind = getattr(args, "lr_scheduler_type", "constant")
        kind = getattr(kind, "value", kind)
        warm = args.get_warmup_steps(self.total) if hasattr(args, "get_warmup_steps") else 0
        lens = [len(e) for e in self.seen.values()] or [1]
        return TrainCfg(**self.recipe_fields, lr=float(args.learning_rate), schedule=SCHEDULES.get(kind, "constant"),
                        warmup_steps=int(warm), batch_size=int(args.per_device_train_batch_size),
                        grad_accum=int(args.gradient_accumulation_steps),
                        epochs=max(1, self.epoch + 1), max_grad_norm=self.max_grad_norm,
                        loss="token_mean" if self._token_mean else "example_mean", seed=int(args.seed),
                        checkpoint_every=self.checkpoint_every, params=tuple(self.names),
                        precondition=self.precondition, max_length=max(lens))

    def _identity(self) -> tuple[dict, str]:
        from ..model.loading import model_identity

        name = self.model_name or getattr(self.model, "name_or_path", "") or ""
        ident_model = model_identity(str(name), None) if name else ""
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        exs = self._examples()
        return identity(self._recipe(), ident_model, self.names, shapes, examples_digest(exs, np.ones(len(exs)))), name

    def _examples(self) -> list[TrainExample]:
        missing = [i for i in range(self.n) if i not in self.seen]
        for lo in range(0, len(missing), 64):  # rows the run never reached: collated, never trained
            part = missing[lo:lo + 64]
            keep = self._columns()
            batch = self.collator.inner([{k: v for k, v in self.dataset[i].items() if k != INDEX and (keep is None or k in keep)}
                                         for i in part])
            ids, trained = batch_rows(batch)
            for i, a, b in zip(part, ids, trained):
                self.seen[i] = TrainExample(a, b)
        return [self.seen[i] for i in range(self.n)]

    def _columns(self) -> set | None:
        """The dataset columns the Trainer's collator receives (None = all)."""
        t = self.trainer
        if getattr(t.args, "remove_unused_columns", False) and getattr(t, "_signature_columns", None):
            return set(t._signature_columns)
        return None

    def _checkpoint(self, s: int) -> None:
        if s in self.checkpoints:
            return
        t0 = time.perf_counter()
        try:
            self._write_checkpoint(s)
        finally:
            self.file_seconds += time.perf_counter() - t0

    def _write_checkpoint(self, s: int) -> None:
        self._settle()
        folder = self.out / "checkpoints" / f"step-{s}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {}
        for n in self.names:
            st = self.opt.state.get(self.params[n], {})
            if self.optimizer_kind == "adamw":
                state[f"m.{n}"] = st.get("exp_avg", torch.zeros_like(self.params[n]))
                state[f"v.{n}"] = st.get("exp_avg_sq", torch.zeros_like(self.params[n]))
            else:
                buf = st.get("momentum_buffer")
                state[f"m.{n}"] = buf if buf is not None else torch.zeros_like(self.params[n])
        files = {"trained.safetensors": save_tensors(folder / "trained.safetensors", self.params),
                 "optimizer.safetensors": save_tensors(folder / "optimizer.safetensors", state),
                 "records.json": write_json(folder / "records.json", {"steps": self.steps})}
        write_json(folder / "done.json", {"step": s, "files": files})
        self.checkpoints.append(s)

    def _finish(self, S: int, tokenizer) -> None:
        self._settle()
        ident, name = self._identity()
        for c in self.checkpoints:  # the identity is known only now: add it to every checkpoint marker
            folder = self.out / "checkpoints" / f"step-{c}"
            doc = json.loads((folder / "done.json").read_text())
            write_json(folder / "done.json", {**doc, "identity": ident})
        exs = self._examples()
        dtype = str(next(iter(self.params.values())).dtype).replace("torch.", "")
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        rec = {**ident, "ids": self.ids, "n_examples": self.n, "checkpoints": list(self.checkpoints),
               "steps": self.steps, "precondition": self.precondition, "total_steps": S,
               "base_model": {"name": str(name), "label": str(name), "dtype": dtype, "device": "cpu",
                              "chat_template": "", "gguf_file": ""},
               "pad_id": pad if pad is not None else 0,
               "callback": {"trainer": type(self.trainer).__name__, "optim": str(getattr(self.trainer.args, "optim", "")),
                            "lr_scheduler_type": str(getattr(self.trainer.args, "lr_scheduler_type", "")),
                            "token_mean": self._token_mean, "loss_checked": self._checked,
                            "warnings": self.warnings, "seconds": round(self.seconds, 3)}}
        files = {"base.safetensors": self.files["base.safetensors"]}
        if self.save_model:
            model_dir = self.out / "model"
            self.model.save_pretrained(model_dir, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(model_dir)
            for f in sorted(model_dir.rglob("*")):
                if f.is_file():
                    files[f.relative_to(self.out).as_posix()] = digest_file(f)
        files["records.json"] = write_json(self.out / "records.json", rec)
        files["examples.json"] = write_json(self.out / "examples.json",
                                            [[list(e.ids), [int(t) for t in e.trained]] for e in exs])
        write_json(self.out / "done.json", {"identity": ident, "files": files})

    # --- the first step's check -------------------------------------------------------------

    def _check_first_loss(self, loss, outputs, labels, num_items_in_batch) -> None:
        """The Trainer's loss of the first micro-batch against the recorded coefficients' loss,
        Σ_t CE_t / (tokens the step normalises by), from the logits the model returned."""
        self._checked = True
        logits = getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, Mapping):
            logits = outputs.get("logits")
        if logits is None or labels is None or logits.dim() != 3:
            self._checked = False
            self.warnings.append("the first step's loss was not checked (the model returned no logits)")
            return
        with torch.no_grad():
            lg = logits[:, :-1].float()
            tg = labels[:, 1:].to(lg.device)
            ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100,
                                                   reduction="sum")
            n_mb = int(tg.ne(-100).sum())
            denom = float(num_items_in_batch) if self._token_mean else float(n_mb)
            want = float(ce) / denom if denom else 0.0
            got = float(loss.detach().float())
        if not math.isclose(got, want, rel_tol=2e-3, abs_tol=1e-6):
            raise ConfigError(f"the trainer's loss ({got:.6g}) is not the mean cross-entropy over the labels != -100 "
                              f"tokens ({want:.6g}): policytrace attributes that loss; remove the custom loss "
                              "(compute_loss override, loss_type, label smoothing) or set it to the token mean")
