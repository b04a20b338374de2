"""Engine benchmark on the embedded default (SmolLM2-135M-Instruct): policytrace's per-pair
engine against a faithful re-implementation of the SMDA release's per-pair loop.

The paper loop, per pair: snapshot every weight on the CPU, one in-place SGD step (full
parameters, response-only loss), then re-run the evaluation prompts with one forward for the
residuals and one forward per target sequence (prompt + target appended, full-vocabulary
logits at every position), then restore the snapshot. policytrace: functional update (no
snapshot), one probe pass per pair with the chat template's shared prefix run once, targets
scored from the prompt's KV cache, vocabulary logits only where needed.

Both sides get the same probes, pairs, layer and targets, and their Δy and ΔH are compared
(max abs difference; target 1e-4). Writes results/engine.json and a section of README.md.

    python benches/bench_engine.py [--pairs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from _common import cpu_name, git_commit, write_readme_section
from policytrace.model.chat import encode_prompts, pair_tokens
from policytrace.model.loading import load_model
from policytrace.model.probe import ProbeRunner, TargetSet
from policytrace.model.sites import capture_block_output
from policytrace.model.update import UpdateEngine
from policytrace.pipeline.data import load_dataset

HERE = Path(__file__).parent
LAYER = 10
TARGETS = ["I can't", "I'm sorry", "I cannot"]


def paper_pair(model, tok, prompt_ids, pair, targets, lr, batch_size):
    """One pair of the SMDA release's loop; returns (H, y) after the update. Restores weights."""
    params = dict(model.named_parameters())
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    full, start = pair_tokens(tok, pair["prompt"], pair["response"], pair["id"], 512)
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, :start] = -100
    out = model(ids, labels=labels)
    out.loss.backward()
    with torch.no_grad():
        for p in params.values():
            p -= lr * p.grad
            p.grad = None
    H, y = paper_probe_pass(model, tok, prompt_ids, targets, batch_size)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
            p.requires_grad_(False)
    return H, y


def paper_probe_pass(model, tok, prompt_ids, targets, batch_size):
    n = len(prompt_ids)
    H = np.zeros((n, model.config.hidden_size), dtype=np.float32)
    seq_lp = np.zeros((n, len(targets)))
    with torch.no_grad():
        for s0 in range(0, n, batch_size):
            batch = prompt_ids[s0 : s0 + batch_size]
            # residual forward
            ids, mask, pos = _left_pad(batch, tok.pad_token_id)
            with capture_block_output(model, LAYER) as store:
                model(input_ids=ids, attention_mask=mask, position_ids=pos)
            H[s0 : s0 + len(batch)] = store["h"][:, -1].float().numpy()
            # one forward per target sequence, full-vocabulary logits at every position
            for j, t in enumerate(targets):
                seqs = [b + list(t) for b in batch]
                ids, mask, pos = _left_pad(seqs, tok.pad_token_id)
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double(), -1)
                T = ids.shape[1]
                for r in range(len(batch)):
                    seq_lp[s0 + r, j] = sum(logp[r, T - len(t) - 1 + i, t[i]].item() for i in range(len(t)))
    y = np.log(np.exp(seq_lp - seq_lp.max(1, keepdims=True)).sum(1)) + seq_lp.max(1)
    return H, y


def _left_pad(seqs, pad):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, T - len(s) :] = torch.tensor(s)
        mask[r, T - len(s) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def model_flops(model, n_tokens_fwd: int, n_head_positions: int, n_tokens_update: int) -> float:
    """2·params·tokens for forward passes (vocabulary projection counted where computed),
    3× that for the update's forward + backward."""
    emb = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - emb
    head = emb  # tied: the projection has the embedding's size
    return 2.0 * body * n_tokens_fwd + 2.0 * head * n_head_positions + 3 * 2.0 * (body + head) * n_tokens_update


def matmul_peak(threads: int) -> float:
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    a @ b
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "results" / "engine.json"))
    ap.add_argument("--readme-from", help="only rewrite the README section from this results JSON")
    args = ap.parse_args()
    if args.readme_from:
        _write_readme(json.loads(Path(args.readme_from).read_text()))
        return
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)
    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    ds = load_dataset()
    probes = ds.probes
    pairs = [ds.pairs.row(i, named=True) for i in np.linspace(0, ds.pairs.height - 1, args.pairs).astype(int)]
    prompt_ids = encode_prompts(tok, probes["prompt"].to_list(), probes["id"].to_list(), 512)
    ts = TargetSet.from_strings(tok, TARGETS)
    runner = ProbeRunner(model, tok, LAYER, ts, "last", batch_size=args.batch_size)
    engine = UpdateEngine(model, tok)
    H0, y0 = runner.run(prompt_ids)
    H0p, y0p = paper_probe_pass(model, tok, prompt_ids, ts.targets, args.batch_size)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    ours = []
    for pr in pairs:
        H1, y1 = runner.run(prompt_ids, params=engine.update(pr["prompt"], pr["response"], pr["id"]))
        ours.append((H1 - H0, y1 - y0))
    t_ours = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    theirs = []
    for pr in pairs:
        H1, y1 = paper_pair(model, tok, prompt_ids, pr, ts.targets, 1e-4, args.batch_size)
        theirs.append((H1 - H0p, y1 - y0p))
    t_paper = time.perf_counter() - t
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dy_diff = max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(ours, theirs))
    dh_diff = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(ours, theirs))

    # model FLOPs of one pair for each side
    lens = [len(p) for p in prompt_ids]
    prefix = len(runner._common_prefix(prompt_ids, [l - 1 for l in lens]))
    n_upd = np.mean([len(pair_tokens(tok, p["prompt"], p["response"], p["id"], 512)[0]) for p in pairs])
    # per probe: continuation tokens (one row per distinct continuation input, probe.py) and
    # vocabulary projections (the first token, then one per continuation token read)
    plan = ts.continuation
    cont, reads = sum(len(r) for r in plan.rows), len(plan.reads)
    f_ours = model_flops(model, prefix + sum(l - prefix for l in lens) + len(lens) * cont,
                         len(lens) * (1 + reads), n_upd)
    f_paper = model_flops(model, sum(lens) * (1 + len(ts.targets)) + len(lens) * sum(len(t) for t in ts.targets),
                          sum(lens) * len(ts.targets) + len(lens) * sum(len(t) for t in ts.targets), n_upd)
    res = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "commit": git_commit()},
        "model": lm.name, "n_probes": len(prompt_ids), "n_pairs": len(pairs), "layer": LAYER, "targets": TARGETS,
        "seconds_per_pair": {"policytrace": t_ours / len(pairs), "paper_loop": t_paper / len(pairs)},
        "pairs_per_minute": {"policytrace": 60 * len(pairs) / t_ours, "paper_loop": 60 * len(pairs) / t_paper},
        "speedup": t_paper / t_ours,
        "max_abs_diff": {"dy": dy_diff, "dH": dh_diff},
        "peak_rss_increase_mib": {"policytrace": (rss1 - rss0) / 1024, "paper_loop_additional": (rss2 - rss1) / 1024},
        "model_gflop_per_pair": {"policytrace": f_ours / 1e9, "paper_loop": f_paper / 1e9},
        "achieved_gflops": {"policytrace": f_ours / 1e9 / (t_ours / len(pairs)), "paper_loop": f_paper / 1e9 / (t_paper / len(pairs))},
        "matmul_peak_gflops": peak,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    _write_readme(res)


def _write_readme(r: dict) -> None:
    s, p = r["seconds_per_pair"], r["pairs_per_minute"]
    block = f"""<!-- engine:begin -->
Run {r['timestamp']} on {r['machine']['cpu']}, {r['machine']['threads']} threads, torch {r['machine']['torch']}, commit `{r['machine']['commit']}`.
Embedded default ({r['model']}), {r['n_probes']} probes, {r['n_pairs']} pairs, layer {r['layer']}, targets {', '.join(r['targets'])}.

| side | s / pair | pairs / min | model GFLOP / pair | achieved GFLOP/s | % of float32 matmul peak ({r['matmul_peak_gflops']:.0f} GFLOP/s, torch 2048²) |
|---|---|---|---|---|---|
| policytrace engine | {s['policytrace']:.2f} | {p['policytrace']:.1f} | {r['model_gflop_per_pair']['policytrace']:.0f} | {r['achieved_gflops']['policytrace']:.1f} | {100 * r['achieved_gflops']['policytrace'] / r['matmul_peak_gflops']:.0f}% |
| paper loop (re-implemented) | {s['paper_loop']:.2f} | {p['paper_loop']:.1f} | {r['model_gflop_per_pair']['paper_loop']:.0f} | {r['achieved_gflops']['paper_loop']:.1f} | {100 * r['achieved_gflops']['paper_loop'] / r['matmul_peak_gflops']:.0f}% |

Speed-up **{r['speedup']:.1f}×** (target 3×). Same outputs: max |Δy| difference {r['max_abs_diff']['dy']:.1e}, max |ΔH| difference {r['max_abs_diff']['dH']:.1e} (float32).
Peak RSS (high-water mark, after both base probe passes): policytrace's pairs raised it by {r['peak_rss_increase_mib']['policytrace']:.0f} MiB; the paper loop then raised it by {r['peak_rss_increase_mib']['paper_loop_additional']:.0f} MiB more (its weight snapshot and in-place gradients). Both sides run the model at about the same FLOP rate: the speed-up is less work (prefix shared, targets from the KV cache, vocabulary logits only where needed), not faster kernels.
<!-- engine:end -->"""
    write_readme_section("engine", block, "Engine (model side)", "python benches/bench_engine.py --pairs 3")


if __name__ == "__main__":
    main()
