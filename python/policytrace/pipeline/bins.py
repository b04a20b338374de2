"""Attributions aggregated over bins of pairs (a category, a source, any taxonomy column), each
bin's sum set against chance, and the contrast of two behaviours scored on the same pairs.

A bin's statistic is the sum of a per-pair attribution (default ``dy_mean``) over its pairs.
Chance is the same sum over random bins of the same size: the bin labels permuted across the
pairs (sizes kept), ``n_perm`` times with one seeded generator shared by all bins; ``z`` is the
bin's distance from the permutation mean in permutation standard deviations and ``p`` the
two-sided permutation p-value ``(1 + #|perm − mean| ≥ |obs − mean|) / (1 + n_perm)``.

:func:`contrast` puts two such tables side by side (two behaviours scored on the same
pairs, say): a bin "drives" a behaviour when its p-value is under ``alpha``, in the sign of its
z; so each bin is one of: drives both, drives only the first, only the second, or neither.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import InvalidValueError

N_PERM = 2000


def bin_table(pairs: pl.DataFrame, column: str, value: str = "dy_mean", n_perm: int = N_PERM,
              seed: int = 0) -> pl.DataFrame:
    """One row per value of ``column``: pairs, sum and mean of ``value``, and its chance z and
    p (module docstring). Pairs with a null ``value`` or bin are left out (and counted in the
    ``excluded`` column of every row)."""
    for c in (column, value):
        if c not in pairs.columns:
            raise InvalidValueError(f"the pairs have no column '{c}' (columns: {', '.join(pairs.columns)})")
    if not pairs[value].dtype.is_numeric():
        raise InvalidValueError(f"column '{value}' is {pairs[value].dtype}, not a number per pair")
    if n_perm < 1:
        raise InvalidValueError(f"n_perm = {n_perm} must be >= 1")
    kept = pairs.filter(pl.col(value).is_not_null() & pl.col(value).is_finite() & pl.col(column).is_not_null())
    if kept.height == 0:
        raise InvalidValueError(f"no pair has both a '{column}' and a finite '{value}'")
    labels = kept[column].cast(pl.Utf8).to_numpy()
    levels, codes = np.unique(labels, return_inverse=True)
    x = kept[value].to_numpy().astype(np.float64)
    obs = np.bincount(codes, weights=x, minlength=len(levels))
    perm = _permuted_sums(codes, x, len(levels), n_perm, seed)
    mean, sd = perm.mean(axis=0), perm.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, (obs - mean) / sd, np.nan)
    extreme = (np.abs(perm - mean) >= np.abs(obs - mean) - 1e-12 * np.abs(obs)).sum(axis=0)
    counts = np.bincount(codes, minlength=len(levels))
    return pl.DataFrame({
        "bin": levels.tolist(), "n_pairs": counts.astype(np.int64), "sum": obs, "mean": obs / counts,
        "z": pl.Series([None if np.isnan(v) else float(v) for v in z], dtype=pl.Float64),
        "p_value": (1 + extreme) / (1 + n_perm), "excluded": np.full(len(levels), pairs.height - kept.height),
    }).sort("bin")


def _permuted_sums(codes: np.ndarray, x: np.ndarray, n_bins: int, n_perm: int, seed: int) -> np.ndarray:
    """(n_perm, n_bins): bin sums of ``x`` under permutations of the bin labels."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_perm, n_bins))
    for k in range(n_perm):
        out[k] = np.bincount(codes[rng.permutation(len(codes))], weights=x, minlength=n_bins)
    return out


def contrast(a: pl.DataFrame, b: pl.DataFrame, column: str, names: tuple[str, str], value: str = "dy_mean",
             alpha: float = 0.05, n_perm: int = N_PERM, seed: int = 0, id_column: str = "pair_id") -> pl.DataFrame:
    """Per bin of ``column``: each behaviour's z and p over the pairs both runs scored, and which
    behaviour(s) the bin drives (module docstring). ``a`` and ``b`` are the two runs' pairs
    (with ``column``); ``names`` the behaviours' names for the verdicts."""
    ids_a, ids_b = set(a[id_column].to_list()), set(b[id_column].to_list())
    common = ids_a & ids_b
    if not common:
        raise InvalidValueError("the two runs share no pair ids; a contrast needs the same pairs")
    ta = bin_table(a.filter(pl.col(id_column).is_in(sorted(common))), column, value, n_perm, seed)
    tb = bin_table(b.filter(pl.col(id_column).is_in(sorted(common))), column, value, n_perm, seed)
    both = ta.select("bin", "n_pairs", pl.col("z").alias(f"z_{names[0]}"), pl.col("p_value").alias(f"p_{names[0]}")).join(
        tb.select("bin", pl.col("z").alias(f"z_{names[1]}"), pl.col("p_value").alias(f"p_{names[1]}")), on="bin")
    verdicts = [_verdict(r, names, alpha) for r in both.iter_rows(named=True)]
    return both.with_columns(pl.Series("verdict", verdicts, dtype=pl.Utf8), pl.lit(len(ids_a ^ ids_b)).alias("unshared"))


def _verdict(row: dict, names: tuple[str, str], alpha: float) -> str:
    drives = [(n, row[f"z_{n}"]) for n in names if row[f"p_{n}"] < alpha and row[f"z_{n}"] is not None]
    if not drives:
        return "neither"
    words = [f"{'raises' if z > 0 else 'lowers'} {n}" for n, z in drives]
    return " and ".join(words) + ("" if len(drives) == 2 else f", not {[n for n in names if n != drives[0][0]][0]}")
