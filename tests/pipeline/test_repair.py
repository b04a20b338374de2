"""policytrace repair and bins on a tiny run: selections from the run's pair table, the three
methods against float64 transcriptions (weighted retraining, first-order removal, one unlearning
step), the stop rule, the causal check's arithmetic, byte-identical reruns, typed errors, the CLI
and the report section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _helpers import expect
from _tiny import tiny_causal_lm, tiny_config, tiny_tokenizer, write_tiny_data, write_tiny_model

from policytrace.errors import ConfigError, InvalidValueError, RunFolderError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run whose pair file carries an extra `source` column, opened once."""
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.run import execute
    from policytrace.pipeline.validate import open_state

    tmp = tmp_path_factory.mktemp("repair")
    model = write_tiny_model(tmp / "model")
    probes, pairs = write_tiny_data(tmp)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["source"] = "web" if i % 3 == 0 else "books"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfgmod.resolve(tiny_config(model, probes, pairs, tmp / "cache", update={"lr": 1e-2}))
    execute(cfg, tmp / "run", log=lambda m: None, progress=False)
    return tmp / "run", open_state(tmp / "run", lambda m: None), rows


def _repair(tiny_run, how, **kw):
    from policytrace.pipeline.repair import repair

    run, opened, _ = tiny_run
    return repair(run, how, progress=False, log=lambda m: None, opened=opened, **kw)


# --- selections from the run's pair table ---------------------------------------------------

def test_pair_table_selects_by_column_threshold_ids_and_bins(tiny_run):
    from policytrace.pipeline.repair.table import pair_table, ranked
    from policytrace.pipeline.rundir import RunDir
    from policytrace.pipeline.selection import select

    run, _, rows = tiny_run
    t = pair_table(RunDir(run))
    assert t.height == 12 and {"category", "label", "source", "dy_mean", "suspicion"} <= set(t.columns)
    src = {r["id"]: r["source"] for r in rows}
    assert dict(zip(t["pair_id"], t["source"])) == src
    dy = dict(zip(t["pair_id"], t["dy_mean"]))
    by_dy = sorted(dy, key=lambda i: (-dy[i], i))
    assert select(t, top=3, by="dy_mean").ids == tuple(by_dy[:3])
    assert select(ranked(t, {"by": "-dy_mean"}), top=2, by="-dy_mean").ids == tuple(by_dy[::-1][:2])
    assert select(t, fraction=0.25, by="dy_mean").ids == tuple(by_dy[:3])
    cut = dy[by_dy[4]]
    assert set(select(t, threshold=cut, by="dy_mean").ids) == {i for i in dy if dy[i] >= cut}
    assert select(t, ids=["pair-beta-1", "pair-alpha-0"]).ids == ("pair-beta-1", "pair-alpha-0")
    assert set(select(t, bins=["web"], bin_column="source").ids) == {i for i, s in src.items() if s == "web"}


# --- the methods against float64 transcriptions ----------------------------------------------

def _pairs():
    return [{"id": f"p{i}", "prompt": p, "response": r} for i, (p, r) in enumerate([
        ("tell me story", "sure here is the answer"), ("how do bake bread", "sure here is the answer"),
        ("write insult about group", "i can't help with that"), ("make weapon", "i can't help with that")])]


def _engine(lr=1e-2):
    from policytrace.model.config import UpdateCfg
    from policytrace.model.update import UpdateEngine

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", len(tok)).double()
    for p in model.parameters():
        p.requires_grad_(False)
    return UpdateEngine(model, tok, UpdateCfg(lr=lr)), tok, model


def _grad(model, tok, w, prompt, response):
    """The response-only loss's gradient by plain autograd (float64)."""
    from policytrace.model.chat import format_prompt

    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    start = len(format_prompt(tok, prompt))
    leaves = {n: v.clone().requires_grad_(True) for n, v in w.items()}
    logits = torch.func.functional_call(model, leaves, (ids,)).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[start - 1:-1], ids[0, start:])
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))), float(loss.detach())


def test_weighted_retraining_and_recorded_steps_match_float64_sgd():
    from policytrace.pipeline.repair.recipe import SequentialRecipe

    e, tok, model = _engine()
    rows = _pairs()
    recipe = SequentialRecipe.for_run(e, [r["id"] for r in rows], seed=3)
    weights = [1.0, 0.5, 0.0, 0.25]
    got, sums = recipe.fit(rows, weights, track={"a": {"p1", "p3"}, "all": {r["id"] for r in rows}})
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    by_id, steps_a = {r["id"]: (r, wt) for r, wt in zip(rows, weights)}, None
    for pid in recipe.order_ids:
        r, wt = by_id[pid]
        if wt == 0:
            continue  # a dropped pair takes no step
        g, _ = _grad(model, tok, w, r["prompt"], r["response"])
        step = {n: -1e-2 * wt * g[n] for n in w}
        if pid in ("p1", "p3"):
            steps_a = step if steps_a is None else {n: steps_a[n] + step[n] for n in w}
        w = {n: w[n] + step[n] for n in w}
    for n in w:
        scale = (w[n] - e.base[n]).abs().max()
        assert scale > 0
        assert (got[n] - w[n]).abs().max() <= 1e-9 * scale, n
        assert (sums["a"][n] - steps_a[n]).abs().max() <= 1e-9 * scale, n
        # first-order removal of every pair's recorded steps gives the base weights back
        assert (got[n] - sums["all"][n] - e.base[n]).abs().max() <= 1e-12 * max(1.0, float(e.base[n].abs().max())), n


def test_unlearning_step_is_clipped_gradient_ascent_and_the_stop_rule_undoes_a_bad_step():
    from policytrace.pipeline.repair.config import UnlearnCfg
    from policytrace.pipeline.repair.methods import unlearn
    from policytrace.pipeline.repair.recipe import Finetuned

    e, tok, model = _engine()
    rows = _pairs()

    class M:  # the Meter's interface the method uses, on the engine's losses
        class state:
            class model:
                engine = e

        def pair_loss(self, params, rs):
            return float(np.mean([e.loss_pair(_chat(r), params) for r in rs]))

        def mean_y(self, params):
            raise AssertionError("stop_at_base is off")

    from policytrace.pipeline.data import chat_pair as _chat

    ft = Finetuned(dict(e.base), None, None)
    sel, kept = rows[2:], rows[:2]
    cfg = UnlearnCfg(lr=1e-2, max_lr=1e-1, max_steps=1, max_grad_norm=0.5, margin=10.0, stop_at_base=False)
    got, info = unlearn(ft, M(), sel, kept, cfg, seed=0, base_mean=0.0)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = {n: torch.zeros_like(v) for n, v in w.items()}
    for r in sel:
        gi, _ = _grad(model, tok, w, r["prompt"], r["response"])
        g = {n: g[n] + gi[n] / len(sel) for n in w}
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
    assert norm > 0.5 and info["steps"][0]["clipped"] and info["steps"][0]["grad_norm"] == pytest.approx(norm, rel=1e-9)
    for n in w:
        want = w[n] + 1e-2 * (0.5 / norm) * g[n]
        assert (got[n] - want).abs().max() <= 1e-9 * (want - w[n]).abs().max() + 1e-15, n
    assert info["steps_taken"] == 1 and info["stopped"] == "max_steps"
    # the selected pairs' loss rose (ascent); with a tiny margin the step is undone
    assert M().pair_loss(got, sel) > M().pair_loss(ft.params, sel)
    strict = UnlearnCfg(lr=1e-1, max_lr=1e-1, max_steps=3, margin=1e-9, stop_at_base=False)
    back, info2 = unlearn(ft, M(), sel, kept, strict, seed=0, base_mean=0.0)
    assert info2["steps_taken"] == 0 and info2["steps"][0]["undone"] and "margin" in info2["stopped"]
    assert all(back[n] is ft.params[n] for n in ft.params)


def test_moved_back_and_the_controls_band_by_hand():
    from policytrace.pipeline.repair.core import _band, _causal
    from policytrace.pipeline.repair.measure import moved_back

    assert moved_back(1.0, 3.0, 2.5) == {"change": -0.5, "back": 0.5, "fraction": 0.25}
    assert moved_back(1.0, -1.0, 0.0) == {"change": 1.0, "back": 1.0, "fraction": 0.5}
    assert moved_back(1.0, 1.0, 0.0)["fraction"] is None
    band = _band([0.1, 0.3, 0.2])
    assert band == pytest.approx({"n": 3, "mean": 0.2, "sd": 0.1, "min": 0.1, "max": 0.3})
    res = {"behaviour": {"probes": {}}, "moved_back": {"probes": {"back": 0.6, "fraction": 0.5}}}
    ctl = [{"moved_back": {"probes": {"back": b}}} for b in (0.1, 0.3, 0.2)]
    c = _causal(res, ctl, {"probes": {"mean": 1.0}}, {"probes": {"mean": 2.2}})["probes"]
    assert c["ratio"] == pytest.approx(3.0) and c["z"] == pytest.approx(4.0) and c["finetune_change"] == pytest.approx(1.2)


def test_heldout_loss_is_the_mean_token_cross_entropy(tiny_run):
    from policytrace.pipeline.repair.measure import HELDOUT_MAX_TOKENS, Meter, heldout_texts

    _, (_, _, state), _ = tiny_run
    meter = Meter.for_run(state)
    assert len(heldout_texts()) == 32 and len(meter.texts) == 32
    lm = state.model.lm
    total = count = 0.0
    with torch.no_grad():
        for text in meter.texts:
            ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"][:HELDOUT_MAX_TOKENS]])
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert meter.heldout_loss(None) == pytest.approx(total / count, rel=1e-6)


# --- whole repairs ---------------------------------------------------------------------------

def test_retrain_repair_writes_a_model_and_reruns_byte_identically(tiny_run):
    from transformers import AutoModelForCausalLM

    from policytrace.pipeline.repair import RepairCfg

    run = tiny_run[0]
    how = {"top": 3, "by": "dy_mean"}
    a = _repair(tiny_run, how, cfg=RepairCfg(controls=2), name="a")
    _repair(tiny_run, how, cfg=RepairCfg(controls=2), name="b")
    for f in ("repair.json", "model/model.safetensors", "model/config.json"):
        assert (run / "repairs/a" / f).read_bytes() == (run / "repairs/b" / f).read_bytes(), f
    assert a["selection"]["ids"] == [c for c in a["repaired"]["ids"]] and len(a["controls"]) == 2
    for c in a["controls"]:  # controls: same size, same categories, other pairs
        cat = lambda i: i.split("-")[1]  # noqa: E731
        assert sorted(map(cat, c["ids"])) == sorted(map(cat, a["selection"]["ids"]))
        assert not set(c["ids"]) & set(a["selection"]["ids"])
    back = a["causal"]["probes"]
    assert back["back"] == pytest.approx(a["repaired"]["moved_back"]["probes"]["back"])
    assert a["finetuned"]["heldout_loss"] > 0 and a["repaired"]["kept_loss"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(run / "repairs/a/model")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in tiny_run[1][2].model.lm.model.parameters())


def test_first_order_and_unlearn_repairs_and_the_cli(tiny_run, capsys):
    from policytrace.pipeline.cli import main
    from policytrace.pipeline.repair import RepairCfg, UnlearnCfg, list_repairs

    run = tiny_run[0]
    # first-order without records: a typed error saying what to do
    expect(RunFolderError, lambda: _repair(tiny_run, {"top": 2, "by": "dy_mean"}, cfg=RepairCfg(method="first-order")),
           "no trajectory records", "--record-steps")
    fo = _repair(tiny_run, {"top": 2, "by": "dy_mean"}, cfg=RepairCfg(method="first-order", controls=1),
                 record_steps=True, name="fo")
    assert fo["record_steps"] and fo["repaired"]["details"]["update_norm"] > 0
    un = _repair(tiny_run, {"bins": ["alpha"]}, cfg=RepairCfg(method="unlearn", controls=1),
                 unlearn_cfg=UnlearnCfg(lr=1e-2, max_lr=1e-1, max_steps=2), name="un")
    assert 0 <= un["repaired"]["details"]["steps_taken"] <= 2 and un["selection"]["bins"] == ["alpha"]
    assert main(["repair", str(run), "--ids", "pair-alpha-0,pair-beta-1", "--weight", "0.5", "--controls", "1",
                 "--name", "cli", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "retrain of 2 pairs" in out and "ratio" in out and "held-out text" in out
    assert {"fo", "un", "cli"} <= {n for n, _ in list_repairs(run)}
    assert main(["bins", str(run), "--by", "source"]) == 0
    assert "books" in capsys.readouterr().out
    assert main(["bins", str(run), "--by", "category", "--contrast", str(run), "--perm", "50"]) == 0
    assert "verdict" in capsys.readouterr().out


def test_report_has_a_repair_section_when_the_folder_holds_repairs(tiny_run):
    from policytrace.pipeline.report import write_report
    from policytrace.pipeline.report.frames import open_run
    from policytrace.pipeline.report.view import repairs

    run = tiny_run[0]
    if not (run / "repairs").exists():
        _repair(tiny_run, {"top": 2, "by": "dy_mean"}, name="rep")
    view = repairs(open_run(run))
    assert view is not None and "ratio to random" in view.columns and view.height >= 1
    html = write_report(run).read_text()
    assert 'id="repairs"' in html and "held-out loss after" in html


# --- typed errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("how, fragment", [
    ({"threshold": 1e9, "by": "dy_mean"}, "holds no pair"),
    ({"ids": ["pair-alpha-0", "nope"]}, "not pairs of the run"),
    ({"bins": ["gamma"]}, "not values of column"),
    ({"top": 2, "by": "no_such_column"}, "no column 'no_such_column'"),
    ({"top": 2, "by": "-label"}, "not numeric"),
])
def test_bad_selections_are_typed_errors(tiny_run, how, fragment):
    expect(InvalidValueError, lambda: _repair(tiny_run, how), fragment)


def test_bad_settings_are_typed_errors(tiny_run):
    from policytrace.pipeline.cli import main
    from policytrace.pipeline.repair import RepairCfg, UnlearnCfg

    expect(ConfigError, lambda: RepairCfg(weight=1.5), "repair.weight")
    expect(ConfigError, lambda: RepairCfg(method="unlearn", weight=0.5), "repair.weight", "'retrain' only")
    expect(ConfigError, lambda: UnlearnCfg(lr=1.0), "unlearn.lr", "max_lr")
    expect(ConfigError, lambda: UnlearnCfg(margin=0), "unlearn.margin")
    all_ids = [r["id"] for r in tiny_run[2]]
    expect(InvalidValueError, lambda: _repair(tiny_run, {"ids": all_ids}, cfg=RepairCfg(controls=0)), "every pair")
    expect(ConfigError, lambda: _repair(tiny_run, {"top": 1, "by": "dy_mean"}, name="finetuned"), "reserved")
    # the run's update.lr (1e-2) is above the default cap: unlearning says so
    expect(InvalidValueError, lambda: _repair(tiny_run, {"top": 1, "by": "dy_mean"},
                                              cfg=RepairCfg(method="unlearn"), unlearn_cfg=UnlearnCfg(max_lr=1e-3)),
           "exceeds unlearn.max_lr")
    assert main(["repair", str(tiny_run[0]), "--top", "0", "--by", "dy_mean"]) == 2
    assert main(["bins", str(tiny_run[0]), "--by", "nope"]) == 2


def test_repair_config_table_is_documented():
    from policytrace._tables import undocumented
    from policytrace.pipeline.repair.config import RepairCfg, UnlearnCfg, markdown_table

    assert undocumented(RepairCfg) == [] and undocumented(UnlearnCfg) == []
    md = markdown_table()
    assert "`--unlearn-margin`" in md and "`--weight`" in md


def test_train_recipe_retrains_the_kept_pairs_with_the_run_s_train_table(tiny_run, tmp_path):
    import dataclasses

    from policytrace.gradients.batched import TrainExample
    from policytrace.model.chat import chat_pair_tokens
    from policytrace.pipeline.data import chat_pair
    from policytrace.pipeline.repair import RepairCfg
    from policytrace.pipeline.repair.recipe import TrainRecipe, load_weights
    from policytrace.train.finetuning import finetune
    from policytrace.model.loading import LoadedModel

    _, (_, _, state), _ = tiny_run
    cfg = dataclasses.replace(state.cfg, train=dataclasses.replace(state.cfg.train, optimizer="sgd", lr=1e-2,
                                                                    batch_size=3, epochs=1))
    lm = state.model.lm
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    rows = list(state.inputs.pairs.iter_rows(named=True))
    weights = [0.0 if i % 4 == 0 else (0.5 if i % 4 == 1 else 1.0) for i in range(len(rows))]
    got, _ = TrainRecipe(cfg, lm, tmp_path / "work").fit(rows, weights)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # scratch removed
    for n, p in lm.model.named_parameters():  # the run's model is never trained
        assert torch.equal(p, before[n]), n
    # the same as issue 21's finetune on the kept pairs with their weights, on a fresh copy
    import copy

    kept = [(r, w) for r, w in zip(rows, weights) if w > 0]
    ex = [TrainExample(*(lambda t: (tuple(t.ids), tuple(t.mask)))(chat_pair_tokens(lm.tokenizer, chat_pair(r), 512)))
          for r, _ in kept]
    net = copy.deepcopy(lm.model)
    finetune(cfg, ex, tmp_path / "ref", weights=np.array([w for _, w in kept]), progress=False,
             ids=[r["id"] for r, _ in kept], log=lambda m: None, model=LoadedModel(net, lm.tokenizer, lm.name))
    want = load_weights(tmp_path / "ref" / "model", lm.model)
    moved = 0
    for n in want:
        assert torch.equal(got[n], want[n]), n
        moved += int(not torch.equal(want[n], before[n]))
    assert moved > 0
    d = _repair(tiny_run, {"top": 2, "by": "dy_mean"}, cfg=RepairCfg(controls=1), recipe="train", name="tr")
    assert d["recipe"]["kind"] == "train" and d["recipe"]["optimizer"] == "adamw"
    assert (tiny_run[0] / "repairs" / "finetuned-train" / "model" / "model.safetensors").exists()
    assert (tiny_run[0] / "repairs" / "finetuned-train" / "records.json").exists()


def test_readme_repair_flags_table_is_generated():
    from pathlib import Path

    from policytrace.pipeline.repair.config import markdown_table

    text = (Path(__file__).parents[2] / "README.md").read_text()
    begin, end = "<!-- repair-flags:begin -->\n", "<!-- repair-flags:end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == markdown_table(), \
        "regenerate README's repair flags table from policytrace.pipeline.repair.config.markdown_table()"


def test_first_order_removal_of_a_train_fine_tune_uses_its_trajectory_records(tiny_run, tmp_path):
    import dataclasses

    from policytrace.pipeline.repair import RepairCfg
    from policytrace.pipeline.repair.recipe import TrainRecipe

    _, (_, _, state), _ = tiny_run
    # precondition = "step": the pairs' shares add up to the whole displacement (issue 21), so
    # removing every pair gives the base weights back, to float32 rounding
    cfg = dataclasses.replace(state.cfg, train=dataclasses.replace(state.cfg.train, precondition="step", epochs=1))
    lm = state.model.lm
    rows = list(state.inputs.pairs.iter_rows(named=True))
    recipe = TrainRecipe(cfg, lm, tmp_path / "work")
    ft = recipe.fit_into(tmp_path / "ft", rows, [1.0] * len(rows))
    records = recipe.records(tmp_path / "ft", rows)
    upd = records([r["id"] for r in rows])
    some = records([r["id"] for r in rows[:3]])
    base = dict(lm.model.named_parameters())
    for n, d in upd.items():
        moved = (ft[n] - base[n]).abs().max()
        assert moved > 0, n
        # float32 rounding of the weights themselves (spacing ~1.2e-7 at 1) plus a sliver of the move
        tol = 8 * torch.finfo(torch.float32).eps * float(base[n].abs().max()) + 1e-4 * float(moved)
        assert float((ft[n] - d - base[n]).abs().max()) <= tol, n
        assert not torch.equal(some[n], d), n
    fo = _repair(tiny_run, {"top": 2, "by": "dy_mean"}, cfg=RepairCfg(method="first-order", controls=1),
                 recipe="train", name="fo-train")
    assert fo["recipe"]["kind"] == "train" and fo["repaired"]["details"]["update_norm"] > 0


def test_a_second_probe_set_is_measured_beside_the_run_s_probes(tiny_run):
    from policytrace.pipeline.repair import RepairCfg

    run, (_, _, state), _ = tiny_run
    probes = state.cfg.data.probes  # the run's own probe file as the second set: the same numbers
    d = _repair(tiny_run, {"top": 2, "by": "dy_mean"}, cfg=RepairCfg(controls=1), probes2=probes, name="p2")
    assert set(d["causal"]) == {"probes", "probes.jsonl"} and d["probes2"] == "probes.jsonl"
    a, b = d["causal"]["probes"], d["causal"]["probes.jsonl"]
    assert b["back"] == pytest.approx(a["back"], abs=1e-9) and b["ratio"] == pytest.approx(a["ratio"], rel=1e-6)
    assert d["repaired"]["behaviour"]["probes.jsonl"]["by_category"] == pytest.approx(
        d["repaired"]["behaviour"]["probes"]["by_category"], abs=1e-9)
