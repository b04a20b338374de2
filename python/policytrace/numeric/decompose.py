"""How each training pair shifts the policy, by pathway (method step 5, docs/design.md).

:func:`decompose` handles pairs that fit in memory; :class:`Attributor` takes them in
batches (sparse or dense ΔX) for jobs that do not, and adds the per-pair summary and the
interference analysis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import polars as pl

from . import _backend as backends
from ._inputs import as_dy, as_matrix, as_vector, csr_tuple, pairs_arg, stack_pairs
from ..errors import InvalidValueError, NonFiniteError, ShapeError, SparseFormatError
from .frames import (PAIR_FEATURES_SCHEMA, Dominance, PairValues, pair_behaviour_frame, pair_features_frame,
                     pair_summary_frame)
from .interference import group_codes, summarize_interference
from .mediation import Mediation, mediation
from .policy import Policy

METHODS = ("exact", "first_order")

PAIR_FEATURE_COLUMNS = tuple(PAIR_FEATURES_SCHEMA)


class Attributor:
    """Streaming pathway decomposition of a policy against batches of training pairs.

    Args:
        policy: the fitted :class:`Policy`.
        X, y: the probe features (n, K) and scores (n,) the policy was fit on (checked).
        method: ``"exact"`` (refits: x-path, y-path, total, interaction, Shapley split) or
            ``"first_order"`` (the paper's derivative; interaction is 0).
        probe_groups: optional category per probe; ``pair_behaviour()`` then reports the
            mean Δy per probe category.
        feature_groups: optional group per policy feature (a sequence aligned with
            ``policy.feature_ids``, a ``{feature_id: group}`` mapping, or a frame with
            ``feature_id`` and ``group`` columns such as :func:`feature_stats` returns);
            enables the interference analysis.
        keep: keep every batch's frames in memory for :meth:`pair_features` / :meth:`pairs`.
            With ``keep=False`` consume the frames :meth:`add` returns instead.
    """

    def __init__(
        self,
        policy: Policy,
        X: Any,
        y: Any,
        method: str = "exact",
        probe_groups: Sequence[Any] | None = None,
        feature_groups: Any = None,
        _backend: str = "rust",
        threads: int | None = None,
        keep: bool = True,
    ) -> None:
        if method not in METHODS:
            raise InvalidValueError(f"`method` '{method}' is not one of {METHODS}")
        if not isinstance(policy, Policy):
            raise InvalidValueError("`policy` must be a policytrace.Policy (see fit_policy)")
        self.policy = policy
        self.method = method
        self.keep = keep
        xa = as_matrix("X", X, ncols=policy.n_features)
        self.n = int(xa[3][0] if isinstance(xa, tuple) else xa.shape[0])
        ya = as_vector("y", y, length=self.n)
        self._threads = backends.threads(threads)
        self._backend_name = _backend
        self._is_rust = _backend == "rust"
        self._core = backends.backend(_backend).Decomposer(
            np.ascontiguousarray(policy.coef, dtype=np.float64),
            float(policy.intercept),
            float(policy.lam),
            np.ascontiguousarray(policy.scale, dtype=np.float64),
            bool(policy.fit_intercept),
            xa,
            ya,
            self._threads,
        )
        self.probe_groups = None
        if probe_groups is not None:
            pg = list(probe_groups)
            if len(pg) != self.n:
                raise ShapeError(f"`probe_groups` must have one entry per probe ({self.n}), got {len(pg)}")
            self.probe_groups = np.asarray(pg, dtype=object)
        self._labels: dict = {}
        self.feature_group_labels = self._resolve_feature_groups(feature_groups)
        self._feature_codes = (
            None
            if self.feature_group_labels is None
            else group_codes(self.feature_group_labels, self._labels)
        )
        self._seen: set = set()
        self._next_default = 0
        self._pair_features: list[pl.DataFrame] = []
        self._pairs: list[pl.DataFrame] = []
        self._behaviour: list[pl.DataFrame] = []

    def _resolve_feature_groups(self, fg: Any) -> list | None:
        if fg is None:
            return None
        ids = [int(f) for f in self.policy.feature_ids]
        if isinstance(fg, pl.DataFrame):
            if not {"feature_id", "group"} <= set(fg.columns):
                raise InvalidValueError("`feature_groups` frame needs `feature_id` and `group` columns")
            fg = dict(zip(fg["feature_id"].to_list(), fg["group"].to_list()))
        if isinstance(fg, Mapping):
            missing = [f for f in ids if f not in fg]
            if missing:
                raise InvalidValueError(f"`feature_groups` has no group for features {missing[:10]}")
            return [fg[f] for f in ids]
        fg = list(fg)
        if len(fg) != len(ids):
            raise ShapeError(f"`feature_groups` must have one group per policy feature ({len(ids)}), got {len(fg)}")
        return fg

    @property
    def n_pairs(self) -> int:
        return len(self._seen)

    def add(
        self,
        dX: Any,
        dy: Any,
        pair_ids: Sequence[Any] | None = None,
        pair_groups: Sequence[Any] | None = None,
    ) -> pl.DataFrame:
        """Decompose one batch of pairs; returns its (pair, feature) frame.

        ``dX``: (P, n, K) or (n, K) dense, sparse (n, K) or stacked (P·n, K), or a list of
        per-pair (n, K) matrices. ``dy``: (P, n) or (n,). ``pair_ids`` default to a running
        count; ``pair_groups`` (category or label per pair) enable interference flags.
        """
        k = self.policy.n_features
        if self._is_rust:
            # Dense, stacked and per-pair ΔX reach the core as they are (no scipy copy); the
            # core checks values in parallel and the Python checks only word its complaint.
            arg, p = pairs_arg(dX, self.n, k)
        else:
            stacked, p = stack_pairs(dX, self.n, k, validate=True)
            arg = csr_tuple(stacked)
        dya = as_dy(dy, p, self.n)
        pair_ids = self._checked_ids(pair_ids, p)
        if pair_groups is not None:
            pair_groups = list(pair_groups)
            if len(pair_groups) != p:
                raise ShapeError(f"`pair_groups` has {len(pair_groups)} entries for {p} pairs")
        try:
            res = self._core.run(arg, dya, self.method, self._threads)
        except (SparseFormatError, NonFiniteError):
            if self._is_rust:
                stack_pairs(dX, self.n, k, validate=True)  # raises the worded error
            raise
        self._seen.update(pair_ids)
        ints = [i for i in pair_ids if isinstance(i, (int, np.integer)) and not isinstance(i, bool)]
        if ints:
            self._next_default = max(self._next_default, int(max(ints)) + 1)
        med = mediation(np.asarray(res.predicted), np.asarray(res.mean_dx), dya, self.policy.coef,
                        self.policy.scale, res.pred_dy)
        frame = self._pair_feature_frame(pair_ids, res, med)
        pairs = self._pair_frame(pair_ids, pair_groups, res, dya, med)
        self.last_pairs = pairs  # this batch's one-row-per-pair summary (kept or not)
        self.last_behaviour = self._behaviour_frame(pair_ids, dya, med) if self.probe_groups is not None else None
        if self.keep:
            self._pair_features.append(frame)
            self._pairs.append(pairs)
            if self.last_behaviour is not None:
                self._behaviour.append(self.last_behaviour)
        return frame

    def _checked_ids(self, pair_ids: Sequence[Any] | None, p: int) -> list:
        if pair_ids is None:
            # Continue after the largest integer id seen so defaults never collide.
            start = self._next_default
            return list(range(start, start + p))
        pair_ids = list(pair_ids)
        if len(pair_ids) != p:
            raise ShapeError(f"`pair_ids` has {len(pair_ids)} ids for {p} pairs")
        dup = [i for i in pair_ids if i in self._seen]
        if dup or len(set(pair_ids)) != len(pair_ids):
            seen: set = set()
            dup = dup or [i for i in pair_ids if i in seen or seen.add(i)]
            raise InvalidValueError(f"duplicate pair ids: {dup[:10]}")
        return pair_ids

    def _pair_feature_frame(self, pair_ids: list, res: Any, med: Mediation) -> pl.DataFrame:
        d, dx, dyp = res.d_total, res.d_x, res.d_y
        # First order is additive by construction: its interaction is exactly zero.
        dxy = d - dx - dyp if self.method == "exact" else np.zeros_like(d)
        return pair_features_frame(pair_ids, self.policy.feature_ids, self.policy.coef, d, dx, dyp, dxy,
                                   med.per_feature)

    def _pair_frame(self, pair_ids: list, groups: list | None, res: Any, dy: np.ndarray, med: Mediation) -> pl.DataFrame:
        pol = self.policy
        d = res.d_total
        values = PairValues(score=d @ pol.coef, score_x=res.d_x @ pol.coef, score_y=res.d_y @ pol.coef,
                            dy_mean=dy.mean(axis=1), pred_dy_mean=np.asarray(res.pred_dy), direct_dy=med.direct,
                            mediated_share=med.share, mediated_r2=med.r2)
        if self._feature_codes is not None and groups is not None:
            pcodes = group_codes(groups, self._labels)
            res_i = backends.backend(self._backend_name).interference(
                np.ascontiguousarray(d), self._feature_codes, pcodes
            )
            dominance = Dominance(np.asarray(res_i.dominant), self.feature_group_labels,
                                  np.asarray(res_i.off_target_share), np.asarray(res_i.flag, dtype=bool))
        else:
            dominance = Dominance(np.where(np.abs(d).sum(axis=1) > 0, np.abs(d).argmax(axis=1), -1))
        return pair_summary_frame(pair_ids, groups, values, pol.feature_ids, dominance)

    def _behaviour_frame(self, pair_ids: list, dy: np.ndarray, med: Mediation) -> pl.DataFrame:
        """Per pair and probe group: mean Δy, the part the policy's features mediate, the rest."""
        levels = sorted(set(self.probe_groups.tolist()), key=str)
        masks = [self.probe_groups == lv for lv in levels]
        means = np.stack([dy[:, m].mean(axis=1) for m in masks])
        mediated = np.stack([med.predicted[:, m].mean(axis=1) for m in masks])
        return pair_behaviour_frame(pair_ids, levels, means, mediated)

    def _kept(self, parts: list[pl.DataFrame], what: str) -> pl.DataFrame:
        if not self.keep:
            raise InvalidValueError(f"this Attributor was built with keep=False; collect {what} from add()")
        if not parts:
            raise InvalidValueError("no pairs added yet; call add(dX, dy) first")
        return pl.concat(parts, how="vertical_relaxed")

    def pair_features(self) -> pl.DataFrame:
        """One row per (pair, feature): the columns of README "What the numbers mean"."""
        return self._kept(self._pair_features, "frames")

    def pairs(self) -> pl.DataFrame:
        """One row per pair: ``score`` (Σ alignment = ΔW·W, the paper's pair score) and its
        x/y parts, ``dy_mean`` (the measured behaviour change), ``pred_dy_mean`` (the change
        the base policy predicts from ΔX alone), the dominant feature and, with groups,
        ``off_target_share`` and the ``interference`` flag."""
        return self._kept(self._pairs, "pair summaries")

    def pair_behaviour(self) -> pl.DataFrame:
        """Mean Δy per pair and probe category (needs ``probe_groups``)."""
        if self.probe_groups is None:
            raise InvalidValueError("pass `probe_groups` to the Attributor for per-category Δy")
        return self._kept(self._behaviour, "behaviour frames")

    def interference_summary(self) -> pl.DataFrame:
        """Pair group x feature aggregate: pairs, mean and mean |d_coef|, how often the feature
        dominates, and whether it is intended for that pair group."""
        if self.feature_group_labels is None:
            raise InvalidValueError("pass `feature_groups` to the Attributor for interference")
        fg = pl.DataFrame(
            {"feature_id": self.policy.feature_ids, "feature_group": self.feature_group_labels},
            strict=False,
        )
        return summarize_interference(self.pair_features(), self.pairs(), fg)


def decompose(
    policy: Policy,
    X: Any,
    y: Any,
    dX: Any,
    dy: Any,
    method: str = "exact",
    pair_ids: Sequence[Any] | None = None,
    _backend: str = "rust",
    threads: int | None = None,
) -> pl.DataFrame:
    """Split every pair's policy shift into pathways; one row per (pair, feature).

    Columns: ``pair_id, feature_id, coef, d_coef, d_coef_x, d_coef_y, d_coef_xy,
    shapley_x, shapley_y, alignment`` (all in the policy's scaled units;
    ``alignment = d_coef * coef``, summing to the paper's pair score ΔW·W).
    See :class:`Attributor` for the accepted ``dX`` / ``dy`` forms and for batches.
    """
    att = Attributor(policy, X, y, method=method, _backend=_backend, threads=threads)
    return att.add(dX, dy, pair_ids=pair_ids)
