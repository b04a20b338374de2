"""The ``[train]`` table: the fine-tuning recipe that ``policytrace finetune`` runs and that
trajectory mode (``run.mode = "trajectory"``) attributes. Free of torch, so configs load without
the model extra. The names ``optimizer``, ``lr``, ``batch_size``, ``epochs``, ``schedule``,
``weight_decay``, ``loss`` and ``seed`` are fixed by issue 21 (scripts rely on them)."""

from __future__ import annotations

from typing import ClassVar, Literal

from .._tables import fail, table


@table("train")
class TrainCfg:
    # Left out of the run's identity while at its default, so earlier run folders still resume.
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("second_moment", "pair_value", "simulations")

    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw (decoupled weight decay, PyTorch's AdamW) or sgd with momentum (decay decoupled
    too: θ ← (1 − lr·λ)θ − lr·b, b ← μ·b + g)."""
    lr: float = 5e-5
    """Peak learning rate."""
    momentum: float = 0.0
    """SGD's momentum μ (0 = plain SGD); ignored by adamw."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW's (β1, β2)."""
    eps: float = 1e-8
    """AdamW's ε, added to √v̂."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warmup: constant, linear decay or cosine decay (towards 0; never 0 at
    a step taken)."""
    warmup_steps: int = 0
    """Steps of linear warmup: step s ≤ W takes lr·s/W."""
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (an optimizer step's batch is their union)."""
    epochs: int = 2
    """Passes over the pairs, each in its own seeded order."""
    weight_decay: float = 0.0
    """Decoupled weight decay λ."""
    max_grad_norm: float = 0.0
    """Clip the step's gradient to this global norm (0 = off)."""
    loss: Literal["token_mean", "example_mean"] = "token_mean"
    """token_mean: cross-entropy averaged over all trained tokens of the step's batch (HF
    Trainer's); example_mean: each example's mean, averaged over the batch."""
    seed: int = 0
    """Seed of the epochs' orders (and LoRA's init)."""
    checkpoint_every: int = 0
    """Save weights and optimizer state every N optimizer steps (0 = at the end of every epoch);
    trajectory mode refreshes the concept gradients at each checkpoint."""
    lora: int = 0
    """LoRA rank: 0 = full weights of `train.params`; > 0 = peft LoRA adapters of this rank on
    `update.lora_targets` (alpha `update.lora_alpha`), merged into the saved model."""
    params: str | tuple[str, ...] = "all"
    """Parameters trained (full weights): "all", "mlp", or glob patterns of parameter names."""
    precondition: Literal["checkpoint", "step"] = "checkpoint"
    """The AdamW preconditioner trajectory mode uses: checkpoint = 1/(√v̂+ε) frozen at each
    checkpoint (read from the checkpoint's optimizer state; nothing more stored), step = every
    step's own (exact; the fine-tune stores one vector of the trained size per step: tiny and
    small runs)."""
    max_length: int = 512
    """Longest chat-formatted pair in tokens; longer pairs are an error."""
    concept_path: Literal["midpoint", "start"] = "midpoint"
    """Trajectory mode: the concept gradient a step is weighed by. midpoint = the gradients at
    the checkpoints before and after the step interpolated to its middle (second order; one
    more concept pass, at the final weights); start = the gradient at the checkpoint before it
    (first order: overstates a change that saturates over the run). Not part of the recipe."""
    second_moment: Literal["fixed", "differentiated"] = "fixed"
    """Trajectory mode under adamw: fixed = each pair's share of the updates the run took, with
    1/(√v̂+ε) as recorded (the shares add up to the change: completeness); differentiated = the
    derivative with respect to the pair's loss weight through v̂ too, what removing or
    down-weighting it changes once Adam renormalises (these sum to about zero, so completeness
    is still checked on the shares; one more replay, one float64 vector of the trained size per
    step held in memory). sgd ignores it. Not part of the recipe."""
    pair_value: Literal["share", "counterfactual"] = "share"
    """Trajectory mode: what a pair's attribution is. share = its share of the updates the run
    took (they add up to the run's change); counterfactual = its coefficient in the least-squares
    additive fit of retrains of random subsets with this recipe, simulated to first order in the
    weights (per-example
    gradients at θ_0, AdamW's renormalisation included): what including the pair changes when
    the run is retrained (memory: pairs × trained size floats). Completeness is checked on the
    shares either way. Not part of the recipe."""
    simulations: int = 0
    """Simulated subset retrains behind `pair_value = "counterfactual"` (0 = max(1024, 8 × pairs);
    at least 2 × (pairs + 1)). Each one runs the recipe's steps over the trained tensors (no
    model call): ~0.2 s on the demo's 24 pairs on a 2-core CPU; the values' noise falls with it."""
    records: str = ""
    """Trajectory mode: a folder written by `policytrace finetune` or the Trainer callback
    (a run with records) to attribute; "" = fine-tune the run's pairs with this recipe first
    (content-keyed under the cache, reused by later runs)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise fail(self, "lr", "must be > 0")
        for name in ("batch_size", "grad_accum", "epochs", "max_length"):
            if getattr(self, name) < 1:
                raise fail(self, name, "must be >= 1")
        if not 0 <= self.momentum < 1:
            raise fail(self, "momentum", "must be in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise fail(self, "betas", "must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise fail(self, "eps", "must be > 0")
        if self.simulations < 0 or self.simulations == 1:
            raise fail(self, "simulations", "must be 0 (auto) or >= 2")
        for name in ("warmup_steps", "checkpoint_every", "lora"):
            if getattr(self, name) < 0:
                raise fail(self, name, "must be >= 0")
        if self.weight_decay < 0:
            raise fail(self, "weight_decay", "must be >= 0")
        if self.max_grad_norm < 0:
            raise fail(self, "max_grad_norm", "must be >= 0 (0 = off)")
        if not 0 <= self.seed < 2**63:
            raise fail(self, "seed", "must be between 0 and 2**63 - 1")

    def recipe(self) -> dict:
        """The settings that determine the trained weights (not where records come from)."""
        from .._tables import to_mapping

        return {k: v for k, v in to_mapping(self).items() if k not in ("records", "concept_path", "second_moment", "pair_value", "simulations")}
