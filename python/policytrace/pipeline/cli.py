"""Command line: ``policytrace run CONFIG.toml``, ``demo``, ``report RUN_DIR``, ``validate RUN_DIR``,
``curate``, ``repair RUN_DIR``, ``bins RUN_DIR`` (also ``python -m policytrace ...``). Every error the
package raises is printed as one line saying what is wrong and what to do, with exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..behaviours import BEHAVIOURS, DEFAULT
from ..errors import ConfigError, PolicytraceError


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    ap = argparse.ArgumentParser(prog="policytrace", description=__doc__)
    ap.add_argument("--version", action="version", version=f"policytrace {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="a full attribution job into a run folder (resumable)")
    r.add_argument("config", help="TOML config (see README: Configuration)")
    r.add_argument("--out", help="run folder (default: runs/<config name>)")
    r.add_argument("--no-report", action="store_true", help="skip report.html")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    d = sub.add_parser("demo", help="the embedded default end to end (SmolLM2 + a trained SAE), offline")
    d.add_argument("--out", default=None, help="run folder (default: ./policytrace-demo, or "
                                               "./policytrace-demo-<behaviour> for another behaviour)")
    d.add_argument("--pairs", type=int, default=None, help="number of SFT pairs (default 24; 0 = all 240)")
    d.add_argument("--behaviour", default=DEFAULT, choices=sorted(BEHAVIOURS),
                   help=f"the shipped behaviour to attribute (default: {DEFAULT})")
    d.add_argument("--finetune", action="store_true",
                   help="fine-tune the model on the pairs with a realistic recipe (AdamW, batches, epochs) and "
                        "attribute that run (trajectory mode)")
    d.add_argument("--layers", default=None,
                   help="mediation across layers: more decoder layers read beside sae.layer, comma-separated "
                        "(sae.layers; the default SAE is trained for each), e.g. 4,16,22")
    d.add_argument("--mode", default=None, choices=("engine", "gradient"), help="run.mode (default: engine)")
    d.add_argument("--quiet", action="store_true")
    ft = sub.add_parser("finetune", help="fine-tune the config's model on its pairs with its [train] recipe "
                                         "(checkpoints and the records trajectory mode attributes; resumable)")
    ft.add_argument("config", help="TOML config ([model], [data], [train])")
    ft.add_argument("--out", required=True, help="the fine-tune's folder (model/, checkpoints/, records.json)")
    ft.add_argument("--quiet", action="store_true")
    rep = sub.add_parser("report", help="write RUN_DIR/report.html")
    rep.add_argument("run_dir")
    cur = sub.add_parser("curate", help="write the run's pairs without the most suspicious ones")
    cur.add_argument("run_dir")
    how = cur.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop", type=int, help="drop the K pairs with the highest suspicion")
    how.add_argument("--threshold", type=float, help="drop the pairs with suspicion >= T (in units of the pairs' robust spread; > 0 contradicts the label)")
    cur.add_argument("--out", required=True, help="the curated pair file (.jsonl or .parquet)")
    val = sub.add_parser("validate", help="LDS of a finished run's attributions against real subset retraining")
    val.add_argument("run_dir")
    val.add_argument("--subsets", type=int, default=20, help="random subsets to retrain on (default 20)")
    val.add_argument("--alpha", type=float, default=0.5, help="fraction of the pairs in each subset (default 0.5)")
    val.add_argument("--seed", type=int, default=0)
    val.add_argument("--no-baselines", action="store_true", help="skip the gradient baselines")
    val.add_argument("--planted", type=int, default=0,
                     help="add this many mislabeled pairs and report each method's detection AUC (default 0)")
    val.add_argument("--removal-k", type=int, default=None,
                     help="pairs removed in the top-k removal test (default: an eighth of the pairs; 0 = skip)")
    val.add_argument("--removal-methods", default=None,
                     help="comma-separated methods for the removal test (default: all; each costs 4 retrainings)")
    val.add_argument("--compare", action="append", default=[], metavar="RUN",
                     help="another finished run over the same pairs (say, gradient mode's one-step scores beside "
                          "a trajectory run): its score and dy_mean are ranked against the same retrained subsets; "
                          "repeatable")
    val.add_argument("--quiet", action="store_true")
    _repair_parsers(sub)
    return ap


# --- repair and bins (README: "Repairing the model") ---------------------------------------
def _repair_parsers(sub) -> None:
    from .repair.config import RepairCfg, UnlearnCfg

    rp = sub.add_parser("repair", help="take the selected pairs out of the fine-tuned model (retrain, first-order "
                                       "removal, unlearning), checked against random pairs of the same kind")
    rp.add_argument("run_dir")
    how = rp.add_mutually_exclusive_group(required=True)
    how.add_argument("--top", type=int, help="the K pairs with the largest --by")
    how.add_argument("--fraction", type=float, help="the top fraction (0, 1] of the pairs by --by")
    how.add_argument("--threshold", type=float, help="every pair with --by >= T")
    how.add_argument("--ids", help="comma-separated pair ids, or @FILE with one id a line")
    how.add_argument("--bins", help="comma-separated values of --bin-column: whole bins")
    rp.add_argument("--by", default="suspicion", help="the pairs.parquet column that ranks pairs (descending; "
                                                      "'-dy_mean' ranks by the negated column); default suspicion")
    rp.add_argument("--bin-column", default="category", help="the pair column --bins names values of")
    d, u = RepairCfg(), UnlearnCfg()
    rp.add_argument("--method", default=d.method, choices=["retrain", "first-order", "unlearn"])
    rp.add_argument("--weight", type=float, default=d.weight,
                    help="retrain: the selected pairs' loss weight (0 = dropped, the default)")
    rp.add_argument("--controls", type=int, default=d.controls, help="random matched selections (default 3)")
    rp.add_argument("--seed", type=int, default=d.seed)
    rp.add_argument("--strata", default=d.strata, help="the pair column the controls are matched on")
    rp.add_argument("--probes2", default=None, help="a second probe file the behaviour is also measured on")
    rp.add_argument("--record-steps", action="store_true",
                    help="first-order on a run without trajectory records: refit the recipe once, recording the "
                         "selections' steps")
    rp.add_argument("--recipe", default="auto", choices=["auto", "sequential", "train"],
                    help="how the run's model is fine-tuned (and retrained): train = its [train] recipe (the default "
                         "for run.mode = trajectory), sequential = its per-pair [update] pair after pair (otherwise)")
    rp.add_argument("--name", default=None, help="the repair's folder under RUN/repairs/ (default: method-hash)")
    for f in ("lr", "max_lr", "max_steps", "batch", "max_grad_norm", "margin", "monitor_pairs"):
        default = getattr(u, f)
        rp.add_argument(f"--unlearn-{f.replace('_', '-')}", dest=f"unlearn_{f}", type=type(default), default=default)
    rp.add_argument("--unlearn-no-stop-at-base", dest="unlearn_stop_at_base", action="store_false")
    rp.add_argument("--quiet", action="store_true")
    b = sub.add_parser("bins", help="attributions summed over bins of a pair column, against within-bin permutations")
    b.add_argument("run_dir")
    b.add_argument("--by", required=True, help="the pair column to bin by (category, label, a column of your file)")
    b.add_argument("--value", default="dy_mean", help="the per-pair attribution summed (default dy_mean)")
    b.add_argument("--contrast", default=None, help="a second run folder over the same pairs (another behaviour): "
                                                    "which bins drive one behaviour and not the other")
    b.add_argument("--perm", type=int, default=2000, help="permutations (default 2000)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--alpha", type=float, default=0.05)
    b.add_argument("--out", default=None, help="also write the table (.parquet or .csv)")


def _selection_args(args) -> dict:
    from ..errors import InvalidValueError

    if args.ids is not None:
        if args.ids.startswith("@"):
            path = Path(args.ids[1:])
            if not path.is_file():
                raise InvalidValueError(f"--ids {args.ids}: no such file")
            ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            ids = [i.strip() for i in args.ids.split(",") if i.strip()]
        return {"ids": ids}
    if args.bins is not None:
        return {"bins": [v.strip() for v in args.bins.split(",") if v.strip()], "bin_column": args.bin_column}
    for k in ("top", "fraction", "threshold"):
        if getattr(args, k) is not None:
            return {k: getattr(args, k), "by": args.by}
    raise InvalidValueError("give one of --top, --fraction, --threshold, --ids, --bins")


def _repair(args) -> int:
    from .._tables import from_mapping
    from .repair import repair
    from .repair.config import RepairCfg, UnlearnCfg

    cfg = from_mapping(RepairCfg, {"method": args.method, "weight": args.weight, "controls": args.controls,
                                   "seed": args.seed, "strata": args.strata})
    ucfg = from_mapping(UnlearnCfg, {k[len("unlearn_"):]: v for k, v in vars(args).items() if k.startswith("unlearn_")})
    doc = repair(args.run_dir, _selection_args(args), cfg, ucfg, name=args.name, probes2=args.probes2,
                 record_steps=args.record_steps, recipe=args.recipe, progress=not args.quiet)
    rep = doc["repaired"]
    print(f"{doc['method']} of {doc['selection']['size']} pairs: {doc['folder']}")
    for ps, c in doc["causal"].items():
        band = c["controls"]
        ctl = (f"; random controls {band['mean']:+.4f} (sd {band['sd']:.4f}, {band['n']} seeds), ratio "
               f"{c['ratio']:.2f}" if band.get("n") and c["ratio"] is not None else "")
        frac = f" ({100 * c['fraction']:.0f}% of the fine-tune's change)" if c["fraction"] is not None else ""
        print(f"  {ps}: moved back {c['back']:+.4f}{frac}{ctl}")
    kept = "" if rep["kept_loss"] is None else f"kept pairs {rep['finetuned_kept_loss']:.4f} -> {rep['kept_loss']:.4f}, "
    print(f"  cost: loss on {kept}held-out text {doc['finetuned']['heldout_loss']:.4f} -> {rep['heldout_loss']:.4f}")
    return 0


def _bins(args) -> int:
    import polars as pl

    from ..errors import InvalidValueError
    from .bins import bin_table, contrast
    from .repair.table import pair_table
    from .rundir import RunDir

    rd = RunDir(args.run_dir)
    rd.complete()
    table = pair_table(rd)
    if args.contrast:
        other = RunDir(args.contrast)
        other.complete()
        names = (_behaviour_name(rd), _behaviour_name(other))
        if names[0] == names[1]:
            names = (f"{names[0]}-a", f"{names[1]}-b")
        frame = contrast(table, pair_table(other), args.by, names, args.value, args.alpha, args.perm, args.seed)
    else:
        frame = bin_table(table, args.by, args.value, args.perm, args.seed)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(frame)
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() == ".parquet":
            frame.write_parquet(out)
        elif out.suffix.lower() == ".csv":
            frame.write_csv(out)
        else:
            raise InvalidValueError(f"--out {out} must end in .parquet or .csv")
        print(f"written: {out}")
    return 0


def _behaviour_name(rd) -> str:
    from . import config as cfgmod

    return cfgmod.load(rd.file("config.toml")).behaviour.name


def _out_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is an existing file; name a folder (new or a run folder to resume)")
    return path


def _layer_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as e:
        raise ConfigError(f"--layers must be comma-separated layer numbers such as 4,16,22 (got {text!r})") from e


def _run_or_demo(args) -> int:
    from . import config as cfgmod
    from .report import write_report
    from .run import execute

    if args.cmd == "run":
        cfg = cfgmod.load(args.config)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    else:
        user: dict = {"preset": "demo", "behaviour": {"name": args.behaviour}}
        if args.pairs is not None:
            user["data"] = {"max_pairs": args.pairs}
        if args.layers:
            user["sae"] = {"layers": _layer_list(args.layers)}
        if args.mode:
            user["run"] = {"mode": args.mode}
        if args.finetune:
            from ..train.demo import DEMO_FINETUNE

            user |= {k: dict(v) for k, v in DEMO_FINETUNE.items()}
            user["data"] = {**DEMO_FINETUNE.get("data", {}), **user.get("data", {})}
        cfg = cfgmod.resolve(user)
        default = "policytrace-demo" if args.behaviour == DEFAULT else f"policytrace-demo-{args.behaviour}"
        default += "-finetune" if args.finetune else ""
        out = Path(args.out or default)
    manifest = execute(cfg, _out_folder(out), progress=not args.quiet)
    if "rank" in manifest:  # a torchrun rank other than 0: rank 0 writes the report
        return 0
    if args.cmd == "demo" or not args.no_report:
        print(f"report: {write_report(out)}")
    return 0


def _dispatch(args) -> int:
    if args.cmd == "validate":
        from .validate import validate

        frame = validate(args.run_dir, args.subsets, args.alpha, args.seed, progress=not args.quiet,
                         baselines=not args.no_baselines, removal_k=args.removal_k, planted=args.planted,
                         removal_methods=args.removal_methods.split(",") if args.removal_methods else None,
                         compare=args.compare)
        print(frame)
        print(f"written: {Path(args.run_dir) / 'validation.parquet'}")
        return 0
    if args.cmd == "curate":
        from .curate import curate

        res = curate(args.run_dir, args.out, args.drop, args.threshold)
        for r in res.dropped.iter_rows(named=True):
            print(f"dropped {r['pair_id']} (suspicion {r['suspicion']:+.2f}): {r['suspicion_reason']}")
        print(f"kept {res.kept.height} pairs: {res.out}")
        return 0
    if args.cmd == "repair":
        return _repair(args)
    if args.cmd == "bins":
        return _bins(args)
    if args.cmd == "finetune":
        from ..train.finetuning import finetune_config
        from . import config as cfgmod

        res = finetune_config(cfgmod.load(args.config), _out_folder(Path(args.out)), progress=not args.quiet)
        print(f"fine-tuned model: {res.model_dir} ({res.steps} steps, final loss {res.final_loss:.4f})")
        return 0
    if args.cmd == "report":
        from .report import write_report

        print(f"report: {write_report(args.run_dir)}")
        return 0
    return _run_or_demo(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except PolicytraceError as e:
        print(f"policytrace: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
