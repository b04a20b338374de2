"""Gradient mode's batched pair side and hooked concept pass against the routes they replace, on
the embedded default (SmolLM2-135M-Instruct, float32), in one process:

    python benches/bench_batched.py [--pairs 48] [--concepts 8] [--budget 2048] [--r 16] [--old-pairs 4]

* the machine's float32 matmul rate (best of 3, 2048³ on the same threads): the roofline;
* pair side, per pair: the per-pair route (one ``torch.func.grad`` per pair, dense gradient, then C
  inner products or a projection) and the batched one (pairs packed under ``--budget`` tokens,
  one backward per batch, hooks), whole products with C concepts and r × r projections, SGD;
  their agreement; the FLOP floor ``6 · N_trainable · T_pair`` at the measured rate;
* the concept pass: C concepts by the autograd route (measured on ``--old-concepts`` of them and
  scaled, its cost being linear in the concepts) and by hooks (one forward per batch, the prefix
  shared); its floor, one forward plus C backwards over the probe tokens with the prefix shared;
* the engine's seconds per pair (update, probe pass, ΔX, Δy) for the marginal speed-up.

Writes results/batched.json and the README section between <!-- batched:begin/end -->.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import cpu_name, git_commit, write_readme_section  # noqa: E402
from policytrace.gradients.batched import Projections, TrainExample, WholeProducts, pack, per_example  # noqa: E402
from policytrace.gradients.concept import concept_gradients  # noqa: E402
from policytrace.gradients.concept_pass import ProbeSide, concept_rows  # noqa: E402
from policytrace.gradients.per_pair import direction_products, update_direction  # noqa: E402
from policytrace.gradients.projection import Factored, Whole  # noqa: E402
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.pipeline.modes.gradient import concept_list  # noqa: E402
from policytrace.pipeline.stages import prepare  # noqa: E402


def matmul_rate(threads: int, size: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * size**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def examples(engine, rows) -> list[TrainExample]:
    out = []
    for r in rows.iter_rows(named=True):
        ids, start = engine.tokens(r["prompt"], r["response"], r["id"])
        out.append(TrainExample.from_start(ids[0].tolist(), start))
    return out


def batched_side(model, engine, exs, sink_of, budget: int, pad_id: int) -> tuple[torch.Tensor, float, list]:
    batches = pack([len(e) for e in exs], budget)
    outs, t = [None] * len(exs), time.perf_counter()
    for idx in batches:
        sink = sink_of(len(idx))
        per_example(model, engine.trainable, sink, [exs[i] for i in idx], pad_id, "cpu")
        res = sink.result()
        for row, i in enumerate(idx):
            outs[i] = res[row]
    return torch.stack(outs), time.perf_counter() - t, [len(b) for b in batches]


def pair_side(state, cg: torch.Tensor, proj: Factored, n_pairs: int, n_old: int, budget: int) -> dict:
    engine, model = state.model.engine, state.model.lm.model
    rows = state.inputs.pairs.head(n_pairs)
    exs = examples(engine, rows)
    shapes = {n: tuple(engine.base[n].shape) for n in engine.trainable}
    pad = state.model.lm.tokenizer.pad_token_id
    lr = engine.cfg.lr
    whole, t_whole, sizes = batched_side(model, engine, exs, lambda b: WholeProducts(cg, engine.trainable, shapes, "sgd", lr, b),
                                         budget, pad)
    projd, t_proj, _ = batched_side(model, engine, exs, lambda b: Projections(proj, "sgd", lr, b, torch.float32, "cpu"),
                                    budget, pad)
    old = rows.head(n_old)
    t = time.perf_counter()
    ref_w = torch.stack([direction_products(engine, cg, r["prompt"], r["response"], r["id"]) for r in old.iter_rows(named=True)])
    t_old_w = (time.perf_counter() - t) / n_old
    t = time.perf_counter()
    ref_p = torch.stack([proj(update_direction(engine, r["prompt"], r["response"], r["id"])) for r in old.iter_rows(named=True)])
    t_old_p = (time.perf_counter() - t) / n_old
    tokens = float(np.mean([len(e) for e in exs]))
    # the outputs' ranking: every concept's product (score parts, dy_mean, d_coef rows are sums of
    # them) ranked over the pairs by both routes
    rho = [float(spearmanr(whole[:n_old, j].numpy(), ref_w[:, j].numpy()).statistic) for j in range(ref_w.shape[1])]
    return {"spearman_whole_per_concept_min": min(rho), "spearman_whole_per_concept": rho,
            "pairs": n_pairs, "mean_tokens": tokens, "budget": budget, "batch_sizes": sizes,
            "batched_whole_s_per_pair": t_whole / n_pairs, "batched_projected_s_per_pair": t_proj / n_pairs,
            "per_pair_whole_s_per_pair": t_old_w, "per_pair_projected_s_per_pair": t_old_p,
            "max_rel_diff_whole": float((whole[:n_old] - ref_w).abs().max() / ref_w.abs().max()),
            "max_rel_diff_projected": float((projd[:n_old] - ref_p).abs().max() / ref_p.abs().max())}


def probe_tokens_count(state) -> dict:
    toks = state.model.probe_tokens
    prefix = state.model.runner._common_prefix(toks, [len(t) - 1 for t in toks])
    return {"tokens": sum(len(t) for t in toks), "prefix": len(prefix), "probes": len(toks)}


def concept_floor(state, counts: dict, n_concepts: int, x_concepts: int, rate: float, batches: int) -> dict:
    """FLOPs of one forward and C backwards (activation gradients, plus forming Σ g aᵀ) over the
    probe tokens with the prefix run once per batch; x-concepts stop at the SAE's layer."""
    model = state.model.lm.model
    cfg = model.config
    per_layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
    n_layers, layer = cfg.num_hidden_layers, state.cfg.sae.layer
    tokens = counts["tokens"] - counts["probes"] * counts["prefix"] + batches * counts["prefix"]
    body = per_layer * n_layers
    head = 2 * cfg.vocab_size * cfg.hidden_size * counts["probes"] * 4  # first token + continuations, about
    fwd = 2 * body * tokens + head
    y_back = 4 * body * tokens + 2 * head
    x_back = 4 * per_layer * (layer + 1) * tokens
    flops = fwd + (n_concepts - x_concepts) * y_back + x_concepts * x_back
    return {"floor_flops": flops, "floor_s": flops / rate, "tokens_after_sharing": tokens}


def concept_pass(state, cs, n_old: int, budget: int, rate: float) -> tuple[dict, torch.Tensor]:
    m = state.model
    shapes = {n: tuple(m.engine.base[n].shape) for n in m.engine.trainable}
    whole = Whole(shapes)
    side = ProbeSide(m.runner, m.reader, m.probe_tokens, state.features.columns, state.features.gated)
    cx, cy = np.stack([c.cx for c in cs]), np.stack([c.cy for c in cs])
    t = time.perf_counter()
    new = concept_rows(m.lm.model, m.engine.trainable, side, cx, cy, whole, torch.float32, budget, progress=True)
    t_new = time.perf_counter() - t
    if n_old == 0:  # the hooked route alone (its agreement with autograd is a test: 3e-15 in float64)
        old, t_old, diff = None, None, None
    else:
        old, t_old, diff = _autograd_concepts(state, cs, n_old, whole, new)
    counts = probe_tokens_count(state)
    x_count = sum(1 for c in cs if not c.cy.any())
    n_batches = len(pack([len(t) for t in m.probe_tokens], budget))
    floor = concept_floor(state, counts, len(cs), x_count, rate, n_batches)
    return {"concepts": len(cs), "x_concepts": x_count, "hooks_s": t_new, "autograd_s_scaled": t_old,
            "autograd_measured_on": n_old, "max_rel_l2_diff": diff, "budget": budget, "batches": n_batches,
            **counts, **floor}, new


def _autograd_concepts(state, cs, n_old: int, whole, new) -> tuple:
    m = state.model
    t = time.perf_counter()
    old = concept_gradients(cs[:n_old], whole, engine=m.engine, runner=m.runner, reader=m.reader,
                            probe_tokens=m.probe_tokens, columns=state.features.columns, gated=state.features.gated,
                            progress=True)
    t_old = (time.perf_counter() - t) * len(cs) / n_old
    diff = float(((new[:n_old] - old).norm(dim=1) / old.norm(dim=1)).max())
    return old, t_old, diff


def engine_side(state, n: int) -> float:
    rows = state.inputs.pairs.head(n)
    t = time.perf_counter()
    for r in rows.iter_rows(named=True):
        state.delta(state.model.engine.update(r["prompt"], r["response"], r["id"]), r["id"])
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--old-pairs", type=int, default=4)
    ap.add_argument("--concepts", type=int, default=8)
    ap.add_argument("--old-concepts", type=int, default=2)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--concept-budget", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--engine-pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "batched.json")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--sae-path", default="", help="an SAE folder to use instead of the default one (sae.path)")
    ap.add_argument("--pairs-only", action="store_true",
                    help="skip the concept pass: the pair side's products with seeded random concept rows of the "
                         "same shape (its cost does not depend on their values; agreement is still checked)")
    ap.add_argument("--concepts-only", action="store_true",
                    help="only the concept pass against its floor (with --old-concepts 0: the hooked route alone); "
                         "writes results/batched-concepts.json and its own README section")
    args = ap.parse_args()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    cfg = cfgmod.resolve({"preset": "demo", "data": {"max_pairs": 0}, "run": {"mode": "gradient", "threads": args.threads}}
                         | ({"sae": {"path": args.sae_path}} if args.sae_path else {}))
    state = prepare(cfg, log=print, progress=True)
    rate = matmul_rate(args.threads)
    engine = state.model.engine
    shapes = {n: tuple(engine.base[n].shape) for n in engine.trainable}
    if args.pairs_only:
        cons = None
        cg = torch.randn(args.concepts, sum(math.prod(s) for s in shapes.values()),
                         generator=torch.Generator().manual_seed(0))
    else:
        cs = concept_list(state)[: args.concepts]
        cons, cg = concept_pass(state, cs, args.old_concepts, args.concept_budget, rate)
    if args.concepts_only:
        return concepts_only(args, state, cons, rate, load_start)
    pairs = pair_side(state, cg, Factored(shapes, args.r, 0), args.pairs, args.old_pairs, args.budget)
    n_train = sum(math.prod(s) for s in shapes.values())
    pairs["floor_s_per_pair"] = 6 * n_train * pairs["mean_tokens"] / rate
    eng = engine_side(state, args.engine_pairs)
    res = {"machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__},
           "commit": git_commit(), "old_pairs": args.old_pairs, "matmul_gflops": rate / 1e9, "n_trainable": n_train, "r": args.r,
           "pair_side": pairs, "concept_pass": cons, "engine_s_per_pair": eng,
           "marginal_speedup_whole": eng / pairs["batched_whole_s_per_pair"],
           "marginal_speedup_projected": eng / pairs["batched_projected_s_per_pair"],
           "load_average": {"start": load_start, "end": os.getloadavg()}}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if not args.no_readme:
        write_readme(res)


def concepts_only(args, state, cons: dict, rate: float, load_start) -> None:
    res = {"machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__},
           "commit": git_commit(), "matmul_gflops": rate / 1e9, "concept_pass": cons,
           "load_average": {"start": load_start, "end": os.getloadavg()}}
    out = args.out if args.out != HERE / "results" / "batched.json" else HERE / "results" / "batched-concepts.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if args.no_readme:
        return
    c = cons
    old = ("–" if c["autograd_s_scaled"] is None else f"{c['autograd_s_scaled']:.0f} (measured on {c['autograd_measured_on']})")
    block = "\n".join([
        "<!-- concept-pass:begin -->",
        f"{res['machine']['cpu']}, {args.threads} threads, torch {res['machine']['torch']}, commit `{res['commit']}`; "
        f"float32 matmul {res['matmul_gflops']:.0f} GFLOP/s measured in the run; {c['probes']} probes, {c['tokens']} tokens, "
        f"the chat prefix ({c['prefix']} tokens) run once per batch: {c['batches']} batches under a budget of "
        f"{c['budget']} tokens ({c['tokens_after_sharing']} tokens after sharing); {c['concepts']} concepts, "
        f"{c['x_concepts']} of them x-only (backpropagated to the SAE's layer only); load average "
        f"{load_start[0]:.1f} at the start, {res['load_average']['end'][0]:.1f} at the end.", "",
        "| what | autograd route | hooks, one forward per batch | floor (1 forward + C backwards) | hooks ÷ floor |",
        "|---|---|---|---|---|",
        f"| concept pass, {c['concepts']} concepts, s | {old} | {c['hooks_s']:.1f} | {c['floor_s']:.1f} | "
        f"{c['hooks_s'] / c['floor_s']:.2f} |", "<!-- concept-pass:end -->"])
    write_readme_section("concept-pass", block, "Gradient mode's concept pass against its floor",
                         "python benches/bench_batched.py --concepts-only --old-concepts 0")


def write_readme(r: dict) -> None:
    p, c = r["pair_side"], r["concept_pass"] or {}
    floor = p["floor_s_per_pair"]
    rows = [
        "| what | per-pair route | batched / hooks | floor | batched ÷ floor |", "|---|---|---|---|---|",
        f"| pair side, whole products (C = {len(p['spearman_whole_per_concept'])}), s/pair | {p['per_pair_whole_s_per_pair']:.3f} | "
        f"{p['batched_whole_s_per_pair']:.3f} | {floor:.3f} | {p['batched_whole_s_per_pair'] / floor:.2f} |",
        f"| pair side, projected r = {r['r']}, s/pair | {p['per_pair_projected_s_per_pair']:.3f} | "
        f"{p['batched_projected_s_per_pair']:.3f} | {floor:.3f} | {p['batched_projected_s_per_pair'] / floor:.2f} |",
    ]
    if c:
        rows.append(f"| concept pass, {c['concepts']} concepts, s | {c['autograd_s_scaled']:.0f} (measured on "
                    f"{c['autograd_measured_on']}) | {c['hooks_s']:.1f} | {c['floor_s']:.1f} | {c['hooks_s'] / c['floor_s']:.2f} |")
    probes = (f"; {c['probes']} probes, {c['tokens']} tokens, prefix {c['prefix']} shared in {c['batches']} batches"
              if c else "; concept pass not run (--pairs-only: seeded random concept rows)")
    concept_agreement = f"; concept rows {c['max_rel_l2_diff']:.1e} (relative L2)" if c else ""
    block = "\n".join([
        "<!-- batched:begin -->",
        f"{r['machine']['cpu']}, {r['machine']['threads']} threads, torch {r['machine']['torch']}, commit `{r['commit']}`; "
        f"float32 matmul {r['matmul_gflops']:.0f} GFLOP/s; {r['n_trainable'] / 1e6:.1f}M trainable parameters; "
        f"{p['pairs']} pairs of {p['mean_tokens']:.0f} tokens on average, token budget {p['budget']} "
        f"(batches of {min(p['batch_sizes'])}–{max(p['batch_sizes'])}){probes}; load average "
        f"{r['load_average']['start'][0]:.1f} at the start, {r['load_average']['end'][0]:.1f} at the end.", "", *rows, "",
        f"Engine {r['engine_s_per_pair']:.2f} s/pair: marginal speed-up {r['marginal_speedup_whole']:.1f}× (whole), "
        f"{r['marginal_speedup_projected']:.1f}× (projected). Agreement with the per-pair route: max relative difference "
        f"{p['max_rel_diff_whole']:.1e} (whole), {p['max_rel_diff_projected']:.1e} (projected){concept_agreement}; "
        f"over the {r['old_pairs']} "
        f"pairs of the per-pair route, every concept's products rank the pairs alike (Spearman ≥ "
        f"{p['spearman_whole_per_concept_min']:.4f}).", "<!-- batched:end -->"])
    write_readme_section("batched", block, "Gradient mode's batched pair side and concept pass",
                         "python benches/bench_batched.py")


if __name__ == "__main__":
    main()
