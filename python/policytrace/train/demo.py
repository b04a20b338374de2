"""``policytrace demo --finetune``: the recipe the demo fine-tunes the embedded default with.

A realistic recipe (AdamW, batches of 4, 2 epochs, token-mean loss, a short warmup) on the MLP
down-projections of the layers up to the SAE's and the last ones — a subset of the weights so
that a 2-core CPU attributes the run in minutes (trajectory mode holds each concept's gradient
over the trained tensors per checkpoint)."""

from __future__ import annotations

DEMO_FINETUNE: dict[str, dict] = {
    "run": {"mode": "trajectory"},
    "data": {"max_pairs": 48},
    "train": {"optimizer": "adamw", "lr": 5e-5, "batch_size": 4, "epochs": 2, "schedule": "constant",
              "warmup_steps": 2, "loss": "token_mean", "weight_decay": 0.0, "seed": 0,
              "params": ["model.layers.*.mlp.down_proj.weight"]},
}
