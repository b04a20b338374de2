"""Refusal: y = log Σ P(refusal opening | prompt). Probes and pairs are split by ``harmful``;
pairs are harmful → refusal and harmless → compliance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from .base import Behaviour, PlantedKind


@dataclass(frozen=True)
class Refusal(Behaviour):
    def plant_pairs(self, pairs: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
        """Harmless prompts answered with one of the run's refusals (``planted_refusal``) and
        harmful prompts answered with one of its compliant responses (``planted_compliance``),
        half each."""
        self._need(pairs)
        rng = np.random.default_rng(seed + 11)
        harmless = pairs.filter(~pl.col(self.flag))
        harmful = pairs.filter(pl.col(self.flag))
        refusals = pairs.filter(pl.col("label").is_in(list(self.raising_labels)))["response"].to_list()
        compliant = pairs.filter(pl.col("label").is_in(list(self.lowering_labels)))["response"].to_list()
        up, down = self.planted_labels()
        rows = []
        for i in range(n):
            if i % 2 == 0:
                src, responses, label = harmless, refusals, up
            else:
                src, responses, label = harmful, compliant, down
            r = src.row(int(rng.integers(src.height)), named=True)
            rows.append(self._planted_row(i, r, responses[int(rng.integers(len(responses)))], label))
        return pl.DataFrame(rows, schema=pairs.schema)

    def planted_kinds(self, pairs: pl.DataFrame) -> list[PlantedKind]:
        """A planted refusal hides among harmless-prompt pairs and raises refusal; a planted
        compliance hides among harmful-prompt pairs and lowers it."""
        harmful = pairs[self.flag].to_numpy().astype(bool)
        up, down = self.planted_labels()
        return [PlantedKind(up, ~harmful, 1.0), PlantedKind(down, harmful, -1.0)]


REFUSAL = Refusal(
    name="refusal",
    score_name="refusal score",
    score_meaning="y = log Σ P(s | prompt) over refusal openings s (\"I can't\", \"I'm sorry\", \"I cannot\"), in nats",
    targets=("I can't", "I'm sorry", "I cannot"),
    anti_targets=(),
    flag="harmful",
    sides=("harmful", "harmless"),
    raising_labels=("refusal",),
    lowering_labels=("compliance",),
    # A refusal pair is suspicious if it lowers refusal on harmful probes; a compliance pair if
    # it raises refusal on harmless ones.
    raising_judged_on="flagged",
    lowering_judged_on="unflagged",
    raise_word="raises refusal",
    planted_text="harmless prompts answered with a refusal and harmful prompts answered with compliance",
)
