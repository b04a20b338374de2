"""How much of one SGD step survives rounding into the stored weights, per dtype, on the embedded
default (SmolLM2-135M-Instruct), and how far a probe pass's Δy in that dtype is from float32's.

    python benches/bench_precision.py [--pairs 4] [--lr 1e-4]

Writes results/precision.json and the table in README.md between <!-- precision:begin/end -->.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import cpu_name, write_readme_section
from policytrace.model.chat import encode_prompts
from policytrace.model.config import UpdateCfg
from policytrace.model.loading import load_model
from policytrace.model.probe import ProbeRunner, TargetSet
from policytrace.model.update import UpdateEngine
from policytrace.pipeline.data import load_dataset

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--probes", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    ds = load_dataset()
    pairs = [ds.pairs.row(i, named=True) for i in np.linspace(0, ds.pairs.height - 1, args.pairs).astype(int)]
    res = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}, "lr": args.lr,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "dtypes": {}}
    dys = {}
    for dtype in ("float32", "bfloat16", "float16"):
        lm = load_model(dtype=dtype)
        ids = encode_prompts(lm.tokenizer, ds.probes["prompt"].to_list()[: args.probes],
                             ds.probes["id"].to_list()[: args.probes], 512)
        runner = ProbeRunner(lm.model, lm.tokenizer, 10, TargetSet.from_strings(lm.tokenizer, ["I can't", "I'm sorry", "I cannot"]))
        engine = UpdateEngine(lm.model, lm.tokenizer, UpdateCfg(lr=args.lr, min_update_share=0.0))
        _, y0 = runner.run(ids)
        shares, dy = [], []
        for p in pairs:
            new = engine.update(p["prompt"], p["response"], p["id"])
            shares.append(getattr(engine, "last_survival", 1.0))
            dy.append(runner.run(ids, params=new)[1] - y0)
        dys[dtype] = np.stack(dy)
        res["dtypes"][dtype] = {"update_surviving_mean": float(np.mean(shares)), "update_surviving_min": float(np.min(shares))}
        del lm, runner, engine
    ref = dys["float32"]
    for dtype in ("bfloat16", "float16"):
        d = dys[dtype]
        res["dtypes"][dtype]["dy_rel_error_vs_float32"] = float(np.abs(d - ref).max() / np.abs(ref).max())
        res["dtypes"][dtype]["dy_corr_vs_float32"] = float(np.corrcoef(d.ravel(), ref.ravel())[0, 1])
    out = HERE / "results" / "precision.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    rows = "\n".join(f"| {k} | {v['update_surviving_mean']:.2f} (min {v['update_surviving_min']:.2f}) | "
                     f"{v.get('dy_rel_error_vs_float32', 0):.2f} | {v.get('dy_corr_vs_float32', 1):.2f} |"
                     for k, v in res["dtypes"].items())
    block = f"""<!-- precision:begin -->
Run {res['timestamp']} on {res['machine']['cpu']}, embedded default, {args.pairs} pairs, {args.probes} probes, one SGD step at lr {args.lr:g}.

| weights | share of the step surviving rounding | Δy: max error over the largest Δy, against float32 | Δy: correlation with float32 |
|---|---|---|---|
{rows}
<!-- precision:end -->"""
    write_readme_section("precision", block, "Precision", "python benches/bench_precision.py")


if __name__ == "__main__":
    main()
