"""The behaviour seam: everything that depends on *which* behaviour is attributed.

A :class:`Behaviour` says what the score ``y`` is (its target and anti-target openings), which
boolean column splits the probes into the side where the behaviour is wanted and the side where
it is not (refusal: ``harmful``), what the pair labels mean (the label whose training should
raise the score, the one that should lower it), how mislabeled pairs are planted for
validation, and how the report words it. The pipeline asks the behaviour named by
``behaviour.name`` and never spells "refusal" itself. docs/design.md ("Adding a behaviour")
shows how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl

from .._tables import table
from ..errors import InvalidValueError


@table("behaviour")
class BehaviourCfg:
    name: str = "refusal"
    """The behaviour attributed: "refusal" or "sycophancy" (docs/design.md, "Adding a behaviour")."""
    targets: tuple[str, ...] = ()
    """Openings whose probability is the score, y = log Σ P(target | prompt), teacher-forced;
    left out = the behaviour's own (refusal: "I can't", "I'm sorry", "I cannot"); an explicit
    empty list is an error."""
    anti_targets: tuple[str, ...] = ()
    """If set, y is the log-odds of `targets` against these openings; left out or empty = the
    behaviour's own (refusal: none; sycophancy: correcting openings)."""


def robust_scaled(x: np.ndarray) -> np.ndarray:
    """x / (1.4826 · MAD) over the finite values: in units of the pairs' robust spread, not
    centred, so the sign keeps its meaning (the std when the MAD is 0; NaN stays NaN)."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return np.where(ok, x, np.nan)
    scale = 1.4826 * np.median(np.abs(x[ok] - np.median(x[ok])))
    if not scale > 0:
        scale = x[ok].std()
    return np.where(ok, x / scale if scale > 0 else x, np.nan)


@dataclass(frozen=True)
class PlantedKind:
    """One kind of planted mislabeled pair and where a detector should find it: among the
    ``pool`` rows, ranked by ``sign`` × score (high = suspicious)."""

    name: str
    pool: np.ndarray
    sign: float


@dataclass(frozen=True)
class Behaviour:
    """A behaviour's definition (see the module docstring). Subclasses plant pairs."""

    name: str
    score_name: str
    """Short name of y in tables and plots, e.g. "refusal score"."""
    score_meaning: str
    """One sentence: what y measures, in its units."""
    targets: tuple[str, ...]
    anti_targets: tuple[str, ...]
    flag: str
    """The boolean probe/pair column that splits the two sides, e.g. "harmful"."""
    sides: tuple[str, str]
    """Names of the flag's True and False sides, e.g. ("harmful", "harmless")."""
    raising_label: str
    """The pair label whose training is meant to raise y (refusal: "refusal")."""
    lowering_label: str
    """The pair label whose training is meant to lower y (refusal: "compliance")."""
    raise_word: str
    """What a rise of y is, in words: "raises refusal"."""
    planted_text: str
    """What the planted mislabeled pairs are, in words (for the report)."""

    def shipped(self, kind: str) -> Path:
        """Path of the shipped ``probes.jsonl`` or ``pairs.jsonl`` of this behaviour."""
        return Path(str(resources.files("policytrace.behaviours").joinpath("data", self.name, f"{kind}.jsonl")))

    def plant_pairs(self, pairs: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
        """``n`` mislabeled pairs made from the run's own, for detection tests."""
        raise NotImplementedError

    def planted_kinds(self, pairs: pl.DataFrame) -> list[PlantedKind]:
        """For ``pairs`` (the run's and the planted ones), each planted kind with its pool."""
        raise NotImplementedError

    def intended_direction(self, pairs: pl.DataFrame) -> np.ndarray:
        """Per pair, +1 if its label means to raise y, −1 to lower it, 0 when unknown."""
        raise NotImplementedError

    def suspicion_side(self, direction: int) -> bool:
        """Whether a pair of this direction is judged on the flagged probes (True) or on the
        others (False)."""
        raise NotImplementedError

    def suspicion(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """The curator's ranking: how strongly each pair's measured effect contradicts what its
        label intends. Needs ``dy_on_flagged`` and ``dy_on_unflagged`` (mean Δy over the flagged
        and the other probes) and ``label`` (and the flag, for behaviours that use it).

        ``suspicion_raw`` = −direction × mean Δy on the probes the label is about, in the
        behaviour's units (> 0: the pair moves the behaviour against its label); ``suspicion``
        is the same in units of the run's robust pair-to-pair spread (1.4826·MAD), comparable
        across pairs and runs; ``suspicion_reason`` says it in words.
        """
        direction = self.intended_direction(pairs)
        on = np.array([self.suspicion_side(int(d)) if d else True for d in direction])
        dy = np.where(on, pairs["dy_on_flagged"].fill_null(np.nan).to_numpy(),
                      pairs["dy_on_unflagged"].fill_null(np.nan).to_numpy())
        raw = np.where((direction != 0) & np.isfinite(dy), -direction * dy, np.nan)
        z = robust_scaled(raw)
        reasons = [self._reason(lab, d, side, r, zz) for lab, d, side, r, zz in
                   zip(pairs["label"].to_list(), direction, on, raw, z)]
        nullable = [None if not np.isfinite(v) else float(v) for v in z]
        raw_n = [None if not np.isfinite(v) else float(v) for v in raw]
        return pl.DataFrame({"pair_id": pairs["pair_id"], "suspicion": pl.Series(nullable, dtype=pl.Float64),
                             "suspicion_raw": pl.Series(raw_n, dtype=pl.Float64), "suspicion_reason": reasons})

    def _reason(self, label: str, direction: int, on_flagged: bool, raw: float, z: float) -> str:
        if not direction or not np.isfinite(raw):
            return "no intended direction (label or flag unknown)"
        side = self.sides[0] if on_flagged else self.sides[1]
        meant = "raise" if direction > 0 else "lower"
        moved = "raises" if -direction * raw > 0 else "lowers"
        change = -direction * raw
        verdict = "contradicts its label" if raw > 0 else "agrees with its label"
        return (f"labelled {label} (meant to {meant} the {self.score_name}) and {moved} it on {side} probes "
                f"by {change:+.3g}: {verdict} ({z:+.1f} × the pairs' spread)")

    def side_name(self, value: bool | None) -> str:
        return "unflagged" if value is None else self.sides[0] if value else self.sides[1]

    def _need(self, pairs: pl.DataFrame, labels: set[str]) -> None:
        if self.flag not in pairs.columns or pairs[self.flag].null_count():
            raise InvalidValueError(f"planted pairs need a `{self.flag}` flag on every pair")
        missing = labels - set(pairs["label"].to_list())
        if missing:
            raise InvalidValueError(f"planted {self.name} pairs need pairs labelled {sorted(missing)}")
