"""What the trajectory and callback tests share: a float64 tiny LM, random training examples,
a config holding only a recipe, and one scalar concept of the model with its gradient."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from policytrace.gradients.batched import TrainExample
from policytrace.model.loading import LoadedModel
from policytrace.train.config import TrainCfg
from policytrace.train.finetuning import trained_tensors

from _tiny import tiny_causal_lm, tiny_tokenizer

PROBE = [7, 9, 11, 13, 15]


@dataclasses.dataclass(frozen=True)
class Cfg:
    train: TrainCfg
    model: object = None
    update: object = None


def tiny_lm(seed: int = 0) -> LoadedModel:
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    return LoadedModel(tiny_causal_lm("llama", len(tok), seed=seed).double(), tok, "tiny", f"tiny-{seed}")


def examples(tok, n: int = 7) -> list[TrainExample]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        L = int(rng.integers(6, 12))
        out.append(TrainExample.from_start(rng.integers(5, len(tok), L).tolist(), int(rng.integers(2, L - 2))))
    return out


def concept(net, names):
    """A scalar of the model: the logit of token 20 after a fixed prompt (``value``), and its
    gradient over the trained tensors as one (1, N) row (``grads``)."""
    params = trained_tensors(net, names)

    def value():
        with torch.no_grad():
            return float(net(torch.tensor([PROBE])).logits[0, -1, 20])

    def grads():
        flags = {n: p.requires_grad for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        out = net(torch.tensor([PROBE])).logits[0, -1, 20]
        g = torch.autograd.grad(out, list(params.values()))
        for n, p in params.items():
            p.requires_grad_(flags[n])
        return torch.cat([x.reshape(-1) for x in g])[None]

    return value, grads
