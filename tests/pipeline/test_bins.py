"""Selections of pairs (top K, fraction, threshold, ids, bins), within-bin random controls, bin
aggregates against label permutations and the two-behaviour contrast, on constructed frames
whose answers are known."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from policytrace.errors import InvalidValueError
from policytrace.pipeline.bins import bin_table, contrast
from policytrace.pipeline.selection import matched_random, select


def frame():
    return pl.DataFrame({
        "pair_id": [f"p{i}" for i in range(10)],
        "category": ["a", "a", "a", "b", "b", "b", "b", "c", "c", "c"],
        "suspicion": [3.0, 1.0, None, 2.0, 2.0, -1.0, 0.5, 4.0, -2.0, 0.0],
        "label": ["x"] * 10,
    })


def test_top_k_by_a_column_breaks_ties_by_id_and_puts_nulls_last():
    assert select(frame(), top=4).ids == ("p7", "p0", "p3", "p4")
    assert select(frame(), top=10).ids[-1] == "p2"  # the null ranks last
    assert select(frame(), top=2, by="suspicion").how == {"top": 2, "by": "suspicion"}


def test_fraction_and_threshold():
    assert select(frame(), fraction=0.2).ids == ("p7", "p0")
    assert select(frame(), fraction=0.01).ids == ("p7",)  # at least one
    assert select(frame(), threshold=2.0).ids == ("p7", "p0", "p3", "p4")


def test_ids_keep_their_order_and_bins_take_whole_categories():
    assert select(frame(), ids=["p9", "p1"]).ids == ("p9", "p1")
    assert select(frame(), bins=["c", "a"]).ids == ("p0", "p1", "p2", "p7", "p8", "p9")


@pytest.mark.parametrize("kw,fragment", [
    ({}, "exactly one"),
    ({"top": 2, "ids": ["p1"]}, "exactly one"),
    ({"top": 0}, "between 1 and the run's 10 pairs"),
    ({"top": 11}, "between 1 and the run's 10 pairs"),
    ({"fraction": 1.5}, "(0, 1]"),
    ({"threshold": 9.0}, "holds no pair"),
    ({"ids": ["p1", "nope", "p404"]}, "['nope', 'p404']"),
    ({"ids": ["p1", "p1"]}, "twice"),
    ({"ids": []}, "holds no pair"),
    ({"bins": ["z"]}, "bins ['z'] are not values of column 'category'"),
    ({"top": 2, "by": "missing"}, "no column 'missing'"),
    ({"top": 2, "by": "label"}, "not numeric"),
])
def test_bad_selections_are_typed_errors(kw, fragment):
    with pytest.raises(InvalidValueError) as info:
        select(frame(), **kw)
    assert fragment in str(info.value)


def test_matched_random_draws_as_many_per_category_from_the_others():
    f = frame()
    sel = select(f, ids=["p0", "p3", "p4"])
    cat = dict(zip(f["pair_id"], f["category"]))
    for seed in range(20):
        ctl = matched_random(f, sel, seed)
        assert sorted(cat[i] for i in ctl.ids) == ["a", "b", "b"]
        assert not set(ctl.ids) & set(sel.ids)
        assert ctl.ids == matched_random(f, sel, seed).ids
    assert len({matched_random(f, sel, s).ids for s in range(20)}) > 1


def test_matched_random_uses_the_whole_stratum_when_too_few_others_remain():
    f = frame()
    sel = select(f, bins=["a"])
    ctl = matched_random(f, sel, 0)
    assert sorted(ctl.ids) == ["p0", "p1", "p2"]  # category a has no other pairs


def test_bin_sums_and_chance_match_the_exact_permutation_moments():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    x[:5] += 3.0  # bin "hot" holds large values
    bins = ["hot"] * 5 + ["cold"] * 10 + ["mid"] * 15
    f = pl.DataFrame({"pair_id": [str(i) for i in range(30)], "category": bins, "dy_mean": x})
    t = bin_table(f, "category", n_perm=20000, seed=1)
    n, mu, var = 30, x.mean(), x.var()
    for r in t.iter_rows(named=True):
        m = r["n_pairs"]
        obs = x[[b == r["bin"] for b in bins]].sum()
        assert r["sum"] == pytest.approx(obs, rel=1e-12) and r["mean"] == pytest.approx(obs / m, rel=1e-12)
        # sampling m of n without replacement: mean m·x̄, variance m(n−m)/(n−1)·σ²
        z = (obs - m * mu) / np.sqrt(m * (n - m) / (n - 1) * var)
        assert r["z"] == pytest.approx(z, abs=0.05 * max(1.0, abs(z)))
    hot = t.filter(pl.col("bin") == "hot").row(0, named=True)
    assert hot["z"] > 3 and hot["p_value"] < 0.01
    assert t["excluded"].to_list() == [0, 0, 0]


def test_bin_table_excludes_nulls_and_refuses_bad_columns():
    f = frame().with_columns(pl.col("suspicion").alias("dy_mean"))
    t = bin_table(f, "category", n_perm=50)
    assert t["excluded"].to_list() == [1, 1, 1] and t["n_pairs"].sum() == 9
    with pytest.raises(InvalidValueError, match="no column 'nope'"):
        bin_table(f, "nope")
    with pytest.raises(InvalidValueError, match="not a number"):
        bin_table(f, "category", value="label")


def test_contrast_names_the_bins_that_drive_one_behaviour_and_not_the_other():
    rng = np.random.default_rng(2)
    n = 60
    cats = ["a"] * 20 + ["b"] * 20 + ["c"] * 20
    ya = rng.normal(size=n) * 0.1
    yb = rng.normal(size=n) * 0.1
    # chance is other bins of the same size, so each behaviour's shifts sum to zero across bins:
    # a raises refusal and c lowers it; b lowers sycophancy and c raises it
    ya[:20] += 1.0
    ya[40:] -= 1.0
    yb[20:40] -= 1.0
    yb[40:] += 1.0
    ids = [f"q{i}" for i in range(n)]
    A = pl.DataFrame({"pair_id": ids, "category": cats, "dy_mean": ya})
    B = pl.DataFrame({"pair_id": ids, "category": cats, "dy_mean": yb})
    c = contrast(A, B, "category", ("refusal", "sycophancy"), n_perm=4000)
    verdict = dict(zip(c["bin"], c["verdict"]))
    assert verdict["a"].startswith("raises refusal") and verdict["a"].endswith("not sycophancy")
    assert verdict["b"].startswith("lowers sycophancy") and verdict["b"].endswith("not refusal")
    assert verdict["c"] == "lowers refusal and raises sycophancy"
    assert c["unshared"].to_list() == [0, 0, 0]
    with pytest.raises(InvalidValueError, match="share no pair ids"):
        contrast(A, B.with_columns(pl.lit("other").alias("pair_id")), "category", ("r", "s"))
