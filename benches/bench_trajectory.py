"""Trajectory mode against real retraining with the run's own AdamW recipe (issue "Attribute the
fine-tuning that was actually run"), on the embedded default:

    python benches/bench_trajectory.py [--lrs 5e-5,5e-4] [--subsets 20] [--pairs 48] [--work DIR]

For each learning rate it

* fine-tunes the demo's pairs with ``policytrace demo --finetune``'s recipe (AdamW, batches of 4,
  2 epochs, the MLP down-projections) at that lr and attributes the run (``run.mode =
  trajectory``): completeness (the final model's measured Δy beside Σ pair attributions, overall
  and per probe category) comes from the run's ``completeness.parquet``;
* validates it (``policytrace validate``): ``--subsets`` random halves of the pairs, each really
  fine-tuned with the same recipe (same schedule, seeded order) and measured by a probe pass; LDS
  (Spearman over subsets of Σ scores against the measured shift) for trajectory mode, the paper's
  one-step scores (a gradient-mode run over the same pairs, ``validate --compare``), the
  TrackStar-style gradient cosine and the other baselines, side by side on the same subsets.

The paper-mode run is shared by both lrs (its scores are linear in its own lr, and LDS is a rank
statistic). Work folders are resumable: a killed bench picks up where it was. Writes
results/trajectory.json and the README section between <!-- trajectory:begin/end -->. It only
measures: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import cpu_name, git_commit, write_readme_section  # noqa: E402

METHODS = ("dy_mean", "dy_mean_gradient", "grad_cosine", "concept_influence", "score_trajectory", "score_gradient", "random")


def _user(pairs: int, over: dict, args) -> dict:
    user: dict = {"preset": "demo", "data": {"max_pairs": pairs, **({"probes": args.probe_file} if args.probe_file else {})}}
    if args.sae_path:
        user["sae"] = {"path": args.sae_path}
    for table, values in over.items():
        user[table] = {**user.get(table, {}), **values}
    return user


def probe_subset(per_cell: int, work: Path) -> str:
    """A seeded subset of the shipped refusal probes, ``per_cell`` of each (category, harmful)
    cell, written into the work folder (so a CPU can afford the concept passes); "" = all."""
    if per_cell <= 0:
        return ""
    import random

    from policytrace.behaviours import refusal

    src = Path(refusal.__file__).parent / "data" / "refusal" / "probes.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["category"], bool(r["harmful"])), []).append(r)
    rng = random.Random(0)
    keep = {r["id"] for cell in cells.values() for r in rng.sample(cell, min(per_cell, len(cell)))}
    out = work / f"probes-{per_cell}-per-cell.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in keep))
    return str(out.resolve())


def run_folder(user: dict, out: Path, log) -> tuple[Path, float]:
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.run import execute

    t = time.perf_counter()
    execute(cfgmod.resolve(user), out, log=log, progress=False)
    return out, time.perf_counter() - t


def lds_table(run: Path) -> dict:
    import polars as pl

    frame = pl.read_parquet(run / "validation.parquet")
    return {f"{r['method']}/{r['target']}": {"lds": r["lds"], "ci": [r["ci_low"], r["ci_high"]]}
            for r in frame.iter_rows(named=True)}


def completeness(run: Path) -> list[dict]:
    import polars as pl

    return pl.read_parquet(run / "completeness.parquet").to_dicts()


def one_lr(lr: float, args, paper: Path, log) -> dict:
    from policytrace.pipeline.validate import validate
    from policytrace.train.demo import DEMO_FINETUNE

    over = {k: dict(v) for k, v in DEMO_FINETUNE.items() if k != "data"}
    over["train"]["lr"] = lr
    over["train"].update(args.train_over)
    name = f"trajectory-lr{lr:g}"
    args.reuse_name[name + args.run_suffix] = name
    run, run_s = run_folder(_user(args.pairs, over, args), args.work / (name + args.run_suffix), log)
    if args.reuse_retrains:  # the subsets' retrains depend on the recipe and members only
        for sub in ("validation", "validation-noise"):
            (run / sub).mkdir(parents=True, exist_ok=True)
            for f in sorted((args.reuse_retrains / args.reuse_name.get(run.name, run.name) / sub).glob("retrain-*.json")):
                shutil.copy2(f, run / sub / f.name)
    t = time.perf_counter()
    validate(run, subsets=args.subsets, alpha=0.5, seed=0, progress=True, log=log, baselines=not args.no_baselines,
             removal_k=0, compare=[paper])
    val_s = time.perf_counter() - t
    measured = json.loads((run / "validation.json").read_text())["measured"]
    manifest = json.loads((run / "manifest.json").read_text())
    comp = completeness(run)
    noise = noise_ceiling(run, args, log) if args.noise_seed else None
    return {"noise": noise, "lr": lr, "run": str(run), "run_s": run_s, "validate_s": val_s, "lds": lds_table(run),
            "completeness": comp, "subset_behaviour_shift": measured["behaviour"],
            "full_behaviour_shift": comp[0]["measured_dy"],
            "dy_by_epoch": manifest.get("trajectory", {}).get("dy_by_epoch")}


def noise_ceiling(run: Path, args, log) -> dict:
    """The same subsets retrained again with another data order (``train.seed + args.noise_seed``):
    how well one retraining's shifts rank the other's (Spearman over the subsets) bounds the LDS
    any per-pair attribution of this recipe can reach; each method's LDS against the second order
    and against the two orders' mean sits beside it."""
    import dataclasses

    import numpy as np

    from policytrace.numeric.metrics import lds, spearman
    from policytrace.pipeline.modes import get_mode
    from policytrace.pipeline.validate import open_state, subset_masks

    rd, manifest, state = open_state(run, log)
    first = json.loads((run / "validation.json").read_text())["measured"]["behaviour"]
    train = dataclasses.replace(state.cfg.train, seed=state.cfg.train.seed + args.noise_seed)
    other = dataclasses.replace(state, cfg=dataclasses.replace(state.cfg, train=train))
    masks = subset_masks(state.inputs.pairs.height, args.subsets, 0.5, 0)
    retrainer = get_mode(state.cfg.run.mode).retrainer(other, 0, rd.file("validation-noise"))
    second = []
    for i, mask in enumerate(masks):
        log(f"noise ceiling: subset {i + 1}/{len(masks)} with data-order seed {train.seed}")
        second.append(retrainer.measure(np.flatnonzero(mask))["behaviour_shift"])
    import polars as pl

    frame = pl.read_parquet(run / "validation_scores.parquet")
    out = {"seed": train.seed, "behaviour_second": second,
           "ceiling_spearman": spearman(np.array(first), np.array(second)), "methods": {}}
    mean = (np.array(first) + np.array(second)) / 2
    for m in METHODS:
        if m in frame.columns:
            sc = frame[m].to_numpy()
            out["methods"][m] = {"second": lds(sc, masks, np.array(second))["lds"], "mean": lds(sc, masks, mean)["lds"]}
    return out


def _value(text: str):
    """A --train value as TOML reads it (a number, a bool or a bare string)."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _fmt(x) -> str:
    return "–" if x is None else f"{x:+.3f}"


def table(out: dict) -> str:
    lines = ["<!-- trajectory:begin -->",
             f"Commit {out['commit']}, {out['cpu']}, {out['threads']} threads, load {out['load']}; "
             f"{out['pairs']} pairs, "
             f"{'all 160 probes' if not out.get('probes_per_cell') else str(16 * out['probes_per_cell']) + ' probes (a seeded subset)'}, "
             f"{out['subsets']} random halves retrained with the run's recipe per lr. LDS on the behaviour shift "
             "(Spearman over the subsets of the summed attribution against the measured mean Δy): `dy_mean` is "
             "trajectory mode's, `dy_mean_gradient` the paper's one-step mode's (validate --compare), "
             "`grad_cosine` TrackStar-style, `score_*` the policy score's.", "",
             "| lr | full fine-tune Δy (measured) | half-subset Δy (mean, min .. max) | completeness gap (all probes) | "
             + " | ".join(f"LDS {m}" for m in METHODS) + " |",
             "|---|---|---|---|" + "---|" * len(METHODS)]
    for r in out["lrs"]:
        sub = r["subset_behaviour_shift"]
        cells = []
        for m in METHODS:
            v = r["lds"].get(f"{m}/behaviour")
            cells.append("–" if v is None else f"{v['lds']:.3f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]")
        lines.append(f"| {r['lr']:g} | {_fmt(r['full_behaviour_shift'])} | {_fmt(sum(sub) / len(sub))} "
                     f"({_fmt(min(sub))} .. {_fmt(max(sub))}) | {100 * r['completeness'][0]['relative_gap']:+.1f} % | "
                     + " | ".join(cells) + " |")
    lines += ["", "Completeness per probe set (measured Δy of the final model; Σ pair attributions + θ₀'s decay; gap):", "",
              "| lr | probes | measured | attributed + decay | gap |", "|---|---|---|---|---|"]
    for r in out["lrs"]:
        for c in r["completeness"]:
            lines.append(f"| {r['lr']:g} | {c['probes']} ({c['n_probes']}) | {c['measured_dy']:+.4f} | "
                         f"{c['attributed_dy'] + c['decay_dy']:+.4f} | {100 * c['relative_gap']:+.1f} % |")
    noisy = [r for r in out["lrs"] if r.get("noise")]
    if noisy:
        lines += ["", "The noise ceiling: every subset retrained again with another data order (`train.seed` + "
                  f"{out.get('noise_seed')}); Spearman of the two orders' shifts over the subsets, and each method's LDS "
                  "against the second order and against the two orders' mean:", "",
                  "| lr | order vs order | " + " | ".join(f"{m} (2nd / mean)" for m in METHODS) + " |",
                  "|---|---|" + "---|" * len(METHODS)]
        for r in noisy:
            n = r["noise"]
            cells = [f"{n['methods'][m]['second']:.3f} / {n['methods'][m]['mean']:.3f}" if m in n["methods"] else "–"
                     for m in METHODS]
            lines.append(f"| {r['lr']:g} | {n['ceiling_spearman']:.3f} | " + " | ".join(cells) + " |")
    lines.append("<!-- trajectory:end -->")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="5e-5,5e-4", help="comma-separated AdamW learning rates")
    ap.add_argument("--subsets", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--probes-per-cell", type=int, default=0,
                    help="a seeded subset of the shipped probes, N per (category, harmful) cell (0 = all 160)")
    ap.add_argument("--sae-path", default="", help="an SAE folder to use (sae.path) instead of training the default "
                    "on these probes' prompts, e.g. the default one cached for the full probe set")
    ap.add_argument("--reuse-retrains", type=Path, default=None,
                    help="an earlier --work folder whose subset retrains (same recipe, pairs and seed) are reused")
    ap.add_argument("--work", type=Path, default=Path("bench-trajectory"))
    ap.add_argument("--noise-seed", type=int, default=0,
                    help="also retrain every subset with train.seed + N (another data order): the noise ceiling")
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                    help="a [train] field for the trajectory runs (e.g. second_moment=differentiated); repeatable")
    ap.add_argument("--run-suffix", default="", help="appended to each trajectory run folder's name")
    ap.add_argument("--no-baselines", action="store_true", help="skip TrackStar-style and the other baselines")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "trajectory.json")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    args.train_over = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.train)}
    args.reuse_name = {}
    args.work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[bench_trajectory {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import torch

    log("paper mode (gradient mode, one update per pair) over the same pairs")
    args.probe_file = probe_subset(args.probes_per_cell, args.work)
    paper, paper_s = run_folder(_user(args.pairs, {"run": {"mode": "gradient"}}, args),
                                args.work / "paper", log)
    out = {"commit": git_commit(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "load": " ".join(f"{x:.1f}" for x in os.getloadavg()), "pairs": args.pairs, "subsets": args.subsets,
           "probes_per_cell": args.probes_per_cell, "sae_path": args.sae_path, "noise_seed": args.noise_seed,
           "train_overrides": args.train_over,
           "paper_run_s": paper_s, "lrs": []}
    for lr in (float(x) for x in args.lrs.split(",")):
        log(f"lr {lr:g}: fine-tune, attribute, validate")
        out["lrs"].append(one_lr(lr, args, paper, log))
        out["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    block = table(out)
    print(block)
    if not args.no_readme:
        write_readme_section("trajectory", block, "Trajectory mode against retraining with the run's recipe",
                             "python benches/bench_trajectory.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
