"""Gradient mode's batched projected pair side against a peer, Bergson (EleutherAI, PyPI
``bergson``), on the same 240 pairs, the same model, the same machine and thread count:

    python benches/bench_bergson.py [--pairs 240] [--r 16] [--budget 2048] [--threads 2] [--repeats 2]
                                    [--check-pairs 48] [--bergson-python /work/venvb/bin/python]

Bergson lives in its own virtualenv (``--bergson-python``; ``pip install "bergson>=2.5,<3"``, the
``bench`` extra) and runs as its own CLI, ``bergson build``, in a child process. The driver:

1. saves the embedded SmolLM2-135M-Instruct (float32 from the GGUF) as a Hugging Face folder
   (safetensors, tokenizer, chat template) under the policytrace cache, once;
2. writes the pairs as Bergson reads them: pre-tokenised ``input_ids`` and ``labels`` (−100 on
   the prompt), the ids being exactly ``UpdateEngine.tokens(prompt, response)``; Bergson's own
   prompt/completion tokenisation is run too and compared (it labels only the response text, not
   the ``<|im_end|>`` and newline after it that policytrace trains on, hence the ids);
3. times, in fresh child processes with ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` at
   ``--threads``, alternately per repeat: ``bergson build`` (per-module projection at ``--r``,
   ``--token_batch_size --budget``, fp32, mean loss per document, nothing else), and policytrace's
   ``per_example`` with ``Projections`` (SGD, r, the same budget) on the Linear weights Bergson
   covers and on all parameters. Each child reports the wall clock of the collection itself; the
   driver times the whole command (interpreter start, imports, model and data load, collection);
4. checks that both compute the same quantity: policytrace's projections with Bergson's own
   projection matrices against Bergson's stored rows (``--check-pairs``; equal up to float32
   rounding and the −lr factor), and, with each side's own random projection, how well the
   pair-by-pair inner products agree (both are unbiased estimates of the exact ones).

Writes results/bergson.json and the README section between <!-- bergson:begin/end -->.
The Bergson child (``--bergson-worker``) imports neither policytrace nor anything outside Bergson's
own environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MODEL_FOLDER = "bench-bergson-smollm2-135m-instruct-f32"


# --- children --------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (the whole process: model, data and collection)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def bergson_argv(spec: dict) -> list[str]:
    """``bergson build`` exactly as run: everything not named here is Bergson's default (no
    preconditioner, no unit normalisation, no aggregation, Rademacher projection with JL scale,
    per-module target, no bias, one process)."""
    return ["build", spec["run"], "--model", spec["model"], "--dataset", spec["data"], "--precision", "fp32",
            "--projection_dim", str(spec["r"]), "--token_batch_size", str(spec["budget"]),
            "--loss_reduction", "mean", "--nproc_per_node", "1"]


def bergson_worker(spec: dict) -> None:
    """In Bergson's environment: ``prep`` (its tokenisation of the raw pairs, its batches, its
    target modules and projection matrices) or ``build`` (the CLI, with its collection timed)."""
    set_threads(spec["threads"])
    import torch

    out: dict = {}
    if spec["job"] == "prep":
        from transformers import AutoModelForCausalLM

        from bergson.collector.collector import HookCollectorBase, create_module_projection_matrix
        from bergson.config.config import DataConfig, IndexConfig
        from bergson.data import allocate_batches
        from bergson.utils.worker_utils import setup_data_pipeline

        def pipeline(data: DataConfig):
            cfg = IndexConfig(run_path=str(Path(spec["scratch"]) / "unused"), model=spec["model"], data=data,
                              token_batch_size=spec["budget"])
            ds, _ = setup_data_pipeline(cfg)
            return ds

        native = pipeline(DataConfig(dataset=spec["raw"], prompt_column="prompt", completion_column="response"))
        fed = pipeline(DataConfig(dataset=spec["data"]))
        def columns(ds) -> dict:
            return {c: [list(x) for x in ds[c]] for c in ("input_ids", "labels")}

        out["native"], out["fed"] = columns(native), columns(fed)
        out["batches"] = allocate_batches(list(fed["length"]), spec["budget"])
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        targets = HookCollectorBase.discover_targets(model.base_model)
        mats = {}
        for name, (_dev, shape, _bias) in targets.items():
            o, i = int(shape[0]), int(shape[1])
            mats[name] = tuple(create_module_projection_matrix(name, role, spec["r"], n, torch.float32, torch.device("cpu"),
                                                               "rademacher", "jl", None)
                               for role, n in (("left", o), ("right", i)))
        torch.save(mats, spec["matrices"])
        out["modules"] = list(targets)
        tset, other = {f"model.{t}" for t in targets}, {}
        for n, m in model.named_modules():
            if n not in tset and list(m.parameters(recurse=False)):
                other.setdefault(type(m).__name__, []).append(n)
        out["other_modules"] = {k: v if len(v) <= 2 else len(v) for k, v in other.items()}
    else:
        import bergson.build as bb
        from bergson.__main__ import main

        inner = bb.collect_gradients

        def timed(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            inner(*a, **k)
            out["collect_s"], out["collect_cpu_s"] = time.perf_counter() - t, time.process_time() - c

        bb.collect_gradients = timed
        sys.argv = ["bergson", *bergson_argv(spec)]
        main()
        out["threads_seen"] = torch.get_num_threads()
    out["peak_rss_mib"] = peak_rss_mib()
    Path(spec["result"]).write_text(json.dumps(out))


class FixedFactors:
    """A projector (the interface :class:`~policytrace.gradients.batched.Projections` reads) whose
    per-module factors are given: Bergson's own left (P_out) and right (P_in) matrices."""

    def __init__(self, mats: dict, shapes: dict, r: int) -> None:
        self.names, self.shapes, self.r, self._m = list(shapes), shapes, r, mats

    def factors(self, name: str):
        return self._m[name]


def policytrace_worker(spec: dict) -> None:
    """In policytrace's environment: the pairs as gradient mode sees them, then ``per_example``
    with ``Projections`` over the packed batches, the loop timed."""
    set_threads(spec["threads"])
    import torch

    from policytrace.gradients.batched import Projections, TrainExample, pack, per_example
    from policytrace.gradients.projection import Factored
    from policytrace.model.loading import load_model_cfg
    from policytrace.model.update import UpdateEngine
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.stages import load_inputs

    cfg = cfgmod.resolve({"preset": "demo", "data": {"max_pairs": 0}, "run": {"mode": "gradient", "threads": spec["threads"]}})
    inputs = load_inputs(cfg)
    lm = load_model_cfg(cfg.model)
    engine = UpdateEngine(lm.model, lm.tokenizer, cfg.update, "cpu", seed=cfg.run.seed)
    rows = inputs.pairs.head(spec["pairs"])
    exs = []
    for r in rows.iter_rows(named=True):
        ids, start = engine.tokens(r["prompt"], r["response"], r["id"])
        exs.append(TrainExample.from_start(ids[0].tolist(), start))
    fed = [json.loads(line)["input_ids"] for line in Path(spec["data"]).read_text().splitlines()]
    if [list(e.ids) for e in exs] != fed:
        raise SystemExit("policytrace's pair tokens differ from the ones written for Bergson")
    if spec.get("subset"):
        exs = [exs[i] for i in spec["subset"]]
    if spec["params"] == "linear":
        trainable = [n for n in engine.trainable if n.endswith(".weight") and isinstance(
            lm.model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Linear)]
    else:
        trainable = list(engine.trainable)
    shapes = {n: tuple(engine.base[n].shape) for n in trainable}
    if spec.get("matrices"):
        mats = torch.load(spec["matrices"])
        proj = FixedFactors({f"model.{k}.weight": v for k, v in mats.items()}, shapes, spec["r"])
        if set(proj._m) != set(shapes):
            raise SystemExit("Bergson's target modules are not policytrace's Linear weights")
    else:
        proj = Factored(shapes, spec["r"], 0)
    pad = lm.tokenizer.pad_token_id
    batches = pack([len(e) for e in exs], spec["budget"])
    outs: list = [None] * len(exs)
    t, c = time.perf_counter(), time.process_time()
    for idx in batches:
        sink = Projections(proj, "sgd", engine.cfg.lr, len(idx), torch.float32, "cpu")
        per_example(lm.model, trainable, sink, [exs[i] for i in idx], pad, "cpu")
        res = sink.result()
        for row, i in enumerate(idx):
            outs[i] = res[row]
    collect, collect_cpu = time.perf_counter() - t, time.process_time() - c
    torch.save({"rows": torch.stack(outs), "lr": engine.cfg.lr}, spec["rows"])
    Path(spec["result"]).write_text(json.dumps({
        "collect_s": collect, "collect_cpu_s": collect_cpu, "batch_sizes": [len(b) for b in batches], "n_params": len(trainable),
        "n_weights": int(sum(engine.base[n].numel() for n in trainable)), "dim": int(outs[0].numel()),
        "threads_seen": torch.get_num_threads(), "tokens": sum(len(e) for e in exs),
        "trained_tokens": sum(sum(e.trained) for e in exs), "peak_rss_mib": peak_rss_mib()}))


# --- driver ----------------------------------------------------------------------------------


def child(python: str, spec: dict, scratch: Path, threads: int) -> tuple[dict, float, tuple, tuple]:
    """Run this file as a worker under ``python``; its result, the command's wall clock and the
    load averages before and after."""
    path = scratch / f"spec-{time.monotonic_ns()}.json"
    spec = {**spec, "result": str(path.with_suffix(".out.json")), "threads": threads}
    path.write_text(json.dumps(spec))
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    flag = "--bergson-worker" if spec["side"] == "bergson" else "--policytrace-worker"
    for attempt in range(2):
        load0 = os.getloadavg()
        t = time.perf_counter()
        proc = subprocess.run([python, str(Path(__file__).resolve()), flag, str(path)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        load1 = os.getloadavg()
        if proc.returncode != -9 or attempt:
            break
        # The machine is shared: the kernel's OOM killer may pick this child for another's use.
        print(f"{spec['side']} child killed (SIGKILL, likely the OOM killer) after {wall:.0f} s; running it again",
              flush=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{spec['side']} {spec.get('job', spec.get('params'))} child failed ({proc.returncode})")
    return json.loads(Path(spec["result"]).read_text()), wall, load0, load1


def export_model(lm, folder: Path) -> Path:
    """The loaded model and tokenizer as a HF folder (float32 safetensors, chat template), once."""
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    import copy

    import torch

    # A model loaded from GGUF counts as quantized and refuses save_pretrained: copy its
    # (dequantized, float32) weights into a plain model of the same config.
    config = copy.deepcopy(lm.model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(lm.model)(config).to(torch.float32)
    plain.load_state_dict(lm.model.state_dict(), strict=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def gram_agreement(a, b) -> dict:
    """How well two sets of projected gradients (rows = pairs) agree on the pair-by-pair inner
    products: Pearson and Spearman over the off-diagonal entries, the cosine of the two Gram
    matrices, and the same for each pair's norm."""
    import numpy as np
    from scipy.stats import spearmanr

    ka, kb = a @ a.T, b @ b.T
    off = ~np.eye(len(a), dtype=bool)
    cos = float((ka * kb).sum() / np.sqrt((ka * ka).sum() * (kb * kb).sum()))
    na, nb = np.sqrt(np.diag(ka)), np.sqrt(np.diag(kb))
    ca, cb = ka / np.outer(na, na), kb / np.outer(nb, nb)
    return {"gram_cosine": cos, "offdiag_pearson": float(np.corrcoef(ka[off], kb[off])[0, 1]),
            "offdiag_spearman": float(spearmanr(ka[off], kb[off]).statistic),
            "cosine_matrix_spearman": float(spearmanr(ca[off], cb[off]).statistic),
            "norm_pearson": float(np.corrcoef(na, nb)[0, 1])}


def read_bergson_rows(run: Path, names: list[str]):
    """Bergson's index as (pairs, dim) float64, modules in ``names`` order."""
    import numpy as np

    info = json.loads((run / "info.json").read_text())
    flat = np.memmap(run / "gradients.bin", dtype=np.dtype(info["base_dtype"]), mode="r",
                     shape=(info["num_grads"], sum(info["grad_sizes"].values())))
    offs, lo = {}, 0
    for n, k in info["grad_sizes"].items():
        offs[n] = (lo, lo + k)
        lo += k
    return np.concatenate([np.asarray(flat[:, offs[n][0]:offs[n][1]], dtype=np.float64) for n in names], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=240)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check-pairs", type=int, default=48)
    ap.add_argument("--bergson-python", default=os.environ.get("BERGSON_PYTHON") or sys.executable,
                    help="the interpreter of the environment Bergson is installed in (default: $BERGSON_PYTHON, else this one)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bergson.json")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--keep-scratch", action="store_true", help="keep the temporary folder (Bergson's index, the rows)")
    ap.add_argument("--readme-only", action="store_true", help="rewrite the README section from --out, run nothing")
    ap.add_argument("--bergson-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--policytrace-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bergson_worker:
        return bergson_worker(json.loads(args.bergson_worker.read_text()))
    if args.policytrace_worker:
        return policytrace_worker(json.loads(args.policytrace_worker.read_text()))
    if args.readme_only:
        return write_readme(json.loads(args.out.read_text()))
    os.environ.update(OFFLINE)
    set_threads(args.threads)
    run_driver(args)


def bergson_version(python: str) -> str:
    proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('bergson'))"],
                          capture_output=True, text=True, env={**os.environ, **OFFLINE})
    return proc.stdout.strip() or "?"


def run_driver(args) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from _common import cpu_name, git_commit
    from policytrace.gradients.batched import pack
    from policytrace.model.loading import load_model_cfg
    from policytrace.model.update import UpdateEngine
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.stages import load_inputs

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    cfg = cfgmod.resolve({"preset": "demo", "data": {"max_pairs": 0}, "run": {"mode": "gradient", "threads": args.threads}})
    inputs = load_inputs(cfg)
    lm = load_model_cfg(cfg.model)
    engine = UpdateEngine(lm.model, lm.tokenizer, cfg.update, "cpu", seed=cfg.run.seed)
    folder = export_model(lm, cfg.run.cache_path() / MODEL_FOLDER)
    head_weights = lm.model.get_output_embeddings().weight.numel()
    rows = inputs.pairs.head(args.pairs)
    scratch = Path(tempfile.mkdtemp(prefix="bench-bergson-"))
    raw, data = scratch / "pairs-text.jsonl", scratch / "pairs-tokens.jsonl"
    ids_all, starts = [], []
    with raw.open("w") as fr, data.open("w") as fd:
        for r in rows.iter_rows(named=True):
            ids, start = engine.tokens(r["prompt"], r["response"], r["id"])
            ids = ids[0].tolist()
            ids_all.append(ids)
            starts.append(start)
            fr.write(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n")
            fd.write(json.dumps({"input_ids": ids, "labels": [-100] * start + ids[start:]}) + "\n")
    del lm, engine
    print(f"model folder {folder}; {len(ids_all)} pairs written to {scratch}", flush=True)

    base = {"model": str(folder), "data": str(data), "raw": str(raw), "r": args.r, "budget": args.budget,
            "pairs": args.pairs, "scratch": str(scratch)}
    matrices = scratch / "bergson-matrices.pt"
    prep, _, _, _ = child(args.bergson_python, {**base, "side": "bergson", "job": "prep", "matrices": str(matrices)},
                          scratch, args.threads)
    tokens = compare_tokens(prep, ids_all, starts)
    print(json.dumps(tokens, indent=1), flush=True)
    ours_batches = sorted(sorted(b) for b in pack([len(x) for x in ids_all], args.budget))
    same_batches = ours_batches == sorted(sorted(b) for b in prep["batches"])

    runs: dict[str, list] = {"bergson": [], "policytrace_linear": [], "policytrace_all": []}
    bergson_run = None
    for rep in range(args.repeats):
        for key in ("bergson", "policytrace_linear", "policytrace_all"):
            if key == "bergson":
                run = scratch / f"bergson-run-{rep}"
                res, wall, l0, l1 = child(args.bergson_python, {**base, "side": "bergson", "job": "build", "run": str(run)},
                                          scratch, args.threads)
                bergson_run = run
            else:
                params = key.split("_")[1]
                res, wall, l0, l1 = child(sys.executable, {**base, "side": "policytrace", "params": params,
                                                           "rows": str(scratch / f"{key}-{rep}.pt")}, scratch, args.threads)
            rec = {"repeat": rep, "collect_s": res["collect_s"], "collect_cpu_s": res["collect_cpu_s"], "command_s": wall, "load_before": l0, "load_after": l1,
                   "threads_seen": res.get("threads_seen")}
            rec.update({k: res[k] for k in ("batch_sizes", "n_params", "n_weights", "dim", "peak_rss_mib") if k in res})
            runs[key].append(rec)
            print(f"{key} repeat {rep}: collection {res['collect_s']:.1f} s ({res['collect_cpu_s']:.1f} s CPU), command {wall:.1f} s, load {l0[0]:.2f} -> {l1[0]:.2f}",
                  flush=True)

    # Same quantity: policytrace with Bergson's matrices against Bergson's rows.
    names = prep["modules"]
    brows = read_bergson_rows(bergson_run, names)
    n_check = min(args.check_pairs, args.pairs)
    res, _, _, _ = child(sys.executable, {**base, "side": "policytrace", "params": "linear", "matrices": str(matrices),
                                          "subset": list(range(n_check)), "rows": str(scratch / "check.pt")},
                         scratch, args.threads)
    chk = torch.load(scratch / "check.pt")
    ours = chk["rows"].double().numpy() / -chk["lr"]
    ref = brows[:n_check]
    exact = {"pairs": n_check, "max_abs_diff_over_max": float(np.abs(ours - ref).max() / np.abs(ref).max()),
             "max_row_rel_l2": float((np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())}
    # Each side's own projection: the pair-by-pair inner products.
    own = torch.load(scratch / "policytrace_linear-0.pt")
    own_rows = own["rows"].double().numpy() / -own["lr"]
    gram = gram_agreement(own_rows, brows)

    res = summarize(args, runs, tokens, same_batches, exact, gram, prep, started, load_start, cpu_name(), git_commit(),
                    bergson_version(args.bergson_python))
    res["lm_head_weights"] = head_weights
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if not args.no_readme:
        write_readme(res)
    if args.keep_scratch:
        print(f"scratch (Bergson's index, the rows, the specs) kept in {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def compare_tokens(prep: dict, ids_all: list, starts: list) -> dict:
    fed, native = prep["fed"], prep["native"]
    ours_labels = [[-100] * s + ids[s:] for ids, s in zip(ids_all, starts)]
    fed_same = fed["input_ids"] == ids_all and fed["labels"] == ours_labels
    native_ids_same = native["input_ids"] == ids_all
    trained_native = sum(sum(1 for x in lab if x != -100) for lab in native["labels"])
    trained_ours = sum(len(ids) - s for ids, s in zip(ids_all, starts))
    extra = set()
    for ids, s, lab in zip(ids_all, starts, native["labels"]):
        mask = [x != -100 for x in lab]
        for t in range(s, len(ids)):
            if not mask[t]:
                extra.add(ids[t])
    return {"fed_ids_and_labels_identical": fed_same, "native_ids_identical": native_ids_same,
            "native_labels_identical": native["labels"] == ours_labels, "trained_tokens_policytrace": trained_ours,
            "trained_tokens_bergson_native": trained_native, "token_ids_only_policytrace_trains": sorted(extra),
            "total_tokens": sum(len(x) for x in ids_all)}


def summarize(args, runs, tokens, same_batches, exact, gram, prep, started, load_start, cpu, commit, version) -> dict:
    import statistics

    total = tokens["total_tokens"]

    def side(recs: list) -> dict:
        best = min(r["collect_s"] for r in recs)
        med = statistics.median(r["collect_s"] for r in recs)
        cpu_s = min(r["collect_cpu_s"] for r in recs)
        return {"runs": recs, "best_collect_s": best, "median_collect_s": med, "best_collect_cpu_s": cpu_s,
                "pairs_per_cpu_s": args.pairs / cpu_s,
                "pairs_per_s": args.pairs / best, "tokens_per_s": total / best,
                "median_pairs_per_s": args.pairs / med, "best_command_s": min(r["command_s"] for r in recs)}

    out = {side_name: side(recs) for side_name, recs in runs.items()}
    b = out["bergson"]
    per_rep = [{k: b["runs"][i]["collect_s"] / out[k]["runs"][i]["collect_s"] for k in ("policytrace_linear", "policytrace_all")}
               for i in range(args.repeats)]
    return {
        "started": started, "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads},
        "commit": commit, "bergson_version": version, "load_at_start": load_start, "load_at_end": os.getloadavg(),
        "pairs": args.pairs, "r": args.r, "budget": args.budget, "total_tokens": total,
        "trained_tokens": tokens["trained_tokens_policytrace"],
        "bergson_command": "bergson " + " ".join(bergson_argv({"run": "RUN", "model": "MODEL_DIR", "data": "pairs-tokens.jsonl",
                                                                  "r": args.r, "budget": args.budget})),
        "bergson_modules": len(prep["modules"]), "bergson_leaf_modules_not_collected": prep["other_modules"],
        "same_batches": same_batches, "tokens": tokens, **out,
        "speedup_linear_best": b["best_collect_s"] / out["policytrace_linear"]["best_collect_s"],
        "speedup_all_best": b["best_collect_s"] / out["policytrace_all"]["best_collect_s"],
        "speedup_per_repeat": per_rep,
        "speedup_linear_cpu": b["best_collect_cpu_s"] / out["policytrace_linear"]["best_collect_cpu_s"],
        "speedup_all_cpu": b["best_collect_cpu_s"] / out["policytrace_all"]["best_collect_cpu_s"],
        "speedup_linear_command": b["best_command_s"] / out["policytrace_linear"]["best_command_s"],
        "same_quantity_with_bergson_matrices": exact, "own_projections_gram_agreement": gram,
    }


def flop_estimate(r: dict) -> dict:
    """Matmul FLOPs of each side's collection, weights frozen (a backward forms activation
    gradients, 2 per weight and token, besides the forward's 2): the body's Linear weights over
    every token on both sides; the LM head over every position for Bergson (``model(x).logits``),
    plus its weight gradient (the head is tied to the embedding, whose weight Bergson leaves
    requiring grad), and over the trained positions only for policytrace."""
    body = r["policytrace_linear"]["runs"][0]["n_weights"]
    head, tokens, trained = r["lm_head_weights"], r["total_tokens"], r["trained_tokens"]
    bergson = 4 * body * tokens + 4 * head * tokens + 2 * head * tokens
    ours = 4 * body * tokens + 4 * head * trained
    return {"bergson": bergson, "policytrace": ours, "ratio": bergson / ours}


def write_readme(r: dict) -> None:
    sys.path.insert(0, str(HERE))
    from _common import write_readme_section

    b, pl_, pa = r["bergson"], r["policytrace_linear"], r["policytrace_all"]
    t = r["tokens"]
    n = len(b["runs"])

    def rss(side: dict) -> str:
        return f"{max(x['peak_rss_mib'] for x in side['runs']):,.0f}"

    rows = [
        f"| side | what it projects | dimension | collection, best of {n} (s) | pairs/s | tokens/s | collection CPU (s) "
        "| whole command (s) | peak RSS (MiB) | policytrace speed-up, wall / CPU |", "|---|---|---|---|---|---|---|---|---|---|",
        f"| Bergson {r['bergson_version']} `bergson build` | {r['bergson_modules']} Linear weights of the body | "
        f"{r['bergson_modules'] * r['r'] ** 2:,} | {b['best_collect_s']:.1f} | {b['pairs_per_s']:.2f} | {b['tokens_per_s']:.0f} | "
        f"{b['best_collect_cpu_s']:.1f} | {b['best_command_s']:.1f} | {rss(b)} | 1 |",
        f"| policytrace `per_example` + `Projections` | the same {pl_['runs'][0]['n_params']} weights | {pl_['runs'][0]['dim']:,} | "
        f"{pl_['best_collect_s']:.1f} | {pl_['pairs_per_s']:.2f} | {pl_['tokens_per_s']:.0f} | {pl_['best_collect_cpu_s']:.1f} | "
        f"{pl_['best_command_s']:.1f} | {rss(pl_)} | **{r['speedup_linear_best']:.2f}×** / {r['speedup_linear_cpu']:.2f}× |",
        f"| policytrace, all parameters | all {pa['runs'][0]['n_params']} (the Linear weights, the tied embedding/head, the norms) | "
        f"{pa['runs'][0]['dim']:,} | {pa['best_collect_s']:.1f} | {pa['pairs_per_s']:.2f} | {pa['tokens_per_s']:.0f} | "
        f"{pa['best_collect_cpu_s']:.1f} | {pa['best_command_s']:.1f} | {rss(pa)} | {r['speedup_all_best']:.2f}× / {r['speedup_all_cpu']:.2f}× |",
    ]
    reps = "; ".join(f"{x['policytrace_linear']:.2f}× / {x['policytrace_all']:.2f}×" for x in r["speedup_per_repeat"])
    loads = ", ".join(f"{x['load_before'][0]:.1f}" for k in ("bergson", "policytrace_linear", "policytrace_all") for x in r[k]["runs"])
    ex, g = r["same_quantity_with_bergson_matrices"], r["own_projections_gram_agreement"]
    block = "\n".join([
        "<!-- bergson:begin -->",
        f"Run {r['started']} on {r['machine']['cpu']} ({r['machine']['cores']} cores), {r['machine']['threads']} threads on both sides "
        f"(`OMP_NUM_THREADS` and `torch.set_num_threads`), commit `{r['commit']}`, Bergson {r['bergson_version']} in its own "
        f"virtualenv on the same torch. {r['pairs']} pairs, {r['total_tokens']:,} tokens ({r['trained_tokens']:,} trained), "
        f"r = {r['r']}, token budget {r['budget']} (same batches on both sides: {r['same_batches']}); SmolLM2-135M-Instruct "
        "float32, saved from the embedded GGUF as a HF folder for Bergson. Each side runs in a fresh child process, "
        "alternating per repeat; *collection* is the gradient loop itself (Bergson: `collect_gradients`, i.e. its hooks, "
        "forward/backward, projection and index writes; policytrace: the packed `per_example` loop), *whole command* adds "
        "interpreter start, imports, model and data load. Load average (1 min) before each child: " + loads
        + f"; at start {r['load_at_start'][0]:.1f}, at end {r['load_at_end'][0]:.1f} (shared machine).", "",
        f"Bergson command: `{r['bergson_command']}` (all else its defaults: Rademacher projection with JL scale, per module, "
        "no bias, no preconditioner, no unit normalisation, no aggregation).", "", *rows, "",
        f"Speed-up per repeat (Linear / all): {reps}. "
        f"Same quantity: policytrace with Bergson's own projection matrices reproduces Bergson's stored rows on {ex['pairs']} pairs "
        f"to {ex['max_abs_diff_over_max']:.1e} (max |difference| over max |value|; after the −lr factor); each side with its "
        f"own random projection agrees on the pair-by-pair inner products with Pearson {g['offdiag_pearson']:.3f}, Spearman "
        f"{g['offdiag_spearman']:.3f} (off-diagonal Gram entries; Gram cosine {g['gram_cosine']:.3f}, pair cosines Spearman "
        f"{g['cosine_matrix_spearman']:.3f}), both being r = {r['r']} estimates of the exact products.", "",
        f"Tokens: Bergson is fed policytrace's token ids and labels (identical: {t['fed_ids_and_labels_identical']}); its own "
        f"prompt/completion tokenisation gives the same ids ({t['native_ids_identical']}) but labels only the response text, "
        f"{t['trained_tokens_bergson_native']:,} trained tokens against policytrace's {t['trained_tokens_policytrace']:,} "
        f"(policytrace also trains on the ids {t['token_ids_only_policytrace_trains']}, the closing `<|im_end|>` and newline).",
        "", fairness(r), "<!-- bergson:end -->"])
    write_readme_section("bergson", block, "Gradient mode against Bergson",
                         "python benches/bench_bergson.py --repeats 1 --check-pairs 24 --bergson-python VENV/bin/python")


def fairness(r: dict) -> str:
    f = flop_estimate(r)
    return (
        "What is compared, and where the work differs. Both sides project the same 210 `nn.Linear` weights (q, k, v, o, "
        "gate, up, down in 30 layers): Bergson hooks every Linear of `model.base_model`, so not the LM head (outside it, and "
        "tied to the embedding here), the embedding or the 61 RMSNorms (`bergson_leaf_modules_not_collected` in the JSON); "
        "the last row adds those on policytrace's side. Same per-example quantity (the gradient of the mean cross-entropy over "
        "the pair's trained tokens: Bergson's default `--loss_reduction sum` differs only by that per-pair scale, at the same cost), "
        "same float32 weights, same batches (both pack longest first under max length × count ≤ budget; Bergson then "
        "shuffles their order), same threads. By each tool's design, Bergson runs the vocabulary head at every position "
        f"({r['total_tokens']:,} here) and, as its setup leaves `requires_grad` on the frozen model's input embedding (so "
        "that a backward reaches the body) and the head is tied to it, also forms the dense head/embedding weight gradient "
        f"in every backward, then discards it; policytrace runs the head at the {r['trained_tokens']:,} trained "
        "positions only and differentiates with respect to the embedding output alone. Matmul FLOPs of the collection by "
        f"that count (`flop_estimate`): Bergson {f['bergson'] / 1e12:.1f} T, policytrace {f['policytrace'] / 1e12:.1f} T, "
        f"{f['ratio']:.2f}× — about the measured ratio: policytrace is faster by doing less, not by faster kernels. Bergson "
        "writes its rows to an on-disk memmap index, policytrace keeps them in memory. *Collection CPU* is the child's "
        "process time (all threads) over the collection: on this shared machine (load above 2 on 2 cores) the wall clock "
        "includes waiting for a core, so CPU seconds are the steadier measure. *Peak RSS* is each child's whole-process "
        "high-water mark (`VmHWM`). One repeat per side (each takes 12–14 minutes at this load); `--repeats N` alternates "
        "the sides N times and reports the best.")


if __name__ == "__main__":
    main()
