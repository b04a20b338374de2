"""Command line: ``policytrace run CONFIG.toml``, ``demo``, ``report RUN_DIR``, ``validate RUN_DIR``
(also ``python -m policytrace ...``). Every error the package raises is printed as one line
saying what is wrong and what to do, with exit status 2."""

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
    val.add_argument("--quiet", action="store_true")
    return ap


def _out_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is an existing file; name a folder (new or a run folder to resume)")
    return path


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
                         removal_methods=args.removal_methods.split(",") if args.removal_methods else None)
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
    if args.cmd == "finetune":
        from ..train.finetune import finetune_config
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
