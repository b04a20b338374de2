"""The Trainer callback (RecordingCallback): a ``transformers.Trainer`` run on the tiny model with
the recipe of a ``policytrace finetune`` run (same batches, AdamW, linear schedule, decay,
clipping, token-mean loss) records the same steps, and its records attributed by trajectory
mode match the finetune's to 1e-5; TRL's SFTTrainer is recorded with its own completion-only
mask; bad inputs stop with typed errors naming what to set."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from policytrace.errors import ConfigError, RunFolderError  # noqa: E402
from policytrace.model.loading import LoadedModel  # noqa: E402
from policytrace.train import RecordingCallback  # noqa: E402
from policytrace.train.config import TrainCfg  # noqa: E402
from policytrace.train.finetuning import finetune, load_tensors  # noqa: E402
from policytrace.train.trajectory import attribute, load_records, recorded_examples  # noqa: E402

from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402
from _trajectory import Cfg, concept, examples, tiny_lm  # noqa: E402

pytestmark = pytest.mark.model

PARAMS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight",
          "model.layers.1.mlp.down_proj.weight")
RECIPE = TrainCfg(optimizer="adamw", lr=2e-3, batch_size=3, epochs=2, weight_decay=0.05, max_grad_norm=0.15,
                  schedule="linear", checkpoint_every=0, precondition="checkpoint", params=PARAMS)


def rows(exs):
    return datasets.Dataset.from_dict({"input_ids": [list(e.ids) for e in exs],
                                       "labels": [[t if tr else -100 for t, tr in zip(e.ids, e.trained)] for e in exs],
                                       "id": [f"ex-{i}" for i in range(len(exs))]})


def pad_collator(pad_id: int = 0, side: str = "right", labels: bool = True):
    def collate(features):
        T = max(len(f["input_ids"]) for f in features)
        ids, lab, mask = [], [], []
        for f in features:
            k = T - len(f["input_ids"])
            fill = lambda xs, v: (list(xs) + [v] * k) if side == "right" else ([v] * k + list(xs))  # noqa: E731
            ids.append(fill(f["input_ids"], pad_id))
            lab.append(fill(f["labels"], -100))
            mask.append(fill([1] * len(f["input_ids"]), 0))
        out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if labels:
            out["labels"] = torch.tensor(lab)
        return out

    return collate


class PlanSampler(torch.utils.data.Sampler):
    """policytrace finetune's batch order: epoch e's seeded permutation on the e-th pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        self.epoch += 1
        return iter(order)


def trainer_for(model, ds, out, recipe: TrainCfg = RECIPE, collator=None, plan: bool = True, params=PARAMS, **kw):
    class PlanTrainer(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return PlanSampler(len(self.train_dataset), recipe.seed) if plan else super()._get_train_sampler(train_dataset)

    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    defaults = dict(output_dir=str(out / "hf"), per_device_train_batch_size=recipe.batch_size,
                    gradient_accumulation_steps=recipe.grad_accum, num_train_epochs=recipe.epochs,
                    learning_rate=recipe.lr, lr_scheduler_type=recipe.schedule, weight_decay=recipe.weight_decay,
                    max_grad_norm=recipe.max_grad_norm, adam_beta1=recipe.betas[0], adam_beta2=recipe.betas[1],
                    adam_epsilon=recipe.eps, optim="adamw_torch", save_strategy="no", report_to=[], logging_steps=1000,
                    use_cpu=True, seed=recipe.seed, dataloader_num_workers=0, disable_tqdm=True)
    args = transformers.TrainingArguments(**{**defaults, **kw})
    return PlanTrainer(model=model, args=args, train_dataset=ds, data_collator=collator or pad_collator())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("callback")
    lm = tiny_lm()
    exs = examples(lm.tokenizer)
    finetune(Cfg(RECIPE), exs, root / "ft", progress=False, log=lambda m: None, model=lm,
             ids=[f"ex-{i}" for i in range(len(exs))])
    net = tiny_lm().model
    tr = trainer_for(net, rows(exs), root)
    cb = RecordingCallback(root / "cb").attach(tr)
    tr.train()
    return {"root": root, "exs": exs, "ft": root / "ft", "cb": root / "cb", "net": net, "callback": cb, "lm": lm}


def test_records_match_the_finetune(both):
    a, b = load_records(both["ft"]), load_records(both["cb"])
    assert a.names == b.names and a.ids == b.ids and a.S == b.S == 6 and a.checkpoints == b.checkpoints == [3, 6]
    for x, y in zip(a.steps, b.steps):
        assert x["examples"] == y["examples"] and x["epoch"] == y["epoch"]
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        assert np.allclose(x["coef"], y["coef"], rtol=1e-12)
        assert x["clip"] == pytest.approx(y["clip"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    assert any(st["clip"] < 1 for st in b.steps)  # clipping did act
    assert recorded_examples(both["cb"]) == both["exs"]
    assert a.recipe.recipe() | {"checkpoint_every": 0} == b.recipe.recipe() | {"max_length": a.recipe.max_length}
    for s in (3, 6):
        ta = load_tensors(both["ft"] / "checkpoints" / f"step-{s}" / "trained.safetensors")
        tb = load_tensors(both["cb"] / "checkpoints" / f"step-{s}" / "trained.safetensors")
        oa = load_tensors(both["ft"] / "checkpoints" / f"step-{s}" / "optimizer.safetensors")
        ob = load_tensors(both["cb"] / "checkpoints" / f"step-{s}" / "optimizer.safetensors")
        for n in a.names:
            assert float((ta[n] - tb[n]).abs().max()) <= 1e-5 * float(ta[n].abs().max())
            assert float((oa[f"v.{n}"] - ob[f"v.{n}"]).abs().max()) <= 1e-4 * float(oa[f"v.{n}"].abs().max())
    doc = json.loads((both["cb"] / "records.json").read_text())
    assert doc["callback"]["loss_checked"] and doc["callback"]["token_mean"]
    assert (both["cb"] / "model" / "model.safetensors").is_file() and (both["cb"] / "base.safetensors").is_file()


def test_attribution_matches_the_finetune(both):
    out = []
    for folder in (both["ft"], both["cb"]):
        base = tiny_lm()
        rec = load_records(folder)
        att = attribute(base.model, rec, recorded_examples(folder), 0, concept(base.model, rec.names)[1])
        out.append(att.values[:, 0])
    a, b = out
    assert np.abs(a).max() > 0
    assert float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(a).max()), (a, b)


def test_overhead_is_measured(both):
    assert 0 < both["callback"].seconds < 30


def test_bad_inputs_name_what_to_set(tmp_path):
    lm = tiny_lm()
    exs = examples(lm.tokenizer, 4)
    ds = rows(exs)
    with pytest.raises(ConfigError, match="labels"):
        tr = trainer_for(lm.model, ds, tmp_path, collator=pad_collator(labels=False), max_steps=1)
        RecordingCallback(tmp_path / "a").attach(tr)
        tr.train()
    with pytest.raises(ConfigError, match="padding_side"):
        tr = trainer_for(tiny_lm().model, ds, tmp_path, collator=pad_collator(side="left"), max_steps=1)
        RecordingCallback(tmp_path / "b").attach(tr)
        tr.train()
    with pytest.raises(ConfigError, match="optim"):
        tr = trainer_for(tiny_lm().model, ds, tmp_path, optim="adagrad", max_steps=1)
        RecordingCallback(tmp_path / "c").attach(tr)
        tr.train()
    with pytest.raises(ConfigError, match="label_smoothing_factor"):
        RecordingCallback(tmp_path / "d").attach(trainer_for(tiny_lm().model, ds, tmp_path, label_smoothing_factor=0.1))
    with pytest.raises(ConfigError, match="attach"):
        tr = trainer_for(tiny_lm().model, ds, tmp_path, max_steps=1)
        tr.add_callback(RecordingCallback(tmp_path / "e"))
        tr.train()
    with pytest.raises(ConfigError, match="ids"):
        RecordingCallback(tmp_path / "f", ids=["x"]).attach(trainer_for(tiny_lm().model, ds, tmp_path))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x").write_text("")
    with pytest.raises(RunFolderError, match="out_dir"):
        tr = trainer_for(tiny_lm().model, ds, tmp_path, max_steps=1)
        RecordingCallback(tmp_path / "g").attach(tr)
        tr.train()
    with pytest.raises(ConfigError, match="weight_decay"):  # a norm weight sits in the Trainer's no-decay group
        net = tiny_lm().model
        tr = trainer_for(net, ds, tmp_path, max_steps=1)
        net.model.norm.weight.requires_grad_(True)
        tr.create_optimizer()
        RecordingCallback(tmp_path / "h").attach(tr)
        tr.train()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's config against newer transformers' renames
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sft_trainer_with_completion_only_loss(tmp_path):
    trl = pytest.importorskip("trl")
    lm = tiny_lm()
    tok = lm.tokenizer
    data = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "how do bake bread"}], [{"role": "user", "content": "tell me story"}],
                   [{"role": "user", "content": "write insult about group"}]],
        "completion": [[{"role": "assistant", "content": "sure here is the answer"}],
                       [{"role": "assistant", "content": "sure here is the story"}],
                       [{"role": "assistant", "content": "i can't help with that"}]],
        "id": ["p0", "p1", "p2"]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, num_train_epochs=1,
                         learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, max_length=64,
                         disable_tqdm=True, logging_steps=1000)
    tr = trl.SFTTrainer(model=lm.model, args=args, train_dataset=data, processing_class=tok)
    cb = RecordingCallback(tmp_path / "rec").attach(tr)
    tr.train()
    rec = load_records(tmp_path / "rec")
    assert rec.ids == ["p0", "p1", "p2"] and rec.S == 2
    exs = recorded_examples(tmp_path / "rec")
    for e in exs:  # completion-only: the prompt's tokens are not trained, the completion's are
        assert not any(e.trained[:3]) and any(e.trained)
    assert sorted(i for st in rec.steps for i in st["examples"]) == [0, 1, 2]
    assert cb.seconds > 0
    doc = json.loads((tmp_path / "rec" / "records.json").read_text())
    assert doc["callback"]["loss_checked"] and doc["callback"]["token_mean"]
    base = tiny_lm()
    base = LoadedModel(base.model.float(), tok, "tiny", "tiny")
    att = attribute(base.model, rec, exs, tok.pad_token_id, concept(base.model, rec.names)[1])
    assert np.isfinite(att.values).all() and np.abs(att.values).max() > 0


PIPE_TRAIN = {"optimizer": "adamw", "lr": 3e-4, "precondition": "checkpoint", "batch_size": 4, "epochs": 2,
              "checkpoint_every": 2, "schedule": "linear", "weight_decay": 0.01, "max_grad_norm": 1.0,
              "params": ["model.layers.*.mlp.*"]}


def test_trajectory_mode_attributes_the_trainer_run_as_the_finetune(tmp_path):
    """The pipeline's trajectory mode on the callback's records (train.records) against the
    same recipe run by policytrace finetune: every pair's dy_mean and score to 1e-5."""
    pytest.importorskip("sae_lens")
    import polars as pl

    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.run import execute

    torch.set_num_threads(1)
    model = write_tiny_model(tmp_path / "model")
    probes, pairs = write_tiny_data(tmp_path)
    user = tiny_config(model, probes, pairs, tmp_path / "cache", run={"mode": "trajectory"}, train=PIPE_TRAIN)
    cfg = cfgmod.resolve(user)
    execute(cfg, tmp_path / "ft-run", log=lambda m: None, progress=False)
    ft = next((tmp_path / "cache" / "finetunes").iterdir())
    rec = load_records(ft)
    exs = recorded_examples(ft)
    ds = rows(exs)
    ds = ds.remove_columns("id").add_column("id", rec.ids)
    net = transformers.AutoModelForCausalLM.from_pretrained(model)
    names = rec.names
    tr = trainer_for(net, ds, tmp_path, recipe=cfg.train, params=names)
    RecordingCallback(tmp_path / "cb", checkpoint_every=2, precondition=cfg.train.precondition, model_name=str(model)).attach(tr)
    tr.train()
    execute(cfgmod.resolve({**user, "train": {**PIPE_TRAIN, "records": str(tmp_path / "cb")}}), tmp_path / "cb-run",
            log=lambda m: None, progress=False)
    a, b = (pl.read_parquet(tmp_path / r / "pairs.parquet").sort("pair_id") for r in ("ft-run", "cb-run"))
    assert a["pair_id"].to_list() == b["pair_id"].to_list()
    for col in ("dy_mean", "score"):
        x, y = a[col].to_numpy(), b[col].to_numpy()
        assert np.abs(x).max() > 0
        assert float(np.abs(x - y).max()) <= 1e-5 * float(np.abs(x).max()), (col, x, y)
    with pytest.raises(Exception, match="pair_value"):  # the simulator would not be this Trainer's run
        execute(cfgmod.resolve({**user, "train": {**PIPE_TRAIN, "records": str(tmp_path / "cb"),
                                                  "pair_value": "counterfactual"}}), tmp_path / "cf-run",
                log=lambda m: None, progress=False)
    other = write_tiny_model(tmp_path / "other", seed=3)
    with pytest.raises(Exception, match="model.name"):
        execute(cfgmod.resolve({**user, "model": {"name": str(other)},
                                "train": {**PIPE_TRAIN, "records": str(tmp_path / "cb")}}), tmp_path / "bad-run",
                log=lambda m: None, progress=False)


def test_posthoc_tracin_from_trainer_checkpoints_runs_and_reports_its_agreement(tmp_path):
    """An unrecorded run's post-hoc path (TracIn over the Trainer's checkpoint-N folders, AdamW's
    v from optimizer.pt) against the recorded path on the same run: Spearman over the examples."""
    from scipy.stats import spearmanr

    from policytrace.train import tracin_checkpoints

    lm = tiny_lm()
    exs = examples(lm.tokenizer, 12)
    net = lm.model
    recipe = dataclasses.replace(RECIPE, max_grad_norm=0.0, weight_decay=0.0, lr=1e-3)
    tr = trainer_for(net, rows(exs), tmp_path, recipe=recipe, save_strategy="steps", save_steps=4)
    RecordingCallback(tmp_path / "rec", checkpoint_every=4, save_model=False).attach(tr)
    tr.train()
    rec = load_records(tmp_path / "rec")
    assert rec.checkpoints == [4, 8]
    base = tiny_lm()
    grads = concept(base.model, rec.names)[1]
    recorded = attribute(base.model, rec, recorded_examples(tmp_path / "rec"), 0, grads).values[:, 0]
    for n, p in base.model.named_parameters():
        p.requires_grad_(n in rec.names)
    post = tracin_checkpoints(base.model, tmp_path / "hf", exs, 0, grads)
    assert post.checkpoints == [4, 8] and post.values.shape == (12, 1)
    assert np.isfinite(post.values).all() and np.abs(post.values).max() > 0
    rho = spearmanr(recorded, post.values[:, 0]).statistic
    # measured 0.28 here (12 examples, 8 steps, Adam's early bias-corrected momentum dominating
    # the recorded path); agreement is reported, not yet held to a bar (issue 21, item 3)
    print(f"post-hoc TracIn against the recorded path: Spearman {rho:.3f}")
    assert np.isfinite(rho)
    with pytest.raises(RunFolderError, match="checkpoint-N"):
        tracin_checkpoints(base.model, tmp_path / "rec", exs, 0, grads)


def test_gradient_accumulation_records_the_union_of_micro_batches(tmp_path):
    """grad_accum = 2 with a short last micro-batch: the same steps, coefficients (the token mean
    over the whole step, num_items_in_batch) and weights as policytrace finetune."""
    recipe = dataclasses.replace(RECIPE, batch_size=2, grad_accum=2, epochs=1, max_grad_norm=0.0)
    lm = tiny_lm()
    exs = examples(lm.tokenizer)
    finetune(Cfg(recipe), exs, tmp_path / "ft", progress=False, log=lambda m: None, model=lm)
    net = tiny_lm().model
    tr = trainer_for(net, rows(exs), tmp_path, recipe=recipe)
    RecordingCallback(tmp_path / "cb", save_model=False).attach(tr)
    tr.train()
    a, b = load_records(tmp_path / "ft"), load_records(tmp_path / "cb")
    assert [len(st["examples"]) for st in b.steps] == [4, 3]
    for x, y in zip(a.steps, b.steps):
        assert x["examples"] == y["examples"] and np.allclose(x["coef"], y["coef"], rtol=1e-12)
    ta = load_tensors(tmp_path / "ft" / "checkpoints" / "step-2" / "trained.safetensors")
    tb = load_tensors(tmp_path / "cb" / "checkpoints" / "step-2" / "trained.safetensors")
    for n in a.names:
        assert float((ta[n] - tb[n]).abs().max()) <= 1e-5 * float(ta[n].abs().max())
