"""The settings of one repair (``policytrace repair`` flags; recorded in ``repair.json``).

Not part of a run's config: a repair acts on a finished run folder and never changes its
outputs. The tables follow the run config's conventions (frozen, type-checked, field
docstrings; :func:`markdown_table` is the README's table of them, and a test keeps the two in
step).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from ..._tables import describe, fail, field_docs, table, to_mapping


@table("unlearn")
class UnlearnCfg:
    lr: float = 0.0
    """Step size of the gradient ascent on the selected pairs' mean loss; 0 = the run's own
    learning rate (`update.lr`)."""
    max_lr: float = 1e-3
    """A cap on `lr`: a larger step is refused (unlearning at a large step breaks the model
    faster than it removes anything)."""
    max_steps: int = 8
    """At most this many ascent steps."""
    batch: int = 0
    """Selected pairs per step, drawn in a seeded order; 0 = all of them every step."""
    max_grad_norm: float = 1.0
    """Each step's gradient is clipped to this L2 norm (0 = no clipping)."""
    margin: float = 0.05
    """Stop rule: the step that raises the kept pairs' mean loss by more than this (nats, over the
    fine-tuned model's) is undone and the ascent ends."""
    monitor_pairs: int = 32
    """Kept pairs (a seeded sample) whose loss the stop rule watches; 0 = all kept pairs."""
    stop_at_base: bool = True
    """Also stop once the behaviour on the run's probes is back at the base model's level (one
    probe pass per step)."""

    def __post_init__(self) -> None:
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise fail(self, "lr", "must be a finite number >= 0 (0 = the run's update.lr)")
        if not self.max_lr > 0:
            raise fail(self, "max_lr", "must be > 0")
        if self.lr > self.max_lr:
            raise fail(self, "lr", f"{self.lr:g} exceeds unlearn.max_lr = {self.max_lr:g}; lower it, or raise the "
                                   "cap knowingly")
        if self.max_steps < 1:
            raise fail(self, "max_steps", "must be >= 1")
        if self.batch < 0:
            raise fail(self, "batch", "must be >= 0 (0 = all selected pairs)")
        if self.max_grad_norm < 0:
            raise fail(self, "max_grad_norm", "must be >= 0 (0 = no clipping)")
        if not self.margin > 0:
            raise fail(self, "margin", "must be > 0 nats")
        if self.monitor_pairs < 0:
            raise fail(self, "monitor_pairs", "must be >= 0 (0 = all kept pairs)")


@table("repair")
class RepairCfg:
    method: Literal["retrain", "first-order", "unlearn"] = "retrain"
    """retrain: fine-tune again from the base weights with the run's recipe, without the selected
    pairs (or with their loss weighted by `weight`); first-order: subtract the selected pairs'
    recorded updates from the fine-tuned weights (needs trajectory records); unlearn: gradient
    ascent on the selected pairs from the fine-tuned weights (`[unlearn]`)."""
    weight: float = 0.0
    """retrain: the selected pairs' loss weight (0 = dropped; 0.5 = down-weighted by half)."""
    controls: int = 3
    """Random selections of the same size, drawn within the same categories, each repaired the
    same way (the causal check); 0 = none."""
    seed: int = 0
    """Seed of the random controls (control i uses seed + 1 + i) and of unlearning's order."""
    strata: str = "category"
    """The pair column the random controls are matched on."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and 0 <= self.weight < 1):
            raise fail(self, "weight", "must be in [0, 1): 0 drops the selected pairs, 0 < w < 1 down-weights them")
        if self.method != "retrain" and self.weight != 0:
            raise fail(self, "weight", f"applies to method 'retrain' only, not '{self.method}'")
        if self.controls < 0:
            raise fail(self, "controls", "must be >= 0")
        if not 0 <= self.seed < 2**63:
            raise fail(self, "seed", "must be between 0 and 2**63 - 1")


def markdown_table() -> str:
    rows = ["| flag | default | type | meaning |", "|---|---|---|---|"]
    for cls, prefix in ((RepairCfg, ""), (UnlearnCfg, "unlearn-")):
        docs, hints, defaults = field_docs(cls), typing.get_type_hints(cls), to_mapping(cls())
        for f in dataclasses.fields(cls):
            flag = "--" + prefix + f.name.replace("_", "-")
            kind, doc = (t.replace("|", "\\|") for t in (describe(hints[f.name]), docs.get(f.name, "")))
            default = f"`{defaults[f.name]}`"
            if defaults[f.name] is True:  # a switch that turns it off
                flag, default, kind = "--" + prefix + "no-" + f.name.replace("_", "-"), "on", "switch"
            rows.append(f"| `{flag}` | {default} | {kind} | {doc} |")
    return "\n".join(rows) + "\n"

