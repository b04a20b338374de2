"""Reading the repairs a run folder holds (no torch: the report uses it)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl


def list_repairs(run_dir: str | Path) -> list[tuple[str, dict]]:
    """The run folder's repairs (name, repair.json), by name."""
    root = Path(run_dir) / "repairs"
    out = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            f = p / "repair.json"
            if f.is_file():
                try:
                    out.append((p.name, json.loads(f.read_text())))
                except json.JSONDecodeError:
                    continue
    return out


def repairs_frame(run_dir: str | Path) -> pl.DataFrame:
    """One row per repair and probe set: the move back, the controls' band, the ratio, the cost."""
    rows = []
    for name, d in list_repairs(run_dir):
        rep = d["repaired"]
        for ps, c in d["causal"].items():
            band = c["controls"]
            rows.append({"repair": name, "method": d["method"], "selection": json.dumps({k: v for k, v in d["selection"].items() if k != "ids"}),
                         "pairs": d["selection"]["size"], "probe_set": ps, "finetune_change": c["finetune_change"],
                         "moved_back": c["back"], "fraction_back": c["fraction"],
                         "controls_mean": band.get("mean"), "controls_sd": band.get("sd"),
                         "controls_min": band.get("min"), "controls_max": band.get("max"), "controls": band.get("n", 0),
                         "ratio": c["ratio"], "kept_loss": rep["kept_loss"], "finetuned_kept_loss": rep["finetuned_kept_loss"],
                         "heldout_loss": rep["heldout_loss"], "finetuned_heldout_loss": d["finetuned"]["heldout_loss"]})
    return pl.DataFrame(rows, infer_schema_length=None)
