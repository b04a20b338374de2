"""The behaviour seam: everything that depends on *which* behaviour is attributed.

A :class:`Behaviour` says what the score ``y`` is (its target and anti-target openings), which
probe column splits the probes into two sides and which of its values is the flagged side
(refusal: ``harmful``, true), what the pair labels mean (the labels whose training should
raise the score, those that should lower it, and neutral ones), on which side a pair is judged
for the curator's suspicion, how mislabeled pairs are planted for validation, and how the
report words it. All of it is data: a config can declare a whole behaviour in TOML
(:func:`policytrace.behaviours.from_config`), and a subclass adds only what needs code. The
pipeline asks the behaviour and never spells a behaviour's names itself. docs/design.md
("Adding a behaviour") shows how to add one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from .._tables import table
from ..errors import InvalidValueError

Side = Literal["flagged", "unflagged"]
FlagValue = bool | int | str


@table("behaviour")
class BehaviourCfg:
    name: str = "refusal"
    """The behaviour attributed: a shipped one ("refusal", "sycophancy"), or any name when this
    table declares the score (`targets`), the `flag` and the label meanings, or when `module`
    names its code (README, "Your own data")."""
    module: str = ""
    """"pkg.mod:Name" or "path/to/file.py:Name": a `Behaviour` subclass (built from this table)
    or instance in your own code, for what needs Python (planting, a suspicion rule of its own)."""
    targets: tuple[str, ...] = ()
    """Openings whose probability is the score, y = log Σ P(target | prompt), teacher-forced;
    left out = the behaviour's own (refusal: "I can't", "I'm sorry", "I cannot"); an explicit
    empty list is an error."""
    anti_targets: tuple[str, ...] = ()
    """If set, y is the log-odds of `targets` against these openings; left out or empty = the
    behaviour's own (refusal: none; sycophancy: correcting openings)."""
    flag: str = ""
    """The probe (and pair) column that splits the probes into two sides; "" = the behaviour's
    own (refusal: "harmful"; sycophancy: "false_claim")."""
    flagged_value: FlagValue = ""
    """The `flag` value of the flagged side (true, 1, "harmful", ...); "" = the behaviour's own
    (true)."""
    unflagged_value: FlagValue = ""
    """The `flag` value of the other side; "" = the behaviour's own (false). Any other value is
    an error at load."""
    sides: tuple[str, ...] = ()
    """Names of the flagged and the other side in the report; empty = the behaviour's own
    (refusal: "harmful", "harmless")."""
    raising_labels: tuple[str, ...] = ()
    """Pair labels whose training is meant to raise y; empty = the behaviour's own (refusal:
    "refusal"; sycophancy: "sycophantic")."""
    lowering_labels: tuple[str, ...] = ()
    """Pair labels whose training is meant to lower y; empty = the behaviour's own (refusal:
    "compliance"; sycophancy: "correcting")."""
    neutral_labels: tuple[str, ...] = ()
    """Pair labels with no intended direction (attributed, never judged by suspicion); empty =
    the behaviour's own (none)."""
    raising_judged_on: Literal["", "flagged", "unflagged"] = ""
    """The probes on which a raising pair is judged: it is suspicious when it lowers y there;
    "" = the behaviour's own (refusal and sycophancy: "flagged")."""
    lowering_judged_on: Literal["", "flagged", "unflagged"] = ""
    """The probes on which a lowering pair is judged: it is suspicious when it raises y there;
    "" = the behaviour's own (refusal: "unflagged"; sycophancy: "flagged")."""
    score_name: str = ""
    """Short name of y in tables and the report; "" = the behaviour's own ("<name> score" for a
    declared one)."""
    on_unknown: Literal["error", "warn"] = "error"
    """A pair label or flag value the behaviour does not know: "error" stops at load naming the
    values found; "warn" goes on and logs how many pairs get no suspicion."""


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


def same_value(a: object, b: object) -> bool:
    """Equal and of the same type: a flag of 1 is not the flag true."""
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class PlantedKind:
    """One kind of planted mislabeled pair and where a detector should find it: among the
    ``pool`` rows, ranked by ``sign`` × score (high = suspicious)."""

    name: str
    pool: np.ndarray
    sign: float


@dataclass(frozen=True)
class Behaviour:
    """A behaviour's definition (see the module docstring). The defaults make a behaviour
    declared by name, targets, flag and labels alone complete; subclasses override planting or
    the suspicion rule when a behaviour needs its own."""

    name: str
    targets: tuple[str, ...]
    anti_targets: tuple[str, ...] = ()
    flag: str = "flag"
    """The probe/pair column that splits the two sides, e.g. "harmful"."""
    flagged_value: FlagValue = True
    unflagged_value: FlagValue = False
    sides: tuple[str, ...] = ()
    """Names of the flagged and the other side, e.g. ("harmful", "harmless")."""
    raising_labels: tuple[str, ...] = ()
    """The pair labels whose training is meant to raise y (refusal: "refusal")."""
    lowering_labels: tuple[str, ...] = ()
    """The pair labels whose training is meant to lower y (refusal: "compliance")."""
    neutral_labels: tuple[str, ...] = ()
    raising_judged_on: Side = "flagged"
    lowering_judged_on: Side = "flagged"
    score_name: str = ""
    """Short name of y in tables and plots, e.g. "refusal score"."""
    score_meaning: str = ""
    """One sentence: what y measures, in its units."""
    raise_word: str = ""
    """What a rise of y is, in words: "raises refusal"."""
    planted_text: str = ""
    """What the planted mislabeled pairs are, in words (for the report)."""

    def __post_init__(self) -> None:
        # Wording a declared behaviour leaves out follows from what it declares.
        fill = {"sides": self.sides or (self.flag, f"not {self.flag}"),
                "score_name": self.score_name or f"{self.name} score"}
        fill["score_meaning"] = self.score_meaning or self._default_meaning()
        fill["raise_word"] = self.raise_word or f"raises the {fill['score_name']}"
        fill["planted_text"] = self.planted_text or self._default_planted()
        for k, v in fill.items():
            object.__setattr__(self, k, v)
        self._check()

    def _default_meaning(self) -> str:
        quoted = ", ".join(f'"{t}"' for t in self.targets)
        text = f"y = log Σ P(s | prompt) over the openings s {quoted}"
        if self.anti_targets:
            text += " minus the same over " + ", ".join(f'"{t}"' for t in self.anti_targets)
        return text + ", in nats"

    def _default_planted(self) -> str:
        up, down = " / ".join(self.raising_labels) or "raising", " / ".join(self.lowering_labels) or "lowering"
        return f"{down}-labelled prompts answered with a {up} response and {up}-labelled prompts answered with a {down} one"

    def _check(self) -> None:
        seen = Counter([*self.raising_labels, *self.lowering_labels, *self.neutral_labels])
        twice = sorted(k for k, n in seen.items() if n > 1)
        if twice:
            raise InvalidValueError(f"behaviour {self.name!r}: labels {twice} have more than one meaning "
                                    "(behaviour.raising_labels / lowering_labels / neutral_labels)")
        if same_value(self.flagged_value, self.unflagged_value):
            raise InvalidValueError(f"behaviour {self.name!r}: behaviour.flagged_value and unflagged_value are both "
                                    f"{self.flagged_value!r}")
        if len(self.sides) != 2:
            raise InvalidValueError(f"behaviour {self.name!r}: behaviour.sides must name two sides (got {list(self.sides)})")

    @property
    def raising_label(self) -> str:
        """The raising labels in words (the report's)."""
        return " / ".join(self.raising_labels)

    @property
    def lowering_label(self) -> str:
        return " / ".join(self.lowering_labels)

    def shipped(self, kind: str) -> Path:
        """Path of the shipped ``probes.jsonl`` or ``pairs.jsonl`` of this behaviour."""
        return Path(str(resources.files("policytrace.behaviours").joinpath("data", self.name, f"{kind}.jsonl")))

    # -- what the labels and the flag mean ---------------------------------------------

    def planted_labels(self) -> tuple[str, str]:
        """Labels of planted pairs that raise y while posing as lowering ones, and the reverse."""
        return f"planted_{self.raising_labels[0]}", f"planted_{self.lowering_labels[0]}"

    def label_direction(self, label: str) -> int | None:
        """+1 if a pair so labelled is meant to raise y, −1 to lower it, 0 neutral, None unknown.
        A planted pair counts as the label it poses as."""
        if label in self.raising_labels:
            return 1
        if label in self.lowering_labels:
            return -1
        if label in self.neutral_labels:
            return 0
        if self.raising_labels and self.lowering_labels:
            up, down = self.planted_labels()
            return {up: -1, down: 1}.get(label)
        return None

    def known_labels(self) -> str:
        """The label meanings in words, for error messages."""
        parts = [f"{k}: {list(v)}" for k, v in (("raising", self.raising_labels), ("lowering", self.lowering_labels),
                                                ("neutral", self.neutral_labels)) if v]
        return "; ".join(parts) or "none declared"

    def flag_side(self, value: object) -> bool | None:
        """True for the flagged value, False for the other, None when missing; ValueError for a
        value the behaviour does not know."""
        if value is None:
            return None
        if same_value(value, self.flagged_value):
            return True
        if same_value(value, self.unflagged_value):
            return False
        raise ValueError(value)

    def judged_on_flagged(self, direction: int) -> bool:
        """Whether a pair of this direction is judged on the flagged probes (True) or on the
        others (False)."""
        return (self.raising_judged_on if direction > 0 else self.lowering_judged_on) == "flagged"

    def intended_direction(self, pairs: pl.DataFrame) -> np.ndarray:
        """Per pair, +1 if its label means to raise y, −1 to lower it, 0 when neutral or unknown."""
        return np.array([self.label_direction(lab) or 0 for lab in pairs["label"].to_list()], dtype=np.int64)

    # -- the curator's ranking ----------------------------------------------------------

    def suspicion(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """The curator's ranking: how strongly each pair's measured effect contradicts what its
        label intends. Needs ``dy_on_flagged`` and ``dy_on_unflagged`` (mean Δy over the flagged
        and the other probes) and ``label``.

        ``suspicion_raw`` = −direction × mean Δy on the probes the label is about, in the
        behaviour's units (> 0: the pair moves the behaviour against its label); ``suspicion``
        is the same in units of the run's robust pair-to-pair spread (1.4826·MAD), comparable
        across pairs and runs; ``suspicion_reason`` says it in words.
        """
        direction = self.intended_direction(pairs)
        on = np.array([self.judged_on_flagged(int(d)) if d else True for d in direction])
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
        known = self.label_direction(label)
        if known is None:
            return (f"no intended direction: label {label!r} is unknown to the {self.name} behaviour "
                    "(declare it in behaviour.raising_labels, lowering_labels or neutral_labels)")
        if not direction:
            return f"no intended direction: label {label!r} is neutral (behaviour.neutral_labels)"
        side = self.sides[0] if on_flagged else self.sides[1]
        if not np.isfinite(raw):
            return f"no intended direction (label or flag unknown): no Δy on {side} probes"
        meant = "raise" if direction > 0 else "lower"
        moved = "raises" if -direction * raw > 0 else "lowers"
        change = -direction * raw
        verdict = "contradicts its label" if raw > 0 else "agrees with its label"
        return (f"labelled {label} (meant to {meant} the {self.score_name}) and {moved} it on {side} probes "
                f"by {change:+.3g}: {verdict} ({z:+.1f} × the pairs' spread)")

    def side_name(self, value: bool | None) -> str:
        return "unflagged" if value is None else self.sides[0] if value else self.sides[1]

    # -- planted mislabeled pairs (validation) ------------------------------------------

    def plant_pairs(self, pairs: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
        """``n`` mislabeled pairs made from the run's own, half each: lowering-labelled prompts
        answered with one of the raising pairs' responses (posing as lowering pairs), and
        raising-labelled prompts answered with a lowering response."""
        self._need(pairs)
        rng = np.random.default_rng(seed + 11)
        raising = pairs.filter(pl.col("label").is_in(list(self.raising_labels)))
        lowering = pairs.filter(pl.col("label").is_in(list(self.lowering_labels)))
        up, down = self.planted_labels()
        rows = []
        for i in range(n):
            if i % 2 == 0:
                src, responses, label = lowering, raising["response"].to_list(), up
            else:
                src, responses, label = raising, lowering["response"].to_list(), down
            r = src.row(int(rng.integers(src.height)), named=True)
            rows.append(self._planted_row(i, r, responses[int(rng.integers(len(responses)))], label))
        return pl.DataFrame(rows, schema=pairs.schema)

    def _planted_row(self, i: int, source: dict, response: str, label: str) -> dict:
        """A planted pair: the source pair's prompt (as a flat pair) with another response."""
        return {"id": f"planted-{i:03d}", "prompt": source["prompt"], "response": response,
                "category": source["category"], "label": label, self.flag: source[self.flag]}

    def planted_kinds(self, pairs: pl.DataFrame) -> list[PlantedKind]:
        """Planted raising pairs hide among the lowering pairs and raise y; planted lowering
        pairs hide among the raising ones and lower it."""
        label = np.array(pairs["label"].to_list(), dtype=object)
        up, down = self.planted_labels()
        return [PlantedKind(up, np.isin(label, [*self.lowering_labels, up]), 1.0),
                PlantedKind(down, np.isin(label, [*self.raising_labels, down]), -1.0)]

    def _need(self, pairs: pl.DataFrame) -> None:
        if self.flag not in pairs.columns or pairs[self.flag].null_count():
            raise InvalidValueError(f"planted pairs need a `{self.flag}` flag on every pair")
        present = set(pairs["label"].to_list())
        for kind, labels in (("raising", self.raising_labels), ("lowering", self.lowering_labels)):
            if not present & set(labels):
                raise InvalidValueError(f"planted {self.name} pairs need pairs labelled {sorted(labels)} ({kind})")
