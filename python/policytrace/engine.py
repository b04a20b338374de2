"""The per-pair update engine (DESIGN §1 step 4): from the base weights θ0 take the configured
update on one SFT pair and return the updated weights as a separate tensor dict.

θ0 is never written: gradients come from ``torch.func.grad`` over a functional call, and the
updated weights are new tensors (only for the parameters the update touches; the rest are the
base tensors themselves), so there is no snapshot/restore and nothing to restore exactly.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError, InvalidValueError
from .probe import _swap_module, _upcast, format_prompt

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class UpdateConfig:
    """How a pair updates the model. Defaults are the paper's: one plain SGD step at lr 1e-4
    on all parameters, loss on the response tokens only."""

    optimizer: str = "sgd"
    lr: float = 1e-4
    steps: int = 1
    params: str | tuple[str, ...] = "all"  # "all", "mlp", or glob patterns of parameter names
    max_length: int = 512
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # LoRA (through peft): rank 0 = off. Adapters are injected once (B = 0, so the model's
    # outputs are unchanged) and each pair trains a fresh copy of them from that init.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"update.optimizer must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        if not (self.lr > 0):
            raise ConfigError(f"update.lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ConfigError(f"update.steps must be >= 1, got {self.steps}")
        if self.lora_rank < 0:
            raise ConfigError(f"update.lora_rank must be >= 0, got {self.lora_rank}")


def pair_tokens(tokenizer, prompt: str, response: str, pair_id: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the full chat (user + assistant) and where the response starts.

    The chat with the response must begin with exactly the tokens of the prompt with its
    generation prompt; otherwise the response-only loss mask would be wrong.
    """
    prompt_ids = format_prompt(tokenizer, prompt)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    full = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if full[: len(prompt_ids)] != prompt_ids:
        raise InvalidValueError(
            f"pair '{pair_id}': the chat template renders the prompt differently with and without "
            "the response, so the response tokens cannot be isolated; set model.chat_template"
        )
    if len(full) <= len(prompt_ids):
        raise InvalidValueError(f"pair '{pair_id}': the response adds no tokens")
    if len(full) > max_length:
        raise InvalidValueError(
            f"pair '{pair_id}' is {len(full)} tokens long, over update.max_length = {max_length} "
            "(never truncated): shorten it or raise the limit"
        )
    return full, len(prompt_ids)


def selected_names(model, spec: str | Sequence[str]) -> list[str]:
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


def add_lora(model, cfg: UpdateConfig) -> None:
    """Inject LoRA adapters in place (peft), once; a no-op if the model already has them."""
    if any("lora_" in n for n, _ in model.named_parameters()):
        return
    try:
        import torch
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ConfigError("update.lora_rank > 0 needs peft: pip install peft") from e
    torch.manual_seed(cfg.lora_seed)
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
    def __init__(self, model: Any, tokenizer: Any, cfg: UpdateConfig, device: str = "cpu") -> None:
        import torch

        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        if cfg.lora_rank > 0:
            add_lora(model, cfg)
            self.trainable = [n for n, _ in model.named_parameters() if "lora_" in n]
        else:
            self.trainable = selected_names(model, cfg.params)
        self.base = {n: p.detach() for n, p in model.named_parameters()}
        self._swap = _swap_module(model)
        self._torch = torch

    def _forward(self, ids, start):
        # Vocabulary logits only where the loss needs them: the positions predicting the
        # response tokens.
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state
        return self.model.get_output_embeddings()(hidden[0, start - 1 : -1])

    def _loss(self, train: dict, ids, targets, start):
        torch = self._torch
        params = {f"m.{k}": v for k, v in {**self.base, **train}.items()}
        logits = torch.func.functional_call(self._swap, params, (self._forward, ids, start))
        return torch.nn.functional.cross_entropy(_upcast(logits), targets)

    def gradient(self, prompt: str, response: str, pair_id: str = "?") -> dict:
        """∇θ of the pair's response-only loss at θ0, for the trainable parameters."""
        torch = self._torch
        full, start = pair_tokens(self.tokenizer, prompt, response, pair_id, self.cfg.max_length)
        ids = torch.tensor([full], device=self.device)
        train = {n: self.base[n] for n in self.trainable}
        return torch.func.grad(self._loss)(train, ids, ids[0, start:], start)

    def update(self, prompt: str, response: str, pair_id: str = "?", from_params: dict | None = None) -> dict:
        """Weights after the update, as a name → tensor dict (base tensors where untouched).

        ``from_params`` (weights returned by an earlier call) continues from there instead of θ0:
        fine-tuning on a sequence of pairs, as the validation's subset retraining does."""
        torch = self._torch
        full, start = pair_tokens(self.tokenizer, prompt, response, pair_id, self.cfg.max_length)
        ids = torch.tensor([full], device=self.device)
        targets = ids[0, start:]
        origin = self.base if from_params is None else from_params
        train = {n: origin[n] for n in self.trainable}
        grad_fn = torch.func.grad(self._loss)
        if self.cfg.optimizer == "adam":
            m = {n: torch.zeros_like(p) for n, p in train.items()}
            v = {n: torch.zeros_like(p) for n, p in train.items()}
        b1, b2 = self.cfg.adam_betas
        for step in range(1, self.cfg.steps + 1):
            g = grad_fn(train, ids, targets, start)
            if self.cfg.optimizer == "sgd":
                train = {n: p - self.cfg.lr * g[n] for n, p in train.items()}
            else:
                new = {}
                for n, p in train.items():
                    m[n] = b1 * m[n] + (1 - b1) * g[n]
                    v[n] = b2 * v[n] + (1 - b2) * g[n] * g[n]
                    mhat = m[n] / (1 - b1**step)
                    vhat = v[n] / (1 - b2**step)
                    new[n] = p - self.cfg.lr * mhat / (vhat.sqrt() + self.cfg.adam_eps)
                train = new
            del g
        return {**origin, **train}
