"""One schema per output frame, whatever mode wrote it: every parquet file of a tiny engine run
and of tiny gradient runs (with and without per-feature outputs) has exactly its schema's
columns, order and dtypes; what the merge writes when there is nothing is the schema's empty
frame; the modes are found by name and nothing outside pipeline/modes/ tests the mode's name."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")

from policytrace.errors import ConfigError  # noqa: E402
from policytrace.numeric.frames import (INTERFERENCE_GROUPS_SCHEMA, INTERFERENCE_SCHEMA,  # noqa: E402
                                        PAIR_BEHAVIOUR_SCHEMA, PAIR_FEATURES_SCHEMA, PAIRS_SCHEMA, empty)
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.pipeline.findings import merged_pairs_schema  # noqa: E402
from policytrace.pipeline.modes import MODES, get_mode  # noqa: E402
from policytrace.pipeline.rundir import RunDir  # noqa: E402
from policytrace.pipeline.run import FRAME_SCHEMAS, _merged, execute  # noqa: E402

from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402

PKG = Path(__file__).resolve().parents[2] / "python" / "policytrace"
SHARD_SCHEMAS = {"pairs": PAIRS_SCHEMA, "pair_features": PAIR_FEATURES_SCHEMA, "pair_behaviour": PAIR_BEHAVIOUR_SCHEMA}
RUNS = {
    "engine": {},
    "gradient": dict(run={"mode": "gradient"}, gradient={"per_feature": True}, update={"lr": 1e-3}),
    "gradient_totals": dict(run={"mode": "gradient"}, gradient={"per_feature": False}, update={"lr": 1e-3}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("frames")
    model, (probes, pairs) = write_tiny_model(root / "model"), write_tiny_data(root)
    out = {}
    for name, over in RUNS.items():
        cfg = cfgmod.resolve(tiny_config(model, probes, pairs, root / "cache", **over))
        execute(cfg, root / name, log=lambda m: None, progress=False)
        out[name] = root / name
    return out


def _schema(path: Path) -> list[tuple[str, pl.DataType]]:
    return list(pl.read_parquet_schema(path).items())


def _expected(per_feature: bool) -> dict[str, list]:
    """Every parquet file a mode writes (shards, merged frames, interference tables) and its schema."""
    want = {"pair_features.parquet": PAIR_FEATURES_SCHEMA, "pair_behaviour.parquet": PAIR_BEHAVIOUR_SCHEMA,
            "pairs.parquet": merged_pairs_schema(per_feature, sides=True),
            "interference.parquet": INTERFERENCE_SCHEMA, "interference_groups.parquet": INTERFERENCE_GROUPS_SCHEMA}
    return {f: list(s.items()) for f, s in want.items()}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_file_has_its_schema(runs, name):
    folder = runs[name]
    per_feature = name != "gradient_totals"
    for f, schema in _expected(per_feature).items():
        assert _schema(folder / f) == schema, f
    shards = sorted((folder / "shards").glob("*.parquet"))
    kinds = {p.name.rsplit("-", 1)[0] for p in shards}
    assert kinds == ({"pairs", "pair_behaviour"} | ({"pair_features"} if per_feature else set()))
    for p in shards:
        assert _schema(p) == list(SHARD_SCHEMAS[p.name.rsplit("-", 1)[0]].items()), p.name
    assert set(pl.read_parquet(folder / "pairs.parquet")["mode"]) == {cfgmod.load(folder / "config.toml").run.mode}
    # engine mode alone measures per-pair deltas (validate's model-free scores read them)
    assert bool(list((folder / "shards").glob("deltas-*.npz"))) == (name == "engine")


def test_undefined_values_are_null_not_missing(runs):
    """What first order cannot give (and what gradient mode skips without per_feature) is null in
    a column of the schema's dtype."""
    g = pl.read_parquet(runs["gradient_totals"] / "pairs.parquet")
    assert g["mediated_r2"].null_count() == g.height
    for col in ("dominant_feature", "dominant_group", "off_target_share", "interference"):
        assert g[col].null_count() == g.height, col
    beh = pl.read_parquet(runs["gradient"] / "pair_behaviour.parquet")
    assert beh["mediated_dy"].null_count() == beh["direct_dy"].null_count() == beh.height
    assert beh["dy_mean"].null_count() == 0


def test_nothing_to_merge_is_the_empty_frame_of_its_schema(runs, tmp_path):
    folder = runs["gradient_totals"]
    for f, schema in (("pair_features.parquet", PAIR_FEATURES_SCHEMA), ("interference.parquet", INTERFERENCE_SCHEMA),
                      ("interference_groups.parquet", INTERFERENCE_GROUPS_SCHEMA)):
        assert pl.read_parquet(folder / f).equals(empty(schema)), f
    rd = RunDir(tmp_path / "none", lambda m: None)
    for name, schema in FRAME_SCHEMAS.items():
        merged = _merged(rd, [], name)
        assert merged.height == 0 and list(merged.schema.items()) == list(schema.items()), name
        rd.make()
        rd.write_parquet(f"{name}.parquet", merged)
        assert pl.read_parquet(rd.file(f"{name}.parquet")).equals(empty(schema)), name


def test_modes_by_name():
    """Every mode the config accepts is registered, and an unknown name lists the known ones."""
    from typing import get_args, get_type_hints

    from policytrace.pipeline.config import RunCfg

    assert set(MODES) == set(get_args(get_type_hints(RunCfg)["mode"]))
    assert all(get_mode(n).name == n for n in MODES)
    with pytest.raises(ConfigError, match="engine, gradient"):
        get_mode("trajectoryy")


def test_no_mode_branch_outside_the_modes_package():
    """The seam: orchestration, validate and the report ask the registry or the frames."""
    pattern = re.compile(r"""\.mode\s*[!=]=|mode\s*==\s*["'](engine|gradient)""")
    hits = [f"{p.relative_to(PKG)}:{i + 1}" for p in sorted(PKG.rglob("*.py")) if "modes" not in p.parts
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert hits == []
