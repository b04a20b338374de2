"""``validate --compare``: another run's scores over the same pairs ranked against the same
retrained subsets (a trajectory run beside the paper's one-step scores, say)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

pytest.importorskip("torch")

from policytrace.errors import InvalidValueError  # noqa: E402

from _helpers import expect  # noqa: E402
from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.run import execute

    root = tmp_path_factory.mktemp("compare")
    model = write_tiny_model(root / "model")
    probes, pairs = write_tiny_data(root)
    out = {}
    for name, over in (("engine", {}), ("gradient", {"run": {"mode": "gradient"}}),
                       ("fewer", {"run": {"mode": "gradient"}, "data": {"max_pairs": 6}})):
        user = tiny_config(model, probes, pairs, root / "cache", update={"lr": 1e-2})
        for table, values in over.items():
            user.setdefault(table, {}).update(values)
        execute(cfgmod.resolve(user), root / name, log=lambda m: None, progress=False)
        out[name] = root / name
    return out


def test_compared_scores_join_the_methods_on_the_same_subsets(runs):
    from policytrace.numeric.metrics import lds
    from policytrace.pipeline.cli import main
    from policytrace.pipeline.validate import open_state
    from policytrace.pipeline.validate.retrain import subset_masks

    assert main(["validate", str(runs["engine"]), "--subsets", "4", "--no-baselines", "--removal-k", "0", "--quiet",
                 "--compare", str(runs["gradient"])]) == 0
    frame = pl.read_parquet(runs["engine"] / "validation.parquet")
    assert {"score_exact", "score_gradient", "dy_mean_gradient"} <= set(frame["method"])
    # the compared run's LDS is its own scores (in this run's pair order) against the measured shifts
    _, _, state = open_state(runs["engine"], lambda m: None)
    ids = state.inputs.pairs["id"].to_list()
    theirs = pl.read_parquet(runs["gradient"] / "pairs.parquet")
    score = dict(zip(theirs["pair_id"], theirs["score"]))
    measured = json.loads((runs["engine"] / "validation.json").read_text())["measured"]
    masks = subset_masks(len(ids), 4, 0.5, 0)
    for target in ("policy", "behaviour"):
        want = lds(np.array([score[i] for i in ids]), masks, np.array(measured[target]), seed=0)
        row = frame.filter((pl.col("method") == "score_gradient") & (pl.col("target") == target)).row(0, named=True)
        assert row["lds"] == pytest.approx(want["lds"], abs=1e-12)


def test_compare_names_a_clash_and_refuses_other_pairs(runs):
    from policytrace.pipeline.validate import compared_scores, open_state

    _, _, state = open_state(runs["engine"], lambda m: None)
    ids = state.inputs.pairs["id"].to_list()
    once = compared_scores(runs["gradient"], ids, {"score_exact"})
    assert set(once) == {"score_gradient", "dy_mean_gradient"}
    twice = compared_scores(runs["gradient"], ids, set(once))
    assert set(twice) == {"score_gradient@gradient", "dy_mean_gradient@gradient"}
    np.testing.assert_array_equal(twice["score_gradient@gradient"], once["score_gradient"])
    expect(InvalidValueError, lambda: compared_scores(runs["gradient"], ids, set(once) | set(twice)),
           "already compared")
    expect(InvalidValueError, lambda: compared_scores(runs["fewer"], ids, set()), str(runs["fewer"]),
           "missing", "same pairs")
