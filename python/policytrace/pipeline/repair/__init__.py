"""``policytrace repair RUN --select ...``: act on a finding — take the pairs behind a behaviour out
of the fine-tuned model, and check causally that it was those pairs.

One repair is a selection of the run's pairs (:mod:`policytrace.pipeline.selection`: top K or a
fraction by a column, a threshold, ids, whole bins) and a method (:mod:`.methods`: retrain
without them or with their loss down-weighted, first-order removal of their recorded updates,
or unlearning by gradient ascent). Its causal check is the same method on ``controls`` random
selections of the same size drawn within the same categories (:func:`~policytrace.pipeline.
selection.matched_random`, seeds ``seed + 1 + i``): a selection that matters moves the behaviour
back further than pairs of the same kind picked at random. Its cost is the loss on the kept
pairs and on a shipped held-out text (:mod:`.measure`) beside the fine-tuned model's.

The fine-tuned model is the run's recipe fitted on all its pairs (:mod:`.recipe`; cached in
``RUN/repairs/finetuned/``). Each repair writes ``RUN/repairs/NAME/`` with ``model/`` (a HF
folder, safetensors), ``repair.json`` (what was selected, method, settings, seeds, recipe, and
every measured effect; byte-identical on a rerun) and ``timings.json`` (seconds, kept apart so
``repair.json`` reproduces exactly).
"""

from __future__ import annotations

from .config import RepairCfg, UnlearnCfg
from .summary import list_repairs, repairs_frame

__all__ = ["RepairCfg", "UnlearnCfg", "list_repairs", "repair", "repairs_frame"]


def repair(*args, **kwargs) -> dict:
    """:func:`policytrace.pipeline.repair.core.repair` (imported on first use: it needs torch)."""
    from .core import repair as run

    return run(*args, **kwargs)
