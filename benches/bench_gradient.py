"""Gradient mode against the engine on the embedded default (SmolLM2-135M-Instruct).

    python benches/bench_gradient.py [--pairs 24] [--features 4] [--dims 4,8,16,32,64] [--seeds 3] [--scale N] [--scale-only]

Per pair, interleaved in one process so both sides see the same machine load: the engine (one SGD
step, the probe pass, ΔX by the gated linearization, first-order decomposition) and gradient mode
with whole concept gradients (the pair's backward pass and C inner products). Reports:

* agreement (Spearman over pairs) of the pair score, dy_mean, the mediated change and the
  per-feature d_coef (the ``--features`` largest-|coef| features) between the two;
* the projection curve: the same outputs from per-module r x r projections (``--dims``), over
  ``--seeds`` seeds, against whole gradients (mean and spread over seeds);
* speed: the engine's seconds per pair, gradient mode's marginal seconds per pair and its
  one-time concept cost, the break-even number of pairs, and the same extrapolated to the
  paper's shape from the measured per-token costs (formula in the output);
* with ``--scale N``: a synthetic run of N pairs on a tiny model through the real pipeline
  (projected store), its peak RSS at N/10 and N pairs, and the store's bytes per pair.

Writes results/gradient.json and the table in README.md between <!-- gradient:begin/end -->.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy.stats import spearmanr

HERE = Path(__file__).parent

sys.path.insert(0, str(HERE))
from _common import cpu_name, write_readme_section  # noqa: E402
from policytrace.gradients.per_pair import direction_products, update_direction  # noqa: E402
from policytrace.gradients.projection import Factored, Whole  # noqa: E402
from policytrace.numeric import Attributor  # noqa: E402
from policytrace.numeric.concepts import concepts  # noqa: E402
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.pipeline.modes.gradient import state_concept_gradients  # noqa: E402
from policytrace.pipeline.stages import prepare  # noqa: E402


def unflatten(vec: torch.Tensor, shapes: dict) -> dict:
    out, i = {}, 0
    for n, s in shapes.items():
        k = int(np.prod(s))
        out[n] = vec[i : i + k].reshape(s)
        i += k
    return out


def agreement(state, n_pairs: int, n_feat: int, dims: list[int], seeds: int) -> dict:
    pol = state.policy
    top = np.argsort(-np.abs(pol.coef))[:n_feat]
    cs = [c for c in concepts(pol, state.features.X, state.base.y0, state.inputs.flag, per_feature=True)
          if c.name in ("score_x", "score_y", "dy_mean", "mediated_dy")
          or c.name.split(":")[-1] in {str(int(pol.feature_ids[j])) for j in top}]
    engine = state.model.engine
    shapes = {n: engine.base[n].shape for n in engine.trainable}
    whole = Whole(shapes)
    t = time.perf_counter()
    cg = state_concept_gradients(state, cs, whole, progress=True)
    concept_s = time.perf_counter() - t
    projs = {(r, s): Factored(shapes, r, s) for r in dims for s in range(seeds)}
    proj_cg = {k: torch.stack([p(unflatten(cg[c], shapes)) for c in range(len(cs))]) for k, p in projs.items()}
    names = [c.name for c in cs]
    grad, proj = [], {k: [] for k in projs}
    eng_s = grad_s = 0.0
    dXs, dys = [], []
    rows = state.inputs.pairs.head(n_pairs)
    for r in rows.iter_rows(named=True):
        t = time.perf_counter()
        d = state.delta(engine.update(r["prompt"], r["response"], r["id"]), r["id"])
        eng_s += time.perf_counter() - t
        dXs.append(d.dX)
        dys.append(d.dy)
        t = time.perf_counter()  # the pipeline's whole-gradient path: one backward, C block-wise products
        grad.append(direction_products(engine, cg, r["prompt"], r["response"], r["id"]).numpy())
        grad_s += time.perf_counter() - t
        step = update_direction(engine, r["prompt"], r["response"], r["id"])  # for the projections, untimed
        for k, p in projs.items():
            proj[k].append((proj_cg[k] @ p(step)).double().numpy())
        print(f"pair {len(grad)}/{n_pairs}: engine {eng_s / len(grad):.2f} s, gradient {grad_s / len(grad):.2f} s", flush=True)
    att = Attributor(pol, state.features.X, state.base.y0, method="first_order", keep=True)
    att.add(dXs, np.stack(dys), pair_ids=rows["id"].to_list())
    pe, pf = att.pairs(), att.pair_features()
    G = np.stack(grad)
    col = {n: G[:, i] for i, n in enumerate(names)}

    def outs(values: dict) -> dict:
        o = {"score": values["score_x"] + values["score_y"], "dy_mean": values["dy_mean"],
             "mediated_dy": values["mediated_dy"]}
        fids = [int(pol.feature_ids[j]) for j in top]
        o["d_coef"] = np.concatenate([values[f"d_coef_x:{f}"] + values[f"d_coef_y:{f}"] for f in fids])
        return o

    g_out = outs(col)
    e_d = np.concatenate([pf.filter(pl.col("feature_id") == int(pol.feature_ids[j]))["d_coef"].to_numpy() for j in top])
    e_out = {"score": pe["score"].to_numpy(), "dy_mean": pe["dy_mean"].to_numpy(),
             "mediated_dy": pe["pred_dy_mean"].to_numpy(), "d_coef": e_d}
    res = {"n_pairs": n_pairs, "n_concepts": len(cs), "params": whole.dim,
           "spearman_gradient_vs_engine": {k: float(spearmanr(g_out[k], e_out[k])[0]) for k in g_out},
           "seconds": {"engine_per_pair": eng_s / n_pairs, "gradient_per_pair": grad_s / n_pairs,
                       "gradient_concepts_once": concept_s}}
    curve = {}
    for r in dims:
        per_seed = []
        for s in range(seeds):
            P = np.stack(proj[(r, s)])
            p_out = outs({n: P[:, i] for i, n in enumerate(names)})
            per_seed.append({k: float(spearmanr(p_out[k], g_out[k])[0]) for k in p_out})
        curve[r] = {k: {"mean": float(np.mean([x[k] for x in per_seed])), "std": float(np.std([x[k] for x in per_seed]))}
                    for k in per_seed[0]} | {"dim": projs[(r, 0)].dim}
    res["projection_vs_whole"] = curve
    sec = res["seconds"]
    res["break_even_pairs"] = sec["gradient_concepts_once"] / max(sec["engine_per_pair"] - sec["gradient_per_pair"], 1e-9)
    res["marginal_speedup"] = sec["engine_per_pair"] / sec["gradient_per_pair"]
    return res | extrapolate(state, rows, res)


def extrapolate(state, rows, res) -> dict:
    """The token counts measured here, then :func:`paper_shape`."""
    tok = state.model.lm.tokenizer
    from policytrace.model.chat import pair_tokens

    t_pair = float(np.mean([len(pair_tokens(tok, r["prompt"], r["response"], r["id"], 4096)[0]) for r in rows.iter_rows(named=True)]))
    t_probes = float(sum(len(p) for p in state.model.probe_tokens))
    res = res | {"per_token": {"measured_pair_tokens": t_pair, "measured_probe_tokens": t_probes}}
    return {"per_token": res["per_token"]} | paper_shape(res)


PAPER = {"params": 3.21e9, "probe_tokens": 7826 * 40, "pair_tokens": 150}


def paper_shape(res: dict) -> dict:
    """Per-token costs measured here, carried to the paper's shape (3.2B parameters, 7,826 probes
    of ~40 tokens, pairs of ~150 tokens). With N parameters, T tokens:
    u = gradient mode's seconds per pair / (N·T_pair)  (the pair's forward + backward, with its
        per-parameter overheads: gradient buffers, the C block products);
    f = (engine − gradient mode) seconds per pair / (N·T_probes)  (the probe pass's forward);
    k = concept seconds / (C·N·T_probes)  (one concept's backward share over the probes).
    engine ≈ u·N·T_pair + f·N·T_probes; gradient ≈ u·N·T_pair; concepts once ≈ k·C·N·T_probes."""
    n, s, pt, c = res["params"], res["seconds"], res["per_token"], res["n_concepts"]
    u = s["gradient_per_pair"] / (n * pt["measured_pair_tokens"])
    f = max((s["engine_per_pair"] - s["gradient_per_pair"]) / (n * pt["measured_probe_tokens"]), 1e-30)
    k = s["gradient_concepts_once"] / (c * n * pt["measured_probe_tokens"])
    shape = PAPER | {"concepts": c}
    eng = u * PAPER["params"] * PAPER["pair_tokens"] + f * PAPER["params"] * PAPER["probe_tokens"]
    grad = u * PAPER["params"] * PAPER["pair_tokens"]
    once = k * c * PAPER["params"] * PAPER["probe_tokens"]
    return {"per_token": pt | {"update_s_per_param_token": u, "forward_s_per_param_token": f,
                               "concept_s_per_concept_param_token": k},
            "paper_shape_extrapolated": {"shape": shape, "engine_s_per_pair": eng, "gradient_s_per_pair": grad,
                                         "gradient_concepts_once_s": once, "break_even_pairs": once / max(eng - grad, 1e-9)}}


def scale_run(n: int, out: Path) -> dict:
    """N synthetic pairs on a tiny model through the real pipeline (projected store)."""
    code = f"""
import sys, json, resource, time
sys.path.insert(0, {str(HERE.parent / 'tests')!r})
from pathlib import Path
from _tiny import tiny_config, write_tiny_data, write_tiny_model
from policytrace.pipeline import config as cfgmod
from policytrace.pipeline.run import execute
import torch; torch.set_num_threads(1)
root = Path({str(out)!r}); root.mkdir(parents=True, exist_ok=True)
m = write_tiny_model(root / "model"); p, q = write_tiny_data(root)
rows = [json.loads(l) for l in q.read_text().splitlines()]
with open(root / "many.jsonl", "w") as fh:
    for i in range({n}):
        r = dict(rows[i % len(rows)]); r["id"] = f"pair-{{i:07d}}"
        r["prompt"] = r["prompt"] + " please" * (i % 7) + " " + str(i % 10)
        fh.write(json.dumps(r) + "\\n")
cfg = cfgmod.resolve(tiny_config(m, p, root / "many.jsonl", root / "cache", run={{"mode": "gradient", "pair_batch": 2000}},
                                 gradient={{"projection_dim": 8}}))
t = time.perf_counter()
execute(cfg, root / "run", log=lambda s: None, progress=False)
store = next((root / "cache" / "gradients").iterdir())
size = sum(f.stat().st_size for f in store.glob("pairs-*.npy"))
print(json.dumps({{"pairs": {n}, "seconds": time.perf_counter() - t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "store_bytes_per_pair": size / {n}}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scale_runs(n: int) -> list[dict]:
    """N/10 and N pairs: flat memory shows as the same peak RSS for both."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pt-scale-") as tmp:
        return [scale_run(max(n // 10, 1), Path(tmp) / "small"), scale_run(n, Path(tmp) / "large")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--features", type=int, default=4)
    ap.add_argument("--dims", default="4,8,16,32,64")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=0, help="also a synthetic gradient-mode run of this many pairs")
    ap.add_argument("--out", default=str(HERE / "results" / "gradient.json"))
    ap.add_argument("--scale-only", action="store_true",
                    help="only the --scale runs, added to the results already in --out")
    args = ap.parse_args()
    if args.scale_only:
        res = json.loads(Path(args.out).read_text())
        res |= paper_shape(res)  # the current formula, from the stored measurements
        if args.scale:
            res["scale"] = scale_runs(args.scale)
            res["scale_timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res.get("scale"), indent=1))
        write_readme(res)
        return
    cfg = cfgmod.resolve({"preset": "demo", "data": {"max_pairs": args.pairs},
                          "decompose": {"method": "first_order", "delta_x": "gated"}})
    state = prepare(cfg, print, progress=True)
    res = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "python": platform.python_version()}, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    res |= agreement(state, args.pairs, args.features, [int(d) for d in args.dims.split(",")], args.seeds)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.scale:
        res["scale"] = scale_runs(args.scale)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    write_readme(res)


def jobs(pe: dict) -> str:
    """The paper's job (200 pairs) and a 100k-pair SFT set at the paper's shape, both modes."""
    def hours(n: int, mode: str) -> float:
        if mode == "engine":
            return n * pe["engine_s_per_pair"] / 3600
        return (pe["gradient_concepts_once_s"] + n * pe["gradient_s_per_pair"]) / 3600
    return "; ".join(f"{n:,} pairs: engine {hours(n, 'engine'):,.0f} h, gradient mode {hours(n, 'gradient'):,.1f} h"
                     for n in (200, 100_000)) + " (same CPU; divide by the GPU's speed-up for either)."


def write_readme(r: dict) -> None:
    sp, s = r["spearman_gradient_vs_engine"], r["seconds"]
    curve = "\n".join(
        f"| {d} | {c['dim']:,} | " + " | ".join(f"{c[k]['mean']:.3f} ± {c[k]['std']:.3f}" for k in ("score", "dy_mean", "mediated_dy", "d_coef")) + " |"
        for d, c in r["projection_vs_whole"].items())
    pe = r["paper_shape_extrapolated"]
    scale = ""
    if "scale" in r:
        scale = "\n\nSynthetic scale runs (tiny model, one thread, projected store, r = 8; the RSS includes the merge's in-memory frames of all pairs): " + "; ".join(
            f"{x['pairs']:,} pairs in {x['seconds']:.0f} s ({1000 * x['seconds'] / x['pairs']:.1f} ms/pair), peak RSS {x['peak_rss_mib']:.0f} MiB, store {x['store_bytes_per_pair']:.0f} B/pair"
            for x in r["scale"]) + "."
    block = f"""<!-- gradient:begin -->
Run {r['timestamp']} on {r['machine']['cpu']}, {r['machine']['threads']} threads, torch {r['machine']['torch']}.
Embedded default, {r['n_pairs']} pairs, 160 probes, {r['n_concepts']} concepts (the pair score's two parts, dy_mean, the mediated change, d_coef_x/y of the top features), engine and gradient mode interleaved per pair.

| | engine (first order, gated ΔX) | gradient mode (whole gradients) |
|---|---|---|
| seconds per pair | {s['engine_per_pair']:.2f} | {s['gradient_per_pair']:.2f} ({r['marginal_speedup']:.1f}× less) |
| one-time cost | – | {s['gradient_concepts_once']:.0f} s (concept gradients) |
| break-even | | {r['break_even_pairs']:.0f} pairs |

Agreement with the engine (Spearman over pairs): score {sp['score']:.4f}, dy_mean {sp['dy_mean']:.4f}, mediated {sp['mediated_dy']:.4f}, per-feature d_coef {sp['d_coef']:.4f}.

Projected against whole gradients (Spearman, mean ± std over seeds):

| r | dimension | score | dy_mean | mediated | d_coef |
|---|---|---|---|---|---|
{curve}

At the paper's shape (3.2B parameters, 7,826 probes of ~40 tokens, pairs of ~150 tokens), from the per-token costs measured here (u, f, k: seconds per parameter-token of the pair's update, of the probe forward, and of one concept over the probes; engine ≈ u·N·T_pair + f·N·T_probes, gradient ≈ u·N·T_pair, concepts once ≈ k·C·N·T_probes): engine {pe['engine_s_per_pair']:.0f} s/pair, gradient mode {pe['gradient_s_per_pair']:.1f} s/pair plus {pe['gradient_concepts_once_s']:.0f} s once; break-even at {pe['break_even_pairs']:.0f} pairs (on this CPU; the ratios carry to a GPU, the seconds do not). {jobs(pe)}{scale}
<!-- gradient:end -->"""
    write_readme_section("gradient", block, "Gradient mode", "python benches/bench_gradient.py --pairs 240 --features 2 --dims 4,8,16,32 --seeds 3 --scale 100000")


if __name__ == "__main__":
    main()
