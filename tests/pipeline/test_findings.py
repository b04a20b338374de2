"""Suspicion per behaviour, interference findings in run folders, and `policytrace curate`."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from policytrace.behaviours import get


def _frame(labels, flags, on, off):
    return pl.DataFrame({"pair_id": [f"p{i}" for i in range(len(labels))], "label": labels, "harmful": flags,
                         "false_claim": flags, "dy_on_flagged": on, "dy_on_unflagged": off})


def test_refusal_suspicion_points_at_pairs_contradicting_their_label():
    # a compliance pair raising refusal on harmless probes, and a refusal pair lowering it on
    # harmful probes, are the suspicious ones; the rest behave as labelled
    f = _frame(["refusal", "refusal", "compliance", "compliance", "refusal", "compliance"],
               [True, True, False, False, True, False],
               [0.20, -0.30, 0.0, 0.0, 0.25, 0.0], [0.0, 0.0, -0.10, 0.40, 0.0, -0.12])
    s = get("refusal").suspicion(f)
    order = s.sort("suspicion", descending=True)["pair_id"].to_list()
    assert order[:2] == ["p3", "p1"]
    assert (s["suspicion"] > 0).to_list() == [False, True, False, True, False, False]
    reason = s.filter(pl.col("pair_id") == "p3")["suspicion_reason"][0]
    assert "compliance" in reason and "raises" in reason and "harmless" in reason and "contradicts" in reason


def test_sycophancy_suspicion_uses_labels_on_false_claims():
    f = _frame(["correcting", "correcting", "sycophantic", "planted_sycophantic"], [True] * 4,
               [-0.2, 0.5, 0.3, 0.6], [0.0, 0.0, 0.0, 0.0])
    s = get("sycophancy").suspicion(f)
    assert (s["suspicion"] > 0).to_list() == [False, True, False, True]


def test_suspicion_without_flag_or_label_is_null():
    f = _frame(["other"], [None], [0.1], [0.1])
    s = get("sycophancy").suspicion(f)
    assert s["suspicion"][0] is None and "no intended direction" in s["suspicion_reason"][0]


torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.run import execute

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("findings")
    cfg = cfgmod.resolve(tiny_config(write_tiny_model(root / "m"), *write_tiny_data(root), root / "cache",
                                     update={"lr": 1e-2}))
    execute(cfg, root / "run", log=lambda m: None, progress=False)
    return root / "run"


def test_run_folder_holds_the_findings(run):
    pairs = pl.read_parquet(run / "pairs.parquet")
    for col in ("dy_mean", "pred_dy_mean", "direct_dy", "mediated_share", "mediated_r2", "off_target_chance",
                "off_target_p", "interference_significant", "side_interference", "side_interference_chance",
                "suspicion", "suspicion_raw", "suspicion_reason"):
        assert col in pairs.columns, col
    groups = pl.read_parquet(run / "interference_groups.parquet")
    assert set(groups["grouping"]) == {"category", "side"}
    _check_against_chance(run, pairs, groups)
    beh = pl.read_parquet(run / "pair_behaviour.parquet")
    assert beh.height == pairs.height * 3 and {"mediated_dy", "direct_dy"} <= set(beh.columns)
    manifest = json.loads((run / "manifest.json").read_text())
    assert "interference_groups.parquet" in manifest["files"] and "pair_behaviour.parquet" in manifest["files"]


def test_curate_drops_the_most_suspicious(run, tmp_path, capsys):
    from policytrace.errors import InvalidValueError
    from policytrace.pipeline.cli import main
    from policytrace.pipeline.curate import curate

    top = pl.read_parquet(run / "pairs.parquet").sort("suspicion", descending=True)["pair_id"].head(3).to_list()
    assert main(["curate", str(run), "--drop", "3", "--out", str(tmp_path / "c.jsonl")]) == 0
    kept = [json.loads(line)["id"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(kept) == 9 and not set(kept) & set(top)
    assert "dropped" in capsys.readouterr().out
    res = curate(run, tmp_path / "c.parquet", threshold=1e9)
    assert res.kept.height == 12 and res.dropped.height == 0
    with pytest.raises(InvalidValueError, match="--drop"):
        curate(run, tmp_path / "x.jsonl", drop=99)
    with pytest.raises(InvalidValueError, match=".jsonl or .parquet"):
        curate(run, tmp_path / "x.csv", drop=1)


def _binomial_tail(k: int, n: int, c: float) -> float:
    """P(Binomial(n, c) >= k), summed term by term."""
    return sum(math.comb(n, j) * c**j * (1 - c) ** (n - j) for j in range(k, n + 1))


def _check_against_chance(run, pairs, groups):
    """The chance-corrected columns and the per-group table, recomputed here from each pair's
    d_coef and the features' groups (category: where a feature is most active; side: the
    side of the harmful flag with the higher mean activation).

    Per pair: the off-target share, its chance value 1 − m/K and the permutation p-value. The
    run estimates the p-value from N_PERM random intended sets, (1 + hits) / (N_PERM + 1); here
    the exact one comes from all C(K, m) sets, and the estimate must lie within 5 binomial
    standard deviations of its expectation (exactly on it when p is 0 or 1). Per group: the
    dominant-feature rate, the chance rate and the one-sided binomial p-value, exactly."""
    from itertools import combinations

    import numpy as np

    from policytrace.pipeline.findings import N_PERM
    from policytrace.pipeline.validate import open_state

    _, _, state = open_state(run, lambda m: None)
    fids = state.policy.feature_ids.tolist()
    K = len(fids)
    X, flag = state.features.X, state.inputs.flag
    feature_of = {
        "category": np.array(state.features.groups, dtype=object),
        "side": np.where(X[flag].mean(axis=0) > X[~flag].mean(axis=0), "harmful", "harmless").astype(object),
    }
    assert feature_of["category"].tolist() == pl.read_parquet(run / "features.parquet")["group"].to_list()
    harmful = dict(zip(state.inputs.pairs["id"], state.inputs.pairs["harmful"]))
    pair_of = {"category": pairs["group"].to_list(),
               "side": ["harmful" if harmful[i] else "harmless" for i in pairs["pair_id"]]}
    pf = pl.read_parquet(run / "pair_features.parquet")
    d = np.zeros((pairs.height, K))
    row = {p: i for i, p in enumerate(pairs["pair_id"])}
    for p, f, v in zip(pf["pair_id"], pf["feature_id"], pf["d_coef"]):
        d[row[p], fids.index(f)] = abs(v)
    w = d / d.sum(axis=1, keepdims=True)
    dominant = d.argmax(axis=1)
    for grouping, prefix in (("category", ""), ("side", "side_")):
        fg, pg = feature_of[grouping], pair_of[grouping]
        interfered = np.array([fg[j] != g for j, g in zip(dominant, pg)])
        for i, g in enumerate(pg):
            intended = fg == g
            m = int(intended.sum())
            share = 1 - w[i, intended].sum()
            assert pairs[f"{prefix}off_target_share"][i] == pytest.approx(share, abs=1e-12)
            assert pairs[f"{prefix}off_target_chance"][i] == pytest.approx(1 - m / K, abs=1e-15)
            null = np.array([1 - w[i, list(c)].sum() for c in combinations(range(K), m)])
            p = float(np.mean(null >= share - 1e-12))
            mean, sd = (1 + N_PERM * p) / (N_PERM + 1), np.sqrt(N_PERM * p * (1 - p)) / (N_PERM + 1)
            assert abs(pairs[f"{prefix}off_target_p"][i] - mean) <= 5 * sd + 1e-12, (grouping, i, p)
        table = groups.filter(pl.col("grouping") == grouping)
        assert table["group"].to_list() == sorted(set(pg))
        for r in table.iter_rows(named=True):
            mine = np.array([x == r["group"] for x in pg])
            n, k = int(mine.sum()), int(interfered[mine].sum())
            chance = 1 - (fg == r["group"]).sum() / K
            assert (r["n_pairs"], r["interference_rate"]) == (n, k / n)
            assert r["chance_rate"] == pytest.approx(chance, abs=1e-15)
            assert r["p_value"] == pytest.approx(_binomial_tail(k, n, chance), rel=1e-12, abs=1e-300)
