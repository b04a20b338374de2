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
    from policytrace.model.config import UpdateCfg
    from policytrace.model.update import UpdateEngine

    from _tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", len(tok)).double()
    for p in model.parameters():
        p.requires_grad_(False)
    e = UpdateEngine(model, tok, UpdateCfg(lr=1e-2))
    single = e.update("tell me story", "sure here is the answer", "p")
    chained = e.update("tell me story", "sure here is the answer", "p", from_params=None)
    for n in single:
        assert torch.equal(single[n], chained[n])
    # Two pairs in sequence equal two manual SGD steps.
    two = e.update("how do bake bread", "sure here is the answer", "q", from_params=single)
    again = e.update("how do bake bread", "sure here is the answer", "q", from_params=e.update("tell me story", "sure here is the answer", "p"))
    for n in two:
        assert torch.equal(two[n], again[n])
    changed = [n for n in two if not torch.equal(two[n], single[n])]
    assert changed


def test_validate_tiny_run(tmp_path):
    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.cli import main
    from policytrace.pipeline.run import execute

    from _tiny import tiny_config, write_tiny_data, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    probes, pairs = write_tiny_data(tmp_path)
    cfg = cfgmod.resolve(tiny_config(model, probes, pairs, tmp_path / "cache", update={"lr": 1e-2}))
    execute(cfg, tmp_path / "run", log=lambda m: None, progress=False)
    assert main(["validate", str(tmp_path / "run"), "--subsets", "6", "--planted", "4", "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "run" / "validation.parquet")
    agg = pl.read_parquet(tmp_path / "run" / "aggregates.parquet")
    assert set(agg["by"]) == {"category", "label"} and agg["mean_z"].is_finite().all()
    assert "decomposition_both_methods_per_100_pairs_s" in json.loads((tmp_path / "run" / "validation.json").read_text())["timings"]
    planted = pl.read_parquet(tmp_path / "run" / "planted.parquet")
    assert planted.height == 22 and set(planted["kind"]) == {"planted_refusal", "planted_compliance"}
    assert planted["n_planted"].to_list() == [2] * 22
    assert planted["auc"].is_between(0, 1).all()
    assert set(frame["method"]) == {"score_exact", "score_first_order", "dy_mean", "pred_dy_mean", "suspicion", "random",
                                    "grad_cosine", "concept_influence", "behaviour_first_order",
                                    "vector_filter", "projection_difference"}
    assert set(frame["target"]) == {"policy", "behaviour"}
    assert frame.height == 22
    doc = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert -1 <= doc["agreement"]["spearman_exact_first_order"] <= 1
    cached = sorted((tmp_path / "run" / "validation").glob("retrain-*.json"))
    assert len(cached) >= 6
    rem = pl.read_parquet(tmp_path / "run" / "removal.parquet")
    assert rem.height == 11 and set(rem["k"]) == {1}
    assert {"behaviour_drop", "behaviour_drop_random", "policy_drop", "policy_drop_random", "removed"} <= set(rem.columns)
    # Resuming reuses the cached subsets and reproduces the same table.
    before = frame
    assert main(["validate", str(tmp_path / "run"), "--subsets", "6", "--quiet"]) == 0
    assert pl.read_parquet(tmp_path / "run" / "validation.parquet").equals(before)


def test_validate_refuses_unfinished(tmp_path):
    from policytrace.pipeline.validate import validate

    with pytest.raises(RunFolderError, match="manifest.json is missing"):
        validate(tmp_path)


def test_gradient_baselines_are_first_order_changes(tmp_path):
    """−lr·∇L_pairᵀ∇ȳ and −lr·∇L_pairᵀ∇f equal the central difference of the mean score and of
    the policy readout along the SGD step (±lr·∇L_pair); the cosine is a cosine.

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
        assert gb["grad_cosine"].abs().max() <= 1 + 1e-12
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
        g = engine.gradient(ctx.inputs.pairs["prompt"][0], ctx.inputs.pairs["response"][0])
        cos = -_dot(g, g_y) / np.sqrt(_dot(g, g) * _dot(g_y, g_y))
        np.testing.assert_allclose(gb["grad_cosine"][0], cos, rtol=1e-12)


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
    from policytrace.model.chat import pair_tokens
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
    full, start = pair_tokens(lm.tokenizer, r["prompt"], r["response"], r["id"], 512)
    seen = {}
    layer = lm.model.model.layers[cfg.sae.layer]
    h = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        lm.model(torch.tensor([full]))
    h.remove()
    manual = seen["h"][0, start:].double().mean(0).numpy() @ v
    np.testing.assert_allclose(pb["vector_filter"][0], manual, rtol=1e-6)
    assert own_response(ctx, r["prompt"], 4) == own_response(ctx, r["prompt"], 4)  # greedy: deterministic
    assert pb.height == ctx.inputs.pairs.height and pb["projection_difference"].is_finite().all()


def test_auc_hand_computed():
    from policytrace.numeric.metrics import auc as _auc

    # positives 0.9, 0.4; negatives 0.8, 0.1: pairs (0.9>0.8, 0.9>0.1, 0.4<0.8, 0.4>0.1) -> 3/4
    assert _auc(np.array([0.9, 0.4, 0.8, 0.1]), np.array([True, True, False, False])) == pytest.approx(0.75)
    assert _auc(np.array([1.0, 1.0]), np.array([True, False])) == pytest.approx(0.5)  # a tie counts half
    assert np.isnan(_auc(np.array([1.0, 2.0]), np.array([True, True])))
