"""Repairs of a finished run against within-category random selections (docs/validation.md,
"Repairing the model").

For each method (retrain without, first-order removal of the recorded steps, unlearning) it
repairs the top fraction of the run's pairs by the tool's own ranking — ``dy_mean`` in the
direction the run says the fine-tune moved the behaviour (the sign of Σ dy_mean), so the
selection is the pairs predicted to have pushed it most — and the same method on ``--controls``
random selections of the same size drawn within the same categories. It prints one markdown row
per method (moved back, the controls' mean and band, the ratio, the kept-pair and held-out
losses before and after, seconds) and first-order removal against retraining (the share of the
retrain's change it recovers, its cost over the retrain's), and writes everything to ``--out``.

    python benches/bench_repair.py RUN_DIR [--fraction 0.1] [--controls 3] [--methods retrain,first-order,unlearn]

The script only measures and writes; it asserts nothing. Cost is what it is on this machine:
note the CPU and the load (``uptime``) beside any time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path


BEGIN, END = "<!-- repair:begin -->", "<!-- repair:end -->"


def _rows(out: dict) -> list[str]:
    rows = []
    for method, r in out["methods"].items():
        c = r["causal"]["probes"]
        band = c["controls"]
        ratio = "–" if c["ratio"] is None else f"{c['ratio']:.2f}"
        frac = "" if c["fraction"] is None else f" ({100 * c['fraction']:.0f} %)"
        rep = r["repaired"]
        extra = ""
        if method == "unlearn":
            extra = f"; {r['details']['steps_taken']} steps, {r['details']['stopped']}"
        rows.append(f"| {out.get('recipe', '?')} | {method} | {c['back']:+.4f}{frac} | {band.get('mean', float('nan')):+.4f} "
                    f"({band.get('min', float('nan')):+.4f} .. {band.get('max', float('nan')):+.4f}) | {ratio} | "
                    f"{rep['finetuned_kept_loss']:.4f} → {rep['kept_loss']:.4f} | {r['finetuned_heldout_loss']:.4f} → "
                    f"{rep['heldout_loss']:.4f} | {r['timings']['selected_s']:.1f} / "
                    f"{r['timings']['selected_with_measure_s']:.1f}{extra} |")
    return rows


HEADER = ("| recipe | method | moved back, top 10 % (share of the fine-tune's change) | random: mean (min .. max) | "
          "ratio | kept-pair loss | held-out loss | seconds: repair / with measuring |\n"
          "|---|---|---|---|---|---|---|---|")


def write_doc(paths: list[str], doc: Path, intro: str) -> None:
    outs = [json.loads(Path(p).read_text()) for p in paths]
    lines = [BEGIN, "## Repairing the model", "", intro.strip(), "", HEADER]
    for o in outs:
        lines += _rows(o)
    lines.append("")
    for o in outs:
        f = o.get("first_order_vs_retrain")
        if f:
            rec = "–" if f["recovered"] is None else f"{100 * f['recovered']:.0f} %"
            lines.append(f"* **First-order removal against retrain-without** ({o.get('recipe', '?')} recipe): it recovers "
                         f"{rec} of the retrain's move back; the subtraction costs {f['cost_subtraction_over_retrain']:.3f} "
                         f"of a retrain, {f['cost_with_recording_over_retrain']:.2f} with the recording refit "
                         f"({f['record_refit_s']:.0f} s) shared by the {f['selections_sharing_the_refit']} selections.")
    for o in outs:
        lines.append(f"* Machine: {o['cpu']}, OMP_NUM_THREADS={o['threads']}; load before / after: "
                     f"`{o['load_before']}` / `{o['load_after']}`.")
    lines.append(END)
    block = "\n".join(lines) + "\n"
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.write_text(text)
    print(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--doc-from", default=None, help="comma-separated bench JSONs: write docs/validation.md's repair "
                                                    "section from them (no measuring)")
    ap.add_argument("--doc", default=str(Path(__file__).parent.parent / "docs" / "validation.md"))
    ap.add_argument("--intro", default="", help="the section's first paragraph (a file or text)")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--controls", type=int, default=3)
    ap.add_argument("--methods", default="retrain,first-order,unlearn")
    ap.add_argument("--recipe", default="auto")
    ap.add_argument("--tag", default="", help="a prefix of the repairs' folder names (bench-TAG-method)")
    ap.add_argument("--unlearn-max-steps", type=int, default=6)
    ap.add_argument("--unlearn-monitor-pairs", type=int, default=16)
    ap.add_argument("--unlearn-lr", type=float, default=0.0)
    ap.add_argument("--unlearn-max-grad-norm", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="JSON of every figure (default RUN_DIR/repairs/bench.json)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.doc_from:
        intro = Path(args.intro).read_text() if args.intro and Path(args.intro).is_file() else args.intro
        write_doc(args.doc_from.split(","), Path(args.doc), intro)
        return
    if not args.run_dir:
        ap.error("give RUN_DIR (or --doc-from)")

    import polars as pl

    from policytrace.pipeline.repair import RepairCfg, UnlearnCfg, repair
    from policytrace.pipeline.validate import open_state

    def uptime() -> str:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    t0 = time.perf_counter()
    opened = open_state(args.run_dir, print)
    open_s = time.perf_counter() - t0
    pairs = pl.read_parquet(Path(args.run_dir) / "pairs.parquet")
    by = "dy_mean" if pairs["dy_mean"].sum() >= 0 else "-dy_mean"
    how = {"fraction": args.fraction, "by": by}
    ucfg = UnlearnCfg(lr=args.unlearn_lr, max_steps=args.unlearn_max_steps, monitor_pairs=args.unlearn_monitor_pairs,
                      max_grad_norm=args.unlearn_max_grad_norm)
    out: dict = {"run": str(args.run_dir), "selection": how, "controls": args.controls, "cpu": platform.processor()
                 or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS"), "open_s": open_s,
                 "load_before": uptime(), "methods": {}}
    for method in args.methods.split(","):
        t = time.perf_counter()
        doc = repair(args.run_dir, how, RepairCfg(method=method, controls=args.controls), ucfg,
                     name=f"bench-{args.tag + '-' if args.tag else ''}{method}", record_steps=method == "first-order", recipe=args.recipe,
                     progress=not args.quiet, opened=opened)
        timings = json.loads((Path(doc["folder"]) / "timings.json").read_text())
        out["methods"][method] = {"causal": doc["causal"], "repaired": {k: doc["repaired"][k] for k in (
            "kept_loss", "finetuned_kept_loss", "selected_loss", "finetuned_selected_loss", "heldout_loss")},
            "finetuned_heldout_loss": doc["finetuned"]["heldout_loss"], "selection": doc["selection"],
            "controls": [{"ids": c["ids"], "back": c["moved_back"], "kept_loss": c["kept_loss"],
                          "heldout_loss": c["heldout_loss"]} for c in doc["controls"]],
            "details": doc["repaired"]["details"], "timings": timings, "wall_s": time.perf_counter() - t,
            "load_after": uptime()}
    out["load_after"] = uptime()
    out["recipe"] = doc["recipe"]["kind"]
    m = out["methods"]
    print(f"\nselection: top {args.fraction:.0%} by {by}; {args.controls} within-category random controls; "
          f"recipe {doc['recipe']['kind']}\n")
    print("| method | moved back (top) | random: mean (min .. max) | ratio | kept-pair loss | held-out loss | "
          "seconds (repair / with measuring) |")
    print("|---|---|---|---|---|---|---|")
    for method, r in m.items():
        c = r["causal"]["probes"]
        band = c["controls"]
        ratio = "–" if c["ratio"] is None else f"{c['ratio']:.2f}"
        frac = "" if c["fraction"] is None else f" ({100 * c['fraction']:.0f} %)"
        rep = r["repaired"]
        print(f"| {method} | {c['back']:+.4f}{frac} | {band.get('mean', float('nan')):+.4f} "
              f"({band.get('min', float('nan')):+.4f} .. {band.get('max', float('nan')):+.4f}) | {ratio} | "
              f"{rep['finetuned_kept_loss']:.4f} → {rep['kept_loss']:.4f} | {r['finetuned_heldout_loss']:.4f} → "
              f"{rep['heldout_loss']:.4f} | {r['timings']['selected_s']:.1f} / "
              f"{r['timings']['selected_with_measure_s']:.1f} |")
    if "retrain" in m and "first-order" in m:
        rt, fo = m["retrain"]["causal"]["probes"], m["first-order"]["causal"]["probes"]
        t_rt = m["retrain"]["timings"]["selected_s"]
        t_fo = m["first-order"]["timings"]["selected_s"]
        refit = m["first-order"]["timings"]["finetune_s"]
        n_sel = 1 + args.controls
        out["first_order_vs_retrain"] = {
            "recovered": fo["back"] / rt["back"] if rt["back"] else None,
            "cost_subtraction_over_retrain": t_fo / t_rt,
            "cost_with_recording_over_retrain": (t_fo + refit / n_sel) / t_rt,
            "record_refit_s": refit, "selections_sharing_the_refit": n_sel}
        f = out["first_order_vs_retrain"]
        rec = "–" if f["recovered"] is None else f"{100 * f['recovered']:.0f} %"
        print(f"\nfirst-order removal recovers {rec} of retrain-without's move; its cost is "
              f"{f['cost_subtraction_over_retrain']:.4f} of a retrain for the subtraction alone and "
              f"{f['cost_with_recording_over_retrain']:.2f} with the recording refit shared by {n_sel} selections")
    print(f"\nload: {out['load_before']} / {out['load_after']}")
    path = Path(args.out) if args.out else Path(args.run_dir) / "repairs" / f"bench{'-' + args.tag if args.tag else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
