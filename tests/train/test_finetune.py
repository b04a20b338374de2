"""The [train] recipe (policytrace finetune): its optimizer against PyTorch's, its loss against
the HF-style token mean, the folder it writes (a loadable HF model, checkpoints, records),
byte-identical reruns and resumption after SIGKILL, and typed errors for bad recipes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from policytrace.errors import ConfigError, RunFolderError  # noqa: E402
from policytrace.gradients.batched import TrainExample  # noqa: E402
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.train.config import TrainCfg  # noqa: E402
from policytrace.train.finetuning import finetune, loss_coefficients, plan, weighted_loss  # noqa: E402
from policytrace.train.optim import Optimizer, lr_at  # noqa: E402

from _tiny import tiny_causal_lm, tiny_config, tiny_tokenizer, write_tiny_data, write_tiny_model  # noqa: E402

pytestmark = pytest.mark.model

TRAIN = {"optimizer": "adamw", "lr": 1e-3, "batch_size": 3, "epochs": 2, "checkpoint_every": 3,
         "weight_decay": 0.01, "warmup_steps": 2, "schedule": "cosine", "max_grad_norm": 1.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model = write_tiny_model(root / "model")
    probes, pairs = write_tiny_data(root)
    user = tiny_config(model, probes, pairs, root / "cache", train=TRAIN)
    toml = root / "ft.toml"
    cfg = cfgmod.resolve(user)
    toml.write_text(cfgmod.to_toml(cfg))
    return {"root": root, "cfg": cfg, "toml": toml, "model": model}


def cli(toml: Path, out: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "POLICYTRACE_FAULT": fault}
    cmd = [sys.executable, "-m", "policytrace", "finetune", str(toml), "--out", str(out), "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def files(out: Path) -> dict:
    return json.loads((out / "done.json").read_text())["files"]


@pytest.fixture(scope="module")
def whole(tiny):
    out = tiny["root"] / "whole"
    proc = cli(tiny["toml"], out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_optimizer_is_pytorchs_adamw_and_sgd_in_float64():
    gen = torch.Generator().manual_seed(0)
    for opt_name, extra in (("adamw", {}), ("sgd", {"momentum": 0.9})):
        cfg = TrainCfg(optimizer=opt_name, lr=1e-2, weight_decay=0.1, **extra)
        a = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        b = a.clone().requires_grad_(True)
        ours = Optimizer(cfg, {"w": a})
        ref = (torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
               if opt_name == "adamw" else None)
        ref_b = a.clone()
        buf = torch.zeros_like(a)
        for s in range(1, 6):
            g = torch.randn(5, 4, generator=gen, dtype=torch.float64)
            ours.step({"w": a}, {"w": g}, 1e-2)
            if ref is not None:
                b.grad = g.clone()
                ref.step()
                assert torch.allclose(a, b.detach(), rtol=0, atol=1e-14)
            else:  # SGDW by hand: b <- mu b + g, theta <- (1 - lr wd) theta - lr b
                buf = 0.9 * buf + g
                ref_b = (1 - 1e-3) * ref_b - 1e-2 * buf
                assert torch.allclose(a, ref_b, rtol=0, atol=1e-14)


def test_schedules():
    c = TrainCfg(lr=1.0, warmup_steps=2, schedule="linear")
    assert [lr_at(c, s, 6) for s in range(1, 7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    c = dataclasses.replace(c, schedule="cosine")
    assert lr_at(c, 3, 6) == 1.0 and abs(lr_at(c, 5, 6) - 0.5) < 1e-15 and lr_at(c, 6, 6) > 0
    assert lr_at(dataclasses.replace(c, schedule="constant"), 6, 6) == 1.0


def test_plan_is_seeded_epochs_of_batches():
    c = TrainCfg(batch_size=3, grad_accum=2, epochs=2, seed=5)
    steps = plan(c, 10)
    assert len(steps) == 2 * 2  # 4 micro-batches an epoch (3, 3, 3, 1), two a step
    for e in range(2):
        seen = [i for s in steps if s.epoch == e for i in s.examples]
        assert sorted(seen) == list(range(10))
    assert plan(c, 10) == steps and plan(dataclasses.replace(c, seed=6), 10) != steps


def test_token_mean_loss_is_the_batch_token_mean_float64():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", len(tok)).double()
    rng = np.random.default_rng(0)
    exs = []
    for n in (7, 11, 5):
        ids = rng.integers(5, len(tok), n).tolist()
        exs.append(TrainExample.from_start(ids, int(rng.integers(2, n - 1))))
    for loss in ("token_mean", "example_mean"):
        cfg = TrainCfg(loss=loss)
        coef = loss_coefficients(cfg, exs, (0, 1, 2), np.ones(3))
        ours = weighted_loss(model, exs, coef, 0, "cpu")
        per = []  # reference: every trained token's cross-entropy, one example at a time
        for e in exs:
            logits = model(torch.tensor([e.ids])).logits[0]
            ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(e.ids[1:]), reduction="none")
            per.append(ce[torch.tensor(e.trained[1:])])
        ref = torch.cat(per).mean() if loss == "token_mean" else torch.stack([p.mean() for p in per]).mean()
        assert abs(float(ours.detach()) - float(ref.detach())) < 1e-12


def test_finetune_writes_a_loadable_model_checkpoints_and_records(tiny, whole):
    from transformers import AutoModelForCausalLM

    rec = json.loads((whole / "records.json").read_text())
    assert len(rec["steps"]) == rec["total_steps"] == 2 * 4  # 12 pairs in batches of 3, 2 epochs
    assert rec["checkpoints"] == [3, 6, 8]
    assert all(abs(sum(s["coef"]) - 1.0) < 1e-12 for s in rec["steps"])  # token mean: Σ c_i = 1
    assert all(0 < s["clip"] <= 1.0 for s in rec["steps"])
    trained = AutoModelForCausalLM.from_pretrained(whole / "model", torch_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], torch_dtype=torch.float32)
    from safetensors.torch import load_file

    last = load_file(str(whole / "checkpoints/step-8/trained.safetensors"))
    sd, bd = trained.state_dict(), base.state_dict()
    for n, t in last.items():
        assert torch.equal(sd[n], t) and not torch.equal(bd[n], t)
    assert (whole / "model/model.safetensors").is_file()


def test_rerun_is_byte_identical(tiny, whole, tmp_path):
    proc = cli(tiny["toml"], tmp_path / "again")
    assert proc.returncode == 0, proc.stderr
    assert files(tmp_path / "again") == files(whole)


@pytest.mark.parametrize("fault", ["finetune-step:5", "finetune-before-checkpoint-marker:2", "finetune-before-done"])
def test_sigkill_then_resume_is_byte_identical(tiny, whole, tmp_path, fault):
    out = tmp_path / "killed"
    killed = cli(tiny["toml"], out, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "done.json").exists()
    done = cli(tiny["toml"], out)
    assert done.returncode == 0, done.stderr
    assert files(out) == files(whole)
    for step in (3, 6, 8):  # the checkpoints too
        a, b = (json.loads((d / f"checkpoints/step-{step}/done.json").read_text()) for d in (out, whole))
        assert a == b


@pytest.mark.parametrize("key,value,why", [("lr", 0.0, "must be > 0"), ("lr", -1e-3, "must be > 0"),
                                           ("batch_size", 0, "must be >= 1"), ("schedule", "step", "schedule"),
                                           ("optimizer", "adam", "optimizer"), ("epochs", 0, "must be >= 1"),
                                           ("betas", [0.9], "two numbers"), ("loss", "sum", "loss")])
def test_bad_recipes_are_typed_errors_naming_the_key(key, value, why):
    with pytest.raises(ConfigError, match=rf"train\.{key}") as e:
        cfgmod.resolve({"train": {key: value}})
    assert why in str(e.value)


def test_checkpoint_folder_of_another_model_is_refused(tiny, whole, tmp_path):
    other = write_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "mixed"
    (out / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(whole / "checkpoints/step-3", out / "checkpoints/step-3")
    cfg = dataclasses.replace(tiny["cfg"], model=dataclasses.replace(tiny["cfg"].model, name=str(other)))
    from policytrace.train.finetuning import finetune_config

    with pytest.raises(RunFolderError, match=r"step-3 is a checkpoint of another fine-tune \(its model differs"):
        finetune_config(cfg, out, progress=False, log=lambda m: None)


def test_unknown_train_key_and_bad_weights(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'"):
        cfgmod.resolve({"train": {"learning_rate": 1e-3}})
    ex = [TrainExample.from_start([5, 6, 7, 8], 2)]
    with pytest.raises(Exception, match="weights must be 1 finite numbers"):
        finetune(tiny["cfg"], ex, tmp_path / "w", weights=[-1.0], progress=False)
    with pytest.raises(Exception, match="has no trained token"):
        finetune(tiny["cfg"], [TrainExample((5, 6, 7), (False, False, False))], tmp_path / "w", progress=False)


def test_the_package_exports_the_functions_even_after_their_modules_load():
    """``policytrace.train.finetune`` is the function, whichever import came first (the module it
    lives in is ``finetuning``, so loading it never shadows the name)."""
    import importlib

    import policytrace.train as train
    from policytrace.train import trajectory

    importlib.import_module("policytrace.train.finetuning")
    assert train.finetune is finetune and callable(train.finetune)
    assert train.attributed_update is trajectory.attributed_update
    from policytrace.train import FinetuneResult, attributed_update  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        train.nonesuch  # noqa: B018


def test_a_model_marked_as_gguf_quantized_saves_as_the_float_model_and_keeps_its_marks(tmp_path):
    """The embedded default is read from GGUF: transformers keeps a quantizer that makes
    save_pretrained refuse, though the weights are dequantized floats (the trajectory demo
    stopped there). The fine-tune's save writes the plain float model; the live model keeps its marks."""
    import types

    from transformers import AutoModelForCausalLM

    from policytrace.train.finetuning import save_model

    class Unserializable:  # what transformers' GGUF quantizer answers
        quantization_config = types.SimpleNamespace(quant_method="gguf")

        def is_serializable(self, *a, **k):
            return False

    tok = tiny_tokenizer()
    net = tiny_causal_lm("llama", len(tok))
    mark, qc = Unserializable(), {"quant_method": "gguf"}
    net.hf_quantizer, net.config.quantization_config = mark, qc
    with pytest.raises(ValueError, match="not serializable"):
        net.save_pretrained(tmp_path / "refused", safe_serialization=True)
    save_model(net, tok, tmp_path / "saved", TrainCfg())
    assert net.hf_quantizer is mark and net.config.quantization_config == qc
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert getattr(back.config, "quantization_config", None) is None
    for (n, a), (_, b) in zip(net.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n
