"""Fine-tuning with a recorded trajectory, and its attribution (issue 21).

* :func:`finetune` runs the ``[train]`` recipe (:class:`TrainCfg`) and records what trajectory
  mode needs (:mod:`.finetune`);
* :func:`attributed_update` is the selected pairs' share of the fine-tune's weight change
  (:mod:`.trajectory`), for first-order removal;
* :mod:`.callback` records the same during the user's own ``transformers.Trainer`` run.
"""

from __future__ import annotations

from .config import TrainCfg

__all__ = ["FinetuneResult", "TrainCfg", "attributed_update", "finetune"]


def __getattr__(name: str):
    # torch-dependent pieces load on first use, so configs stay importable without the model extra
    if name in ("finetune", "FinetuneResult"):
        from . import finetune as _ft

        return getattr(_ft, name)
    if name == "attributed_update":
        from .trajectory import attributed_update

        return attributed_update
    raise AttributeError(name)
