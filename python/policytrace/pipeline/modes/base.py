"""The seam between the run and the ways of modelling a fine-tuning (docs/design.md, "Adding a
mode").

A :class:`Mode` turns pairs into the run's frames. The orchestration (:mod:`..run`) opens the
folder, runs the base stages, divides the shards among ranks, writes each shard's files and its
marker, and merges; a mode only says what to compute once (:meth:`Mode.prepare`), what one shard
of pairs gives (:meth:`Mode.shard`), what it adds at the merge (:meth:`Mode.finish`) and which
scores validation reads (:meth:`Mode.validation`). Its frames come from the one builder in
:mod:`policytrace.numeric.frames`, so every mode writes files of the same schemas.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import polars as pl

from ..distributed import SINGLE, Ranks
from ..rundir import RunDir
from ..stages import BaseState

Log = Callable[[str], None]


class Bar(Protocol):
    """Progress over pairs (``_progress.bar`` or anything with ``update``)."""

    def update(self, n: int) -> None: ...


class NoBar:
    """A progress bar that shows nothing (scoring outside a run)."""

    def update(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class Prepared:
    """What a mode computes once per process before its shards. Subclasses add their state
    (the engine's Attributor, gradient mode's concept gradients, ...)."""

    def marker(self) -> tuple[str, dict] | None:
        """``(stage, facts)``: recorded in ``stages/<stage>-rank<r>.json`` by each process (the
        one-time cost, say); ``None``: nothing to record."""
        return None


@dataclass(frozen=True)
class Deltas:
    """A shard's per-pair ΔX (P, n, K) and Δy (P, n) in row order: what validate's model-free
    scores re-decompose (``shards/deltas-N.npz``)."""

    ids: list[str]
    dX: np.ndarray
    dy: np.ndarray


@dataclass(frozen=True)
class ShardFrames:
    """One shard's frames, each of its :mod:`~policytrace.numeric.frames` schema."""

    pairs: pl.DataFrame
    pair_behaviour: pl.DataFrame
    pair_features: pl.DataFrame | None = None
    """``None``: the mode computed no per-feature shifts (the merge writes an empty frame)."""
    deltas: Deltas | None = None
    """``None``: the mode measured no ΔX/Δy (validate then reads the mode's own scores)."""
    pair_layers: pl.DataFrame | None = None
    """Mediation across layers (``sae.layers``): per pair and layer of the curve, the mediated
    change (:mod:`policytrace.pipeline.layers`); ``None`` in a one-layer run."""


@dataclass(frozen=True)
class Finished:
    """What a mode adds at the merge: final files (name -> digest) and manifest facts per stage."""

    files: dict[str, str] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)


Scorer = Callable[[pl.DataFrame, pl.DataFrame], dict[str, np.ndarray]]
"""``scorer(both, planted)``: every method's scores for the run's pairs followed by planted ones."""


@dataclass(frozen=True)
class RunScores:
    """The scores validation reads from a finished run: per method, in the run's pair order."""

    scores: dict[str, np.ndarray]
    scorer: Scorer
    """The same methods for the run's pairs and planted ones (the planted-pairs test)."""
    agreement: dict = field(default_factory=dict)
    """How the mode's own variants agree (validation.json), when it has several."""
    timings: dict = field(default_factory=dict)


P = TypeVar("P", bound=Prepared)


class Mode(ABC, Generic[P]):
    """One way of scoring pairs; one instance per mode, registered by :attr:`name` in
    :data:`policytrace.pipeline.modes.MODES`."""

    name: ClassVar[str]
    """``run.mode``, and the ``mode`` column of the pairs it scores."""
    collective: ClassVar[bool] = False
    """Whether :meth:`prepare` is a collective call under torchrun (it exchanges work among the
    ranks): then every rank prepares while any shard of any rank is left."""
    default_shard: ClassVar[int] = 8
    """Pairs per shard when ``run.pair_batch = 0``."""
    fine_tune: ClassVar[str] = "sequential"
    """The fine-tune the mode models, which ``policytrace repair`` retrains with by default:
    ``sequential`` (one ``[update]`` step per pair in a seeded order, the paper's) or ``train``
    (the run's ``[train]`` recipe)."""

    def shard_size(self, cfg) -> int:
        """Pairs per shard (the unit of resumption) for ``cfg``."""
        return cfg.run.pair_batch or self.default_shard

    @abstractmethod
    def prepare(self, state: BaseState, log: Log, progress: bool, ranks: Ranks = SINGLE) -> P:
        """What the shards share, computed once per process (and divided among ``ranks`` when
        :attr:`collective`)."""

    @abstractmethod
    def shard(self, state: BaseState, prepared: P, rows: pl.DataFrame, bar: Bar) -> ShardFrames:
        """The frames of one shard of pairs (``rows`` of the run's pair frame), ``bar`` advanced
        per pair. Raises :class:`~policytrace.errors.NonFiniteError` naming the pair rather than
        returning non-finite values."""

    def finish(self, state: BaseState, rd: RunDir, log: Log) -> Finished:
        """Final files beside the merged ones (read ``rd``'s merged files if needed)."""
        return Finished()

    def facts(self, rd: RunDir) -> dict:
        """The mode's facts for the manifest's ``pairs`` stage (from its markers, say)."""
        return {}

    def retrainer(self, state: BaseState, seed: int, folder):
        """How validation retrains subsets of the pairs (default: one update per pair in a seeded
        order, the paper's); a mode that models another fine-tune retrains with it."""
        from ..validate.retrain import Retrainer

        return Retrainer(state, seed, folder)

    @abstractmethod
    def validation(self, rd: RunDir, manifest: dict, state: BaseState, seed: int, log: Log,
                   progress: bool) -> RunScores:
        """The scores validation reads from the finished folder ``rd``."""
