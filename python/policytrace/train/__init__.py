"""Fine-tuning with a recorded trajectory, and its attribution (issue 21).

* :func:`finetune` runs the ``[train]`` recipe (:class:`TrainCfg`) and records what trajectory
  mode needs (:mod:`.finetuning`);
* :func:`attributed_update` is the selected pairs' share of the fine-tune's weight change
  (:mod:`.trajectory`), for first-order removal;
* :mod:`.callback` records the same during the user's own ``transformers.Trainer`` run;
* :func:`tracin_checkpoints` (:mod:`.posthoc`) estimates it from a run nobody recorded: TracIn
  over the Trainer's saved checkpoints with AdamW's second moment.
"""

from __future__ import annotations

from .config import TrainCfg

__all__ = ["FinetuneResult", "RecordingCallback", "TrainCfg", "attributed_update", "finetune", "tracin_checkpoints"]


_LAZY = {"finetune": "finetuning", "FinetuneResult": "finetuning", "attributed_update": "trajectory",
         "RecordingCallback": "callback", "tracin_checkpoints": "posthoc"}


def __getattr__(name: str):
    # torch-dependent pieces load on first use, so configs stay importable without the model extra;
    # no submodule shares a name with what it exports, so the import never shadows the function
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
