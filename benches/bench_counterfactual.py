"""Counterfactual pair values against a finished trajectory run's real subset retrains (issue
"Attribute the fine-tuning that was actually run"):

    python benches/bench_counterfactual.py RUN_DIR [--simulations 1024]

RUN_DIR is a validated trajectory run (``policytrace validate``, e.g. a bench_trajectory work
folder's ``trajectory-lr1e-05``). With the run's fine-tune and the ``dy_mean`` concept only, it
takes the concept gradients along the path and every pair's gradient at θ_0, simulates
``--simulations`` subset retrains with the recipe (:mod:`policytrace.train.counterfactual`), and
prints: the simulator's own Spearman against the validation's real halves (each half simulated
directly), and the LDS on those halves of the least-squares additive fit and of the Banzhaf
estimate from the first quarter, half and all of the simulations. It only measures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    import numpy as np

    from policytrace.numeric.metrics import lds, spearman
    from policytrace.pipeline.modes import gradient as gm
    from policytrace.pipeline.modes import trajectory as tm
    from policytrace.pipeline.validate import open_state, subset_masks
    from policytrace.train import counterfactual as cf
    from policytrace.train.trajectory import Replay, concept_gradients_at_points, flat, load_records, recorded_examples

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--simulations", type=int, default=1024)
    ap.add_argument("--subsets", type=int, default=20, help="the validation's subsets (its --subsets)")
    args = ap.parse_args(argv)
    run = args.run_dir
    _, manifest, state = open_state(run, print)
    folder = Path(manifest["stages"]["trajectory"]["finetune"])
    rec, exs = load_records(folder), recorded_examples(folder)
    model, pad = state.model.engine.model, state.model.lm.tokenizer.pad_token_id or 0
    cs = [c for c in gm.concept_list(state) if c.name == "dy_mean"]
    fn = tm.grads_fn(state, rec.names, rec.shapes, np.stack([c.cx for c in cs]), np.stack([c.cy for c in cs]), False)
    t = time.perf_counter()
    path = state.cfg.train.concept_path
    G = concept_gradients_at_points(Replay(model, rec, exs, pad), rec, fn, print, path)
    replay = Replay(model, rec, exs, pad)
    g = cf.pair_gradients(replay, rec)
    theta0 = flat(replay.base, rec.names).to(g.dtype)
    Gbar = cf.mean_path_gradient(rec, G, path)
    print(f"gradients: {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    sim = cf.Simulator(rec, exs, g, theta0)
    masks, phi = cf.simulated_subsets(sim, Gbar, args.simulations, state.cfg.train.seed)
    print(f"{args.simulations} simulations: {time.perf_counter() - t:.0f} s", flush=True)
    ids = state.inputs.pairs["id"].to_list()
    pos = np.array([rec.ids.index(p) for p in ids])
    halves = subset_masks(len(ids), args.subsets, 0.5, 0)
    measured = np.array(json.loads((run / "validation.json").read_text())["measured"]["behaviour"])
    direct = [float(Gbar[0].to(theta0.dtype) @ sim.displacement(pos[np.flatnonzero(m)])) for m in halves]
    out = {"direct_spearman": spearman(np.array(direct), measured), "by_simulations": {}}
    for n in (args.simulations // 4, args.simulations // 2, args.simulations):
        fit = cf.additive_fit(masks[:n], phi[:n])[:, 0][pos]
        ban = cf.banzhaf(masks[:n], phi[:n])[:, 0][pos]
        out["by_simulations"][n] = {"fit": lds(fit, halves, measured)["lds"], "banzhaf": lds(ban, halves, measured)["lds"]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
