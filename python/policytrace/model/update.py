"""The per-pair update (method step 4, docs/design.md): from the base weights θ0 take the
configured update on one SFT pair and return the updated weights as a separate tensor dict.

θ0 is never written: gradients come from ``torch.func.grad`` over a functional call, and the
updated weights are new tensors (only for the parameters the update touches; the rest are the
base tensors themselves), so there is no snapshot/restore and nothing to restore exactly.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import torch

from ..errors import ConfigError, NonFiniteError
from .chat import ChatPair, chat_pair_tokens, pair_tokens
from .config import UpdateCfg
from .functional import Functional, upcast

# Adam's moment decay rates and epsilon (PyTorch's defaults; not configurable).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

__all__ = ["ADAM_BETAS", "ADAM_EPS", "ChatPair", "UpdateEngine", "add_lora", "pair_tokens", "selected_names"]


def selected_names(model, spec: str | Sequence[str]) -> list[str]:
    """Names of the parameters ``update.params`` selects ("all", "mlp" or glob patterns)."""
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        return names
    if spec == "mlp":
        chosen = [n for n in names if ".mlp." in n]
    else:
        pats = [spec] if isinstance(spec, str) else list(spec)
        chosen = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    if not chosen:
        raise ConfigError(f"update.params = {spec!r} selects no parameter of this model")
    return chosen


def add_lora(model, cfg: UpdateCfg, seed: int = 0) -> None:
    """Inject LoRA adapters in place (peft), once; a no-op if the model already has them.
    Adapters start with B = 0, so the model's outputs are unchanged, and each pair trains a
    fresh copy of them from that init."""
    if any("lora_" in n for n, _ in model.named_parameters()):
        return
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ConfigError("update.lora_rank > 0 needs peft: pip install peft") from e
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(
            LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                       lora_dropout=0.0, bias="none"),
            model,
        )
    except ValueError as e:
        raise ConfigError(f"update.lora_targets {list(cfg.lora_targets)} do not match this model: {e}") from e
    for p in model.parameters():
        p.requires_grad_(False)


class UpdateEngine:
    """Per-pair updates of one model under one ``[update]`` recipe.

    Args:
        model, tokenizer: the base model (weights frozen, never written) and its tokenizer.
        cfg: the update recipe (defaults are the paper's: one plain SGD step at lr 1e-4 on all
            parameters, loss on the response tokens only; a chat pair's loss mask is in
            model/chat.py).
        device: where the pair's tokens go.
        seed: seeds LoRA's adapter initialisation.
    """

    def __init__(self, model: Any, tokenizer: Any, cfg: UpdateCfg | None = None, device: str = "cpu",
                 seed: int = 0) -> None:
        cfg = cfg if cfg is not None else UpdateCfg()
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        if cfg.lora_rank > 0:
            add_lora(model, cfg, seed)
            self.trainable = [n for n, _ in model.named_parameters() if "lora_" in n]
        else:
            self.trainable = selected_names(model, cfg.params)
        self.base = {n: p.detach() for n, p in model.named_parameters()}
        self._fn = Functional(model)

    def _forward(self, ids, positions):
        # Vocabulary logits only where the loss needs them: the positions predicting the trained
        # tokens (a slice for one contiguous span, as a flat pair's response, else an index).
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state
        return self.model.get_output_embeddings()(hidden[0, positions])

    def _loss(self, train: dict, ids, targets, positions):
        logits = self._fn.call({**self.base, **train}, self._forward, ids, positions)
        return torch.nn.functional.cross_entropy(upcast(logits), targets)

    def tokens(self, prompt: str, response: str, pair_id: str = "?") -> tuple[torch.Tensor, int]:
        """The pair's chat token ids (1, T) on the device and where its response starts."""
        full, start = pair_tokens(self.tokenizer, prompt, response, pair_id, self.cfg.max_length)
        return torch.tensor([full], device=self.device), start

    def example(self, pair: ChatPair) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair's chat token ids (1, T) and its loss mask (T,) (bool; True where a token is a
        target), both on the device: the loss is the mean cross-entropy of the masked tokens,
        each predicted from the position before it (model/chat.py: the rule)."""
        t = chat_pair_tokens(self.tokenizer, pair, self.cfg.max_length)
        return (torch.tensor([t.ids], device=self.device),
                torch.tensor(t.mask, dtype=torch.bool, device=self.device))

    def _targets(self, pair: ChatPair):
        """ids, the trained tokens, and the positions whose logits predict them."""
        t = chat_pair_tokens(self.tokenizer, pair, self.cfg.max_length)
        ids = torch.tensor([t.ids], device=self.device)
        span = t.span
        if span is not None:  # the flat case: the slices the response-only loss always used
            return ids, ids[0, span[0]:span[1]], slice(span[0] - 1, span[1] - 1)
        at = torch.tensor([i for i, m in enumerate(t.mask) if m], device=self.device)
        return ids, ids[0, at], at - 1

    def gradient(self, prompt: str, response: str, pair_id: str = "?") -> dict:
        """∇θ of the pair's response-only loss at θ0, for the trainable parameters."""
        return self.gradient_pair(ChatPair.flat(prompt, response, pair_id))

    def gradient_pair(self, pair: ChatPair, at: dict | None = None) -> dict:
        """∇θ of the pair's masked loss at θ0 (or at the weights ``at``), for the trainable
        parameters."""
        ids, targets, positions = self._targets(pair)
        origin = self.base if at is None else at
        train = {n: origin[n] for n in self.trainable}
        return torch.func.grad(self._loss)(train, ids, targets, positions)

    def loss_pair(self, pair: ChatPair, at: dict | None = None) -> float:
        """The pair's masked loss (mean cross-entropy of its trained tokens) at θ0 or ``at``."""
        ids, targets, positions = self._targets(pair)
        origin = self.base if at is None else at
        with torch.no_grad():
            return float(self._loss({n: origin[n] for n in self.trainable}, ids, targets, positions))

    def update(self, prompt: str, response: str, pair_id: str = "?", from_params: dict | None = None) -> dict:
        """Weights after the update on a prompt/response pair (:meth:`update_pair`)."""
        return self.update_pair(ChatPair.flat(prompt, response, pair_id), from_params)

    def update_pair(self, pair: ChatPair, from_params: dict | None = None, weight: float = 1.0) -> dict:
        """Weights after the update, as a name → tensor dict (base tensors where untouched).

        ``from_params`` (weights returned by an earlier call) continues from there instead of θ0:
        fine-tuning on a sequence of pairs, as the validation's subset retraining does.
        ``weight`` multiplies the pair's loss (a down-weighted pair in a repair's retraining:
        with SGD the step scales with it; Adam's normalized step barely depends on it)."""
        pair_id = pair.id
        ids, targets, positions = self._targets(pair)
        origin = self.base if from_params is None else from_params
        train = {n: origin[n] for n in self.trainable}
        loss = self._loss if weight == 1.0 else (lambda t, *a: weight * self._loss(t, *a))
        grad_fn = torch.func.grad(loss)
        if self.cfg.optimizer == "adam":
            m = {n: torch.zeros_like(p) for n, p in train.items()}
            v = {n: torch.zeros_like(p) for n, p in train.items()}
        b1, b2 = ADAM_BETAS
        for step in range(1, self.cfg.steps + 1):
            g = grad_fn(train, ids, targets, positions)
            if self.cfg.optimizer == "sgd":
                new_train = {n: p - self.cfg.lr * g[n] for n, p in train.items()}
                self._check_survival(new_train, train, g, pair_id)
                train = new_train
            else:
                new = {}
                for n, p in train.items():
                    m[n] = b1 * m[n] + (1 - b1) * g[n]
                    v[n] = b2 * v[n] + (1 - b2) * g[n] * g[n]
                    mhat = m[n] / (1 - b1**step)
                    vhat = v[n] / (1 - b2**step)
                    new[n] = p - self.cfg.lr * mhat / (vhat.sqrt() + ADAM_EPS)
                train = new
            del g
            self._check_finite(train, pair_id, step)
        return {**origin, **train}

    def survival(self, new: dict, origin: dict, intended: dict) -> float:
        """The share of the intended change that the stored weights carry: the projection of the
        realized change ``new − origin`` on the intended one (computed in float32), over its norm
        squared. 1 in float32/float64; in bfloat16 a step at lr 1e-4 mostly rounds away."""
        num = den = 0.0
        for n, d in intended.items():
            real = new[n].float() - origin[n].float()
            num += float((real * d).sum())
            den += float((d * d).sum())
        return num / den if den > 0 else 1.0

    def _check_survival(self, new: dict, origin: dict, g: dict, pair_id: str) -> None:
        """Low-precision weights: stop when the stored update lost more than allowed."""
        dtype = next(iter(new.values())).dtype
        if dtype not in (torch.bfloat16, torch.float16) or self.cfg.steps != 1 or self.cfg.optimizer != "sgd":
            return
        intended = {n: -self.cfg.lr * g[n].float() for n in g}
        share = self.survival(new, origin, intended)
        self.last_survival = share
        if share < self.cfg.min_update_share:
            raise ConfigError(
                f"pair '{pair_id}': in {str(dtype).replace('torch.', '')} weights only {100 * share:.0f}% of the "
                f"update at update.lr = {self.cfg.lr:g} survives rounding (update.min_update_share = "
                f"{self.cfg.min_update_share:g}); set model.dtype = \"float32\" (the update and probe pass then keep "
                "it), or run.mode = \"gradient\" (first order: the step is never added to rounded weights), or "
                "raise update.lr if a larger step is what you mean")

    def _check_finite(self, train: dict, pair_id: str, step: int) -> None:
        names = list(train)
        finite = torch.stack([torch.isfinite(train[n]).all() for n in names])
        if bool(finite.all()):  # one device sync per step
            return
        name = names[int((~finite).nonzero()[0])]
        raise NonFiniteError(
            f"the update of pair '{pair_id}' diverged: parameter '{name}' holds NaN or inf after "
            f"step {step} at update.lr = {self.cfg.lr:g} ({self.cfg.optimizer}); lower update.lr"
        )
