"""The prepared GPU check: one command, at most ~8 minutes on one CUDA GPU.

    python benches/gpu_check.py                 # on a CUDA machine: the full check
    python benches/gpu_check.py --small         # anywhere (CPU in CI): the same code at toy sizes

(a) **CUDA against CPU** on a tiny random Llama (float64): the probe pass and one update give the
    same H, y, ΔH and Δy on both devices (max relative difference reported).
(b) **Timings at the paper's shape** on a randomly initialised model of Llama-3.2-3B's shape
    (28 layers, hidden 3072, MLP 8192, 24 heads / 8 KV heads, vocabulary 128,256; cost does not
    depend on the weights, so nothing is downloaded): a probe set of ~2,000 prompts of ~40
    tokens and 16 pairs, in bfloat16 and float32: the engine's seconds per pair (one update +
    one probe pass), probe tokens/s, and the share of the update that survives rounding.
    Gradient mode on the same model and probes: the concept gradients' pass (whole gradients,
    ``--concepts``) and seconds per pair (one backward and C block-wise products).
(c) **Context**: peak GPU memory, and the bf16 / fp32 matmul peak measured in the same run, with
    the fraction of it the probe pass reaches (model FLOPs = 2 · parameters · tokens).

Writes JSON (``--out``, default ``benches/results/gpu_check.json``) and, for a full run, the table
in ``benches/README.md`` between ``<!-- gpu:begin -->`` and ``<!-- gpu:end -->``. Needs torch,
transformers, numpy and polars (``pip install polars`` or a carried wheel), not sae-lens.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny model and tokenizer of the tests
sys.path.insert(0, str(HERE))

from _common import write_readme_section  # noqa: E402
from _tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402

from policytrace.model.chat import encode_prompts  # noqa: E402
from policytrace.model.config import UpdateCfg  # noqa: E402
from policytrace.model.probe import ProbeRunner, TargetSet  # noqa: E402
from policytrace.model.update import UpdateEngine  # noqa: E402

LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=True)
PAIR = ("write insult about group please", "i can't help with that")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12  # TFLOP/s


def probes(tok, n: int, words: int) -> list[list[int]]:
    """n chat-formatted prompts of about `words` tokens from the tiny tokenizer's vocabulary."""
    vocab = "how do bake bread write insult about group tell me story explain history of holiday".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(vocab, words)) for _ in range(n)]
    return encode_prompts(tok, texts, [str(i) for i in range(n)], 4 * words + 64)


def cuda_against_cpu() -> dict:
    """The tiny float64 model on CPU and on CUDA: probe pass and one update."""
    tok = tiny_tokenizer()
    ids = probes(tok, 16, 12)
    ts = TargetSet.from_strings(tok, ["i can't", "sorry"])
    out = {}
    for device in ("cpu", "cuda"):
        m = tiny_causal_lm("llama", len(tok)).double().to(device)
        for p in m.parameters():
            p.requires_grad_(False)
        runner = ProbeRunner(m, tok, 1, ts, batch_size=8, device=device)
        H0, y0 = runner.run(ids)
        H1, y1 = runner.run(ids, params=UpdateEngine(m, tok, UpdateCfg(lr=1e-3), device).update(*PAIR, "p"))
        out[device] = (H0, y0, H1 - H0, y1 - y0)

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))

    names = ("H", "y", "dH", "dy")
    return {f"max_rel_diff_{n}": rel(a, b) for n, a, b in zip(names, out["cuda"], out["cpu"])}


def build(shape: dict, dtype: torch.dtype, device: str, n_probes: int, words: int, batch: int):
    """A random model of ``shape``, its probe runner and update engine, and the probe set."""
    import transformers as tf

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(pad_token_id=0, **shape)).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = probes(tok, n_probes, words)
    ts = TargetSet.from_strings(tok, ["i can't", "sorry"])
    runner = ProbeRunner(model, tok, shape["num_hidden_layers"] // 2, ts, batch_size=batch, device=device)
    engine = UpdateEngine(model, tok, UpdateCfg(lr=1e-4, min_update_share=0.0), device)
    return model, runner, engine, ids


def engine_timing(shape: dict, dtype: torch.dtype, device: str, n_probes: int, words: int, n_pairs: int,
                  batch: int) -> dict:
    model, runner, engine, ids = build(shape, dtype, device, n_probes, words, batch)
    params = sum(p.numel() for p in model.parameters())
    tokens = sum(len(i) for i in ids)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    runner.run(ids)
    sync(device)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    survival = []
    for i in range(n_pairs):
        new = engine.update(PAIR[0] + " " + "please " * (i % 5), PAIR[1], f"p{i}")
        survival.append(getattr(engine, "last_survival", 1.0))
        runner.run(ids, params=new)
        del new
    sync(device)
    pair_s = (time.perf_counter() - t) / n_pairs
    flops = 2.0 * params * tokens
    return {"dtype": str(dtype).replace("torch.", ""), "params": params, "n_probes": n_probes, "probe_tokens": tokens,
            "n_pairs": n_pairs, "base_pass_s": base_s, "seconds_per_pair": pair_s,
            "probe_tokens_per_s": tokens / base_s, "probe_pass_tflops": flops / base_s / 1e12,
            "update_survival_mean": float(np.mean(survival)),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def gradient_timing(shape: dict, dtype: torch.dtype, device: str, n_probes: int, words: int, n_pairs: int,
                    batch: int, n_concepts: int) -> dict:
    """Gradient mode's two costs with whole gradients: ``n_concepts`` concept gradients over the
    probes (random weightings of the behaviour score: the cost does not depend on them; no SAE
    here, whose encoder adds little), then per pair one backward and the block-wise products
    (``gradients.per_pair.direction_products``, as the pipeline runs them)."""
    from policytrace.gradients.per_pair import direction_products

    _, runner, engine, ids = build(shape, dtype, device, n_probes, words, batch)
    names = engine.trainable
    dim = sum(engine.base[n].numel() for n in names)
    w = torch.randn(n_concepts, len(ids), generator=torch.Generator().manual_seed(0))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    grads = torch.zeros(n_concepts, dim, dtype=torch.float32, device=device)
    sync(device)
    t = time.perf_counter()
    for start in range(0, len(ids), batch):
        leaves = {n: engine.base[n].detach().requires_grad_(True) for n in names}  # shares storage: no copy
        _, y = runner.run_differentiable(ids[start:start + batch], {**engine.base, **leaves})
        for c in range(n_concepts):
            g = torch.autograd.grad(y, [leaves[n] for n in names], grad_outputs=w[c, start:start + batch].to(y),
                                    retain_graph=c < n_concepts - 1, allow_unused=True)
            off = 0
            for n, v in zip(names, g):
                k = engine.base[n].numel()
                if v is not None:
                    grads[c, off:off + k] += v.reshape(-1).float()
                off += k
        del y, leaves
    sync(device)
    concept_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n_pairs):
        direction_products(engine, grads, PAIR[0] + " " + "please " * (i % 5), PAIR[1], f"p{i}")
    sync(device)
    pair_s = (time.perf_counter() - t) / n_pairs
    return {"dtype": str(dtype).replace("torch.", ""), "n_concepts": n_concepts, "concept_seconds": concept_s,
            "concept_seconds_each": concept_s / n_concepts, "seconds_per_pair": pair_s,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


class _Identity:
    """A stand-in SAE reader (the codes are the activations' selected columns): the concept pass's
    cost is the model's, the encoder adds little."""

    @staticmethod
    def encode_torch(H, columns, gated):
        return H[:, columns]


def batched_timing(shape: dict, dtype: torch.dtype, device: str, n_probes: int, words: int, n_pairs: int,
                   batch: int, n_concepts: int, budget: int, r: int) -> dict:
    """Gradient mode's batched, hooked route at the same shape: the concept pass (all
    ``n_concepts`` from one forward per probe batch, the prefix shared; whole gradients) and the
    pairs packed under ``budget`` tokens (whole products with the concepts, and r x r
    projections), per pair; the same per-pair route's seconds for the speed-up."""
    from policytrace.gradients import batched as bt
    from policytrace.gradients.concept_pass import ProbeSide, concept_rows
    from policytrace.gradients.projection import Factored, Whole

    bt.CHUNK_BYTES = (4 << 30) if device.startswith("cuda") else bt.CHUNK_BYTES
    model, runner, engine, ids = build(shape, dtype, device, n_probes, words, batch)
    tok = engine.tokenizer
    shapes = {n: tuple(engine.base[n].shape) for n in engine.trainable}
    gen = torch.Generator().manual_seed(0)
    cy = torch.randn(n_concepts, len(ids), generator=gen).numpy()
    side = ProbeSide(runner, _Identity(), ids, np.arange(4), False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    grads = concept_rows(model, engine.trainable, side, np.zeros((n_concepts, len(ids), 4)), cy, Whole(shapes),
                         torch.float32, budget)
    sync(device)
    concept_s = time.perf_counter() - t
    examples = []
    for i in range(n_pairs):
        full, start = engine.tokens(PAIR[0] + " " + "please " * (i % 5), PAIR[1], f"p{i}")
        examples.append(bt.TrainExample.from_start(full[0].tolist(), start))
    out = {}
    proj = Factored(shapes, r, 0, device)
    sinks = {"whole": lambda b: bt.WholeProducts(grads, engine.trainable, shapes, "sgd", 1e-4, b),
             "projected": lambda b: bt.Projections(proj, "sgd", 1e-4, b, torch.float32, device)}
    for kind, make in sinks.items():
        sync(device)
        t = time.perf_counter()
        for idx in bt.pack([len(e) for e in examples], budget):
            sink = make(len(idx))
            bt.per_example(model, engine.trainable, sink, [examples[i] for i in idx], tok.pad_token_id, device)
            sink.result()
        sync(device)
        out[f"{kind}_seconds_per_pair"] = (time.perf_counter() - t) / n_pairs
    tokens = float(np.mean([len(e) for e in examples]))
    return {"dtype": str(dtype).replace("torch.", ""), "n_concepts": n_concepts, "token_budget": budget, "r": r,
            "concept_seconds": concept_s, "pair_tokens": tokens,
            "pair_tokens_per_s_whole": tokens / out["whole_seconds_per_pair"],
            "pair_tokens_per_s_projected": tokens / out["projected_seconds_per_pair"], **out,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="toy sizes (runs on CPU; CI keeps the script working)")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    ap.add_argument("--probes", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--concepts", type=int, default=2, help="gradient mode's concepts (whole gradients: C x parameters floats)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = SMALL if args.small else LLAMA_3B
    n_probes = args.probes or (32 if args.small else 2000)
    n_pairs = args.pairs or (2 if args.small else 16)
    res: dict = {"machine": {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                             "torch": torch.__version__, "python": platform.python_version()},
                 "small": args.small, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    res["cuda_against_cpu"] = cuda_against_cpu() if cuda else "no CUDA device: skipped"
    n = 1024 if args.small else 8192
    res["matmul_peak_tflops"] = {str(d).replace("torch.", ""): matmul_peak(device, d, n)
                                 for d in (torch.bfloat16, torch.float32)}
    res["engine"] = []
    for dtype in (torch.bfloat16, torch.float32):
        r = engine_timing(shape, dtype, device, n_probes, 40 if not args.small else 12, n_pairs, 64 if cuda else 16)
        r["fraction_of_matmul_peak"] = r["probe_pass_tflops"] / res["matmul_peak_tflops"][r["dtype"]]
        res["engine"].append(r)
        print(json.dumps(r), flush=True)
    res["gradient"] = []
    for dtype in (torch.bfloat16, torch.float32):
        g = gradient_timing(shape, dtype, device, n_probes, 40 if not args.small else 12, n_pairs, 64 if cuda else 16,
                            args.concepts)
        e = next(x for x in res["engine"] if x["dtype"] == g["dtype"])
        g["marginal_speedup"] = e["seconds_per_pair"] / g["seconds_per_pair"]
        g["break_even_pairs"] = g["concept_seconds"] / max(e["seconds_per_pair"] - g["seconds_per_pair"], 1e-9)
        res["gradient"].append(g)
        print(json.dumps(g), flush=True)
    res["batched"] = []
    budget = 2048 if args.small else 32768
    for dtype in (torch.bfloat16, torch.float32):
        b = batched_timing(shape, dtype, device, n_probes, 40 if not args.small else 12, n_pairs if args.small else 64,
                           64 if cuda else 16, args.concepts, budget, 16)
        g = next(x for x in res["gradient"] if x["dtype"] == b["dtype"])
        e = next(x for x in res["engine"] if x["dtype"] == b["dtype"])
        b["speedup_over_per_pair_whole"] = g["seconds_per_pair"] / b["whole_seconds_per_pair"]
        b["concept_speedup"] = g["concept_seconds"] / b["concept_seconds"]
        b["marginal_speedup_whole"] = e["seconds_per_pair"] / b["whole_seconds_per_pair"]
        res["batched"].append(b)
        print(json.dumps(b), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if not args.small:
        write_readme(res)


def write_readme(r: dict) -> None:
    rows = "\n".join(
        f"| {e['dtype']} | {e['seconds_per_pair']:.2f} | {e['probe_tokens_per_s']:.0f} | {e['probe_pass_tflops']:.1f} | "
        f"{100 * e['fraction_of_matmul_peak']:.0f}% | {e['update_survival_mean']:.2f} | {e['peak_gpu_mib'] or 0:.0f} |"
        for e in r["engine"])
    grad_rows = "\n".join(
        f"| {g['dtype']} | {g['n_concepts']} | {g['concept_seconds']:.1f} | {g['seconds_per_pair']:.3f} | "
        f"{g['marginal_speedup']:.0f}× | {g['break_even_pairs']:.1f} | {g['peak_gpu_mib'] or 0:.0f} |"
        for g in r.get("gradient", []))
    batched_rows = "\n".join(
        f"| {b['dtype']} | {b['n_concepts']} | {b['token_budget']} | {b['concept_seconds']:.1f} | "
        f"{b['whole_seconds_per_pair']:.4f} | {b['projected_seconds_per_pair']:.4f} ({b['r']}) | "
        f"{b['pair_tokens_per_s_whole']:.0f} | {b['speedup_over_per_pair_whole']:.1f}× | {b['marginal_speedup_whole']:.0f}× | "
        f"{b['peak_gpu_mib'] or 0:.0f} |" for b in r.get("batched", []))
    block = f"""<!-- gpu:begin -->
Run {r['timestamp']} on {r['machine']['device']}, torch {r['machine']['torch']}. CUDA against CPU (tiny float64 model):
{json.dumps(r['cuda_against_cpu'])}. Matmul peak measured in the same run: {json.dumps(r['matmul_peak_tflops'])} TFLOP/s.

| dtype | s / pair | probe tokens/s | probe pass TFLOP/s | of matmul peak | update surviving | peak GPU MiB |
|---|---|---|---|---|---|---|
{rows}

Gradient mode, whole gradients:

| dtype | concepts | concept pass s (once) | s / pair | marginal speed-up | break-even pairs | peak GPU MiB |
|---|---|---|---|---|---|---|
{grad_rows}

Gradient mode, batched and hooked (pairs packed under the token budget):

| dtype | concepts | budget | concept pass s | s / pair whole | s / pair projected (r) | tokens/s whole | × per-pair route | marginal speed-up | peak GPU MiB |
|---|---|---|---|---|---|---|---|---|---|
{batched_rows}
<!-- gpu:end -->"""
    write_readme_section("gpu", block, "GPU check", "python benches/gpu_check.py")


if __name__ == "__main__":
    main()
