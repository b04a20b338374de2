"""What the report reads from a finished run folder, loaded once into plain frames.

Reading is kept apart from computing (:mod:`.view`) so the view layer can be tested on frames
built by hand, without a model or a run. docs/design.md ("Run folder") lists the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ...behaviours import Behaviour, get as get_behaviour
from ...errors import RunFolderError
from ..rundir import RunDir

# The merged outputs every finished run has, in the order RunFrames declares them.
REQUIRED = ("policy", "features", "probes", "pairs", "pair_features", "pair_behaviour", "pair_data",
            "interference_groups")
# Written by `policytrace validate` (a report of an unvalidated run says so instead), and by
# runs that have them (feature contexts, the mediation curve of sae.layers).
OPTIONAL = ("validation", "removal", "planted", "feature_contexts", "layers")


@dataclass(frozen=True)
class RunFrames:
    """A finished run's outputs as frames and dicts; nothing here is computed."""

    path: Path
    manifest: dict
    behaviour: Behaviour
    policy: pl.DataFrame
    features: pl.DataFrame
    probes: pl.DataFrame
    pairs: pl.DataFrame
    pair_features: pl.DataFrame
    pair_behaviour: pl.DataFrame
    pair_data: pl.DataFrame
    groups: pl.DataFrame
    policy_json: dict
    config_text: str = ""
    validation: pl.DataFrame | None = None
    removal: pl.DataFrame | None = None
    planted: pl.DataFrame | None = None
    repairs: pl.DataFrame | None = None
    """One row per repair and probe set (`policytrace repair`); None when the folder has none."""
    feature_contexts: pl.DataFrame | None = None
    """Each feature's top-activating token contexts (none for runs before 0.3.0 or with
    features.contexts = 0)."""
    layers: pl.DataFrame | None = None
    """The mediation curve (layers.parquet), for runs with ``sae.layers``; None otherwise."""

    @property
    def base(self) -> dict:
        """The base stage's facts (counts, λ, fidelity, SAE quality, warnings)."""
        return self.manifest.get("stages", {}).get("base", {})


def open_run(run_dir: str | Path) -> RunFrames:
    """Load a finished run; :meth:`RunDir.complete` first checks the manifest's digests, so a
    damaged folder fails here with the file named, before anything is rendered."""
    rd = RunDir(run_dir)
    manifest = rd.complete()
    spec = manifest.get("stages", {}).get("base", {}).get("behaviour")
    if spec is None:
        raise RunFolderError(f"{rd.file('manifest.json')} names no behaviour; run `policytrace run` again")
    behaviour = get_behaviour(spec)
    required = [rd.read_parquet(f"{n}.parquet") for n in REQUIRED]
    optional = {n: rd.read_parquet(f"{n}.parquet") for n in OPTIONAL if rd.file(f"{n}.parquet").exists()}
    policy_json = rd.read_json("policy.json") if rd.file("policy.json").exists() else {}
    config = rd.file("config.toml").read_text() if rd.file("config.toml").exists() else ""
    from ..repair.summary import repairs_frame

    repairs = repairs_frame(rd.path)
    return RunFrames(rd.path.resolve(), manifest, behaviour, *required, policy_json=policy_json,
                     config_text=config, repairs=repairs if repairs.height else None, **optional)
