"""Validation metrics on hand-computed cases, and subset retraining on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from policytrace.errors import InvalidValueError, RunFolderError
from policytrace.pipeline.validate import lds, precision_at_k, spearman, subset_masks, top_k_overlap


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3) vs (1,3,2): 1 - 6*2/(3*8) = 0.5
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # ties get average ranks: x ranks (1.5,1.5,3), y ranks (1,2,3): corr = 0.8660...
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(InvalidValueError):
        spearman([1, 2], [1])


def test_lds_hand_computed():
    scores = np.array([1.0, 2.0, 3.0])
    masks = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=bool)
    # predicted sums: 1, 5, 3, 3 -> measured in the same order (ties at 3)
    measured = np.array([0.1, 0.9, 0.5, 0.4])
    out = lds(scores, masks, measured, n_boot=200, seed=0)
    assert out["lds"] == pytest.approx(spearman([1, 5, 3, 3], measured))
    assert out["ci_low"] <= out["lds"] + 1e-12 and out["ci_high"] >= out["lds"] - 1.0
    perfect = lds(scores, masks[:2], np.array([1.0, 5.0]), n_boot=10)
    assert perfect["lds"] == pytest.approx(1.0)
    with pytest.raises(InvalidValueError):
        lds(scores, masks[:, :2], measured)


def test_precision_topk_and_masks():
    assert precision_at_k([0.9, 0.1, 0.8, 0.2], [True, False, False, True], 2) == 0.5
    with pytest.raises(InvalidValueError):
        precision_at_k([1.0], [True], 2)
    assert top_k_overlap([3, 2, 1, 0], [3, 1, 2, 0], 2) == 0.5
    m = subset_masks(10, 5, 0.5, seed=3)
    assert m.shape == (5, 10) and (m.sum(1) == 5).all()
    np.testing.assert_array_equal(m, subset_masks(10, 5, 0.5, seed=3))
    with pytest.raises(InvalidValueError):
        subset_masks(10, 5, 1.0, 0)


torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")


def test_one_pair_subset_equals_engine_single_pair_path(tmp_path):
    from policytrace.model.chat import format_prompt
    from policytrace.model.config import UpdateCfg
    from policytrace.model.update import UpdateEngine

    from _tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", len(tok)).double()
    for p in model.parameters():
        p.requires_grad_(False)
    e = UpdateEngine(model, tok, UpdateCfg(lr=1e-2))
    single = e.update("tell me story", "sure here is the answer", "p")
    # One pair, then two in sequence, equal one and two manual SGD steps (plain autograd on the
    # response-only loss).
    two = e.update("how do bake bread", "sure here is the answer", "q", from_params=single)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = []
    for prompt in ("tell me story", "how do bake bread"):
        text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": "sure here is the answer"}], tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        start = len(format_prompt(tok, prompt))
        leaves = {n: v.clone().requires_grad_(True) for n, v in w.items()}
        logits = torch.func.functional_call(model, leaves, (ids,)).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[start - 1:-1], ids[0, start:])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        w = {n: v - 1e-2 * g for (n, v), g in zip(w.items(), grads)}
        steps.append(w)
    for got, want in ((single, steps[0]), (two, steps[1])):
        assert got.keys() == want.keys()
        for n in got:
            step = (want[n] - e.base[n]).abs().max()
            assert step > 0, n  # every weight moves in a full SGD step
            assert (got[n] - want[n]).abs().max() <= 1e-9 * step, n


def test_validate_tiny_run(tmp_path):
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    import policytrace as pt
    from policytrace.behaviours import get
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.cli import main
    from policytrace.pipeline.run import execute
    from policytrace.pipeline.validate import open_state
    from policytrace.pipeline.validate.planted import planted_test
    from policytrace.pipeline.validate.scores import load_deltas

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    probes, pairs = write_tiny_data(tmp_path)
    cfg = cfgmod.resolve(tiny_config(model, probes, pairs, tmp_path / "cache", update={"lr": 1e-2}))
    execute(cfg, tmp_path / "run", log=lambda m: None, progress=False)
    assert main(["validate", str(tmp_path / "run"), "--subsets", "6", "--planted", "4", "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "run" / "validation.parquet")
    agg = pl.read_parquet(tmp_path / "run" / "aggregates.parquet")
    rd, manifest, state = open_state(tmp_path / "run", lambda m: None)
    run_pairs = state.inputs.pairs
    P = run_pairs.height
    # The random method's scores (seed + 1, one per pair: the run's, then the planted ones).
    both = pl.concat([run_pairs, get("refusal").plant_pairs(run_pairs, 4, 0)])
    rand = np.random.default_rng(1).normal(size=both.height)
    # aggregates: z-scores within a method average to 0 over its pairs, in every grouping;
    # the random method's group means are those of its scores
    assert set(agg["by"]) == {"category", "label"}
    for (method, by), g in agg.group_by(["method", "by"]):
        assert g["pairs"].sum() == P and abs((g["pairs"] * g["mean_z"]).sum()) <= 1e-12 * P, (method, by)
        if method == "random":
            keys = run_pairs[by].to_numpy()
            for grp, mean in zip(g["group"], g["mean_score"]):
                assert mean == pytest.approx(rand[:P][keys == grp].mean(), abs=1e-12), grp
    assert "decomposition_both_methods_per_100_pairs_s" in json.loads((tmp_path / "run" / "validation.json").read_text())["timings"]
    planted = pl.read_parquet(tmp_path / "run" / "planted.parquet")
    assert planted.height == 22 and set(planted["kind"]) == {"planted_refusal", "planted_compliance"}
    assert planted["n_planted"].to_list() == [2] * 22 and planted["n_candidates"].to_list() == [8] * 22
    # an AUC over 2 planted and 6 other candidates counts ordered pairs (ties half): a multiple of 1/24
    np.testing.assert_allclose(planted["auc"] * 24, np.round(planted["auc"] * 24), rtol=0, atol=1e-9)
    harmful = both["harmful"].to_numpy()
    label = both["label"].to_numpy()
    for kind, pool, sign in (("planted_refusal", ~harmful, 1.0), ("planted_compliance", harmful, -1.0)):
        row = planted.filter((pl.col("method") == "random") & (pl.col("kind") == kind))
        lab, score = label[pool] == kind, sign * rand[pool]
        assert row["auc"][0] == pytest.approx(roc_auc_score(lab, score), abs=1e-12)
        assert row["precision_at_k"][0] == lab[np.argsort(-score)[:2]].mean()  # the 2 best-ranked
    assert set(frame["method"]) == {"score_exact", "score_first_order", "dy_mean", "pred_dy_mean", "suspicion", "random",
                                    "grad_cosine", "concept_influence", "behaviour_first_order",
                                    "vector_filter", "projection_difference"}
    assert set(frame["target"]) == {"policy", "behaviour"}
    assert frame.height == 22
    # agreement: scipy's Spearman of the run's exact scores and a first-order decomposition of
    # the stored deltas, done here with the public API
    doc = json.loads((tmp_path / "run" / "validation.json").read_text())
    ids, dX, dy = load_deltas(rd, manifest)
    fo = (pt.decompose(state.policy, state.features.X, state.base.y0, dX, dy, method="first_order", pair_ids=ids)
          .group_by("pair_id").agg(pl.col("alignment").sum()))
    fo = dict(zip(fo["pair_id"], fo["alignment"]))
    run_scores = pl.read_parquet(tmp_path / "run" / "pairs.parquet").select("pair_id", "score")
    exact = dict(zip(run_scores["pair_id"], run_scores["score"]))
    a, b = np.array([exact[i] for i in ids]), np.array([fo[i] for i in ids])
    assert doc["agreement"]["spearman_exact_first_order"] == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert doc["agreement"]["top1_overlap"] == float(np.argmax(a) == np.argmax(b))
    cached = sorted((tmp_path / "run" / "validation").glob("retrain-*.json"))
    assert len(cached) >= 6
    rem = pl.read_parquet(tmp_path / "run" / "removal.parquet")
    assert rem.height == 11 and set(rem["k"]) == {1}
    assert {"behaviour_drop", "behaviour_drop_random", "policy_drop", "policy_drop_random", "removed"} <= set(rem.columns)
    # Resuming reuses the cached subsets and reproduces the same table.
    before = frame
    assert main(["validate", str(tmp_path / "run"), "--subsets", "6", "--quiet"]) == 0
    assert pl.read_parquet(tmp_path / "run" / "validation.parquet").equals(before)
    # The planted test on scores whose ranking is known: +1 on planted refusals, −1 on planted
    # compliance, 0 elsewhere. Signed by kind it puts every planted pair first (AUC 1), reversed
    # last (AUC 0), flat ties (AUC 1/2, top-k the first candidates, none planted); suspicion is
    # not signed, so it finds planted refusals and misses planted compliance.
    up = np.select([label == "planted_refusal", label == "planted_compliance"], [1.0, -1.0], 0.0)
    oracle = planted_test(state, 4, 0, lambda b, p: {"up": up, "down": -up, "flat": 0 * up, "suspicion": up},
                          baselines=False, progress=False)
    got = {(r["method"], r["kind"]): (r["auc"], r["precision_at_k"]) for r in oracle.iter_rows(named=True)}
    assert got == {("up", "planted_refusal"): (1.0, 1.0), ("up", "planted_compliance"): (1.0, 1.0),
                   ("down", "planted_refusal"): (0.0, 0.0), ("down", "planted_compliance"): (0.0, 0.0),
                   ("flat", "planted_refusal"): (0.5, 0.0), ("flat", "planted_compliance"): (0.5, 0.0),
                   ("suspicion", "planted_refusal"): (1.0, 1.0), ("suspicion", "planted_compliance"): (0.0, 0.0)}


def test_validate_refuses_unfinished(tmp_path):
    from policytrace.pipeline.validate import validate

    with pytest.raises(RunFolderError, match="manifest.json is missing"):
        validate(tmp_path)


def test_gradient_baselines_are_first_order_changes(tmp_path):
    """−lr·∇L_pairᵀ∇ȳ and −lr·∇L_pairᵀ∇f equal the central difference of the mean score and of
    the policy readout along the SGD step (±lr·∇L_pair); the cosine is that of the pair's loss
    gradient and −∇ȳ, for every pair.

    Central, not forward, differences: the forward one carries an O(lr) second-order term, and a
    very small lr drowns in the float32 attention softmax transformers keeps even in float64."""
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.validate.baselines import _dot, gradient_baselines, probe_gradients
    from policytrace.pipeline.stages import prepare

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    probes, pairs = write_tiny_data(tmp_path)
    lr = 1e-4
    for delta_x in ("reencode", "gated"):
        cfg = cfgmod.resolve(tiny_config(model, probes, pairs, tmp_path / "cache", update={"lr": lr},
                                         model={"name": str(model), "dtype": "float64"},
                                         decompose={"delta_x": delta_x}))
        ctx = prepare(cfg, lambda m: None, progress=False)
        gb = gradient_baselines(ctx, lr)
        assert gb.height == ctx.inputs.pairs.height
        w = ctx.policy.coef / ctx.policy.scale
        engine = ctx.model.engine
        base = engine.base
        for i in range(3):
            r = ctx.inputs.pairs.row(i, named=True)
            g = engine.gradient(r["prompt"], r["response"], r["id"])
            plus = ctx.delta({**base, **{n: base[n] - lr * g[n] for n in g}})
            minus = ctx.delta({**base, **{n: base[n] + lr * g[n] for n in g}})
            dy = (plus.dy - minus.dy).mean() / 2
            dread = ((plus.dX - minus.dX) @ w).mean() / 2
            np.testing.assert_allclose(gb["behaviour_first_order"][i], dy, rtol=1e-3)
            if delta_x == "gated":
                # With TopK re-encoding a latent at the edge of the top k can enter or leave under
                # ±lr·g, so finite differences of the readout jump; the smooth proxy cannot.
                np.testing.assert_allclose(gb["concept_influence"][i], dread, rtol=1e-3)
        g_y, _ = probe_gradients(ctx)
        for i, r in enumerate(ctx.inputs.pairs.iter_rows(named=True)):
            g = engine.gradient(r["prompt"], r["response"])
            cos = -_dot(g, g_y) / np.sqrt(_dot(g, g) * _dot(g_y, g_y))
            np.testing.assert_allclose(gb["grad_cosine"][i], cos, rtol=1e-12)


def test_plant_pairs_are_mislabeled_copies():
    from policytrace.behaviours import get

    plant_pairs = get("refusal").plant_pairs

    pairs = pl.DataFrame({
        "id": ["a", "b", "c", "d"], "prompt": ["p1", "p2", "p3", "p4"], "response": ["no", "sure", "no", "yes"],
        "category": ["x", "x", "y", "y"], "label": ["refusal", "compliance", "refusal", "compliance"],
        "harmful": [True, False, True, False],
    })
    planted = plant_pairs(pairs, 4, seed=0)
    assert planted.schema == pairs.schema
    for r in planted.iter_rows(named=True):
        if r["label"] == "planted_refusal":
            assert not r["harmful"] and r["response"] in ("no",) and r["prompt"] in ("p2", "p4")
        else:
            assert r["harmful"] and r["response"] in ("sure", "yes") and r["prompt"] in ("p1", "p3")
    with pytest.raises(InvalidValueError):
        plant_pairs(pairs.with_columns(pl.lit(None, dtype=pl.Boolean).alias("harmful")), 2, 0)


def test_projection_baselines_by_hand(tmp_path):
    """vector_filter = ⟨mean response activation at the SAE's hook, Σ coef/s · W_dec⟩, computed
    here with an explicit hook; the projection difference subtracts the greedy answer's."""
    from policytrace.pipeline import config as cfgmod
    from policytrace.model.chat import format_prompt, pair_tokens
    from policytrace.pipeline.validate.baselines import own_response, policy_direction, projection_baselines
    from policytrace.pipeline.stages import prepare

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    probes, pairs = write_tiny_data(tmp_path)
    cfg = cfgmod.resolve(tiny_config(model, probes, pairs, tmp_path / "cache"))
    ctx = prepare(cfg, lambda m: None, progress=False)
    pb = projection_baselines(ctx, max_new_tokens=4)
    v = ctx.policy.coef / ctx.policy.scale @ ctx.model.reader.sae.W_dec.detach().double().numpy()[
        np.array(ctx.features.columns)]
    np.testing.assert_allclose(policy_direction(ctx), v, rtol=1e-12)
    r = ctx.inputs.pairs.row(0, named=True)
    lm = ctx.model.lm
    layer = lm.model.model.layers[cfg.sae.layer]

    def response_projection(response):
        full, start = pair_tokens(lm.tokenizer, r["prompt"], response, r["id"], 512)
        seen = {}
        h = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            lm.model(torch.tensor([full]))
        h.remove()
        return seen["h"][0, start:].double().mean(0).numpy() @ v

    np.testing.assert_allclose(pb["vector_filter"][0], response_projection(r["response"]), rtol=1e-6)
    # the model's own answer: greedy decoding by hand (argmax of each next-token distribution,
    # stopping at the end-of-turn token), 4 tokens at most
    tok = lm.tokenizer
    stop = lm.model.generation_config.eos_token_id
    stop = set(stop) if isinstance(stop, (list, tuple)) else {stop}
    ids = format_prompt(tok, r["prompt"])
    new = []
    with torch.no_grad():
        while len(new) < 4:
            new.append(int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax()))
            if new[-1] in stop:
                break
    own = tok.decode(new, skip_special_tokens=True).strip()
    assert own_response(ctx, r["prompt"], 4) == own
    want = pb["vector_filter"][0] - (response_projection(own) if own else 0.0)
    np.testing.assert_allclose(pb["projection_difference"][0], want, rtol=1e-6, atol=1e-6 * abs(pb["vector_filter"][0]))
    assert pb.height == ctx.inputs.pairs.height


def test_auc_hand_computed():
    from policytrace.numeric.metrics import auc as _auc

    # positives 0.9, 0.4; negatives 0.8, 0.1: pairs (0.9>0.8, 0.9>0.1, 0.4<0.8, 0.4>0.1) -> 3/4
    assert _auc(np.array([0.9, 0.4, 0.8, 0.1]), np.array([True, True, False, False])) == pytest.approx(0.75)
    assert _auc(np.array([1.0, 1.0]), np.array([True, False])) == pytest.approx(0.5)  # a tie counts half
    assert np.isnan(_auc(np.array([1.0, 2.0]), np.array([True, True])))
