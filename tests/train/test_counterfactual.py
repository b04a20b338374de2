"""Counterfactual pair values (train.pair_value = "counterfactual") on a tiny float64 model: the
simulator is the recipe's optimizer run on fixed per-example gradients (equal to
train.optim.Optimizer to rounding), it predicts a real retrain of a subset at a small lr, and
the Banzhaf values of an additive game are its terms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from policytrace.errors import InvalidValueError  # noqa: E402
from policytrace.train import counterfactual as cf  # noqa: E402
from policytrace.train.config import TrainCfg  # noqa: E402
from policytrace.train.finetuning import finetune, loss_coefficients, plan  # noqa: E402
from policytrace.train.optim import Optimizer, lr_at  # noqa: E402
from policytrace.train.trajectory import Replay, flat, load_records  # noqa: E402

from _trajectory import Cfg, concept, examples, tiny_lm  # noqa: E402

pytestmark = pytest.mark.model

PARAMS = ("model.layers.1.mlp.*", "model.norm.weight")
ADAMW = TrainCfg(optimizer="adamw", lr=2e-3, batch_size=3, epochs=2, weight_decay=0.05, max_grad_norm=0.5,
                 warmup_steps=1, schedule="linear", params=PARAMS)


def fine_tuned(tmp, recipe, name="ft"):
    lm = tiny_lm()
    exs = examples(lm.tokenizer)
    finetune(Cfg(recipe), exs, tmp / name, progress=False, log=lambda m: None, model=lm)
    return lm, exs, load_records(tmp / name)


def gradients(rec, exs):
    base = tiny_lm()
    replay = Replay(base.model, rec, exs, 0)
    return base, replay, cf.pair_gradients(replay, rec), flat(replay.base, rec.names)


def naive(rec, exs, g, theta0, members):
    """The same run through train.optim.Optimizer (the fine-tune's own optimizer)."""
    cfg = rec.recipe
    mem = sorted(members)
    theta = {"x": theta0.clone()}
    opt = Optimizer(cfg, theta)
    steps = plan(cfg, len(mem))
    for s, st in enumerate(steps, start=1):
        c = loss_coefficients(cfg, [exs[i] for i in mem], st.examples, np.ones(len(mem)))
        x = sum(float(ci) * g[mem[j]] for ci, j in zip(c, st.examples))
        opt.step(theta, {"x": x}, lr_at(cfg, s, len(steps)), opt.clip_scale({"x": x})[0])
    return theta["x"] - theta0


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_simulator_is_the_recipes_optimizer(tmp_path, opt):
    recipe = dataclasses.replace(ADAMW, optimizer=opt, momentum=0.9)
    _, exs, rec = fine_tuned(tmp_path, recipe)
    _, _, g, theta0 = gradients(rec, exs)
    sim = cf.Simulator(rec, exs, g, theta0)
    for members in ([0, 2, 3, 6], [1, 4, 5], list(range(7))):
        want = naive(rec, exs, g, theta0, members)
        got = sim.displacement(np.array(members)).clone()
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max()), members
    assert float(sim.displacement(np.array([], dtype=int)).abs().max()) == 0.0


def test_simulated_subset_retrain_matches_a_real_one(tmp_path):
    """At a small lr the per-example gradients barely move along the run, so the simulated retrain
    of a subset moves the concept as a real retrain with the recipe does: within 10 % (measured
    6 %: the concept gradient and the per-example gradients are θ_0's, first order in the weights)."""
    recipe = dataclasses.replace(ADAMW, lr=1e-4, max_grad_norm=0.0)
    lm, exs, rec = fine_tuned(tmp_path, recipe)
    base, _, g, theta0 = gradients(rec, exs)
    value, grads = concept(base.model, rec.names)
    G = grads()[0]
    members = [0, 2, 3, 5]
    sim = float(G @ cf.Simulator(rec, exs, g, theta0).displacement(np.array(members)))
    sub = tiny_lm()
    finetune(Cfg(recipe), [exs[i] for i in members], tmp_path / "sub", progress=False, log=lambda m: None, model=sub)
    real = concept(sub.model, rec.names)[0]() - value()
    assert abs(sim - real) <= 0.1 * abs(real), (sim, real)


def test_values_of_an_additive_run_are_its_terms(tmp_path):
    """SGD, one example a batch, constant lr: a subset's Δθ is −lr·E·Σ_{i∈S} g_i, additive, so the
    least-squares fit recovers each pair's own term −lr·E·⟨G, g_i⟩ exactly and the Banzhaf
    estimate from the same kind of subsets up to their sampling; both add up to the full run."""
    recipe = TrainCfg(optimizer="sgd", lr=1e-2, batch_size=1, epochs=2, loss="example_mean", params=PARAMS)
    _, exs, rec = fine_tuned(tmp_path, recipe)
    base, _, g, theta0 = gradients(rec, exs)
    G = concept(base.model, rec.names)[1]()
    terms = (-recipe.lr * recipe.epochs * (g @ G[0])).numpy()
    values, full = cf.counterfactual_values(rec, exs, g, theta0, G, samples=32, seed=0)
    assert np.abs(values[:, 0] - terms).max() <= 1e-9 * np.abs(terms).max(), (values[:, 0], terms)
    assert abs(full[0] - terms.sum()) <= 1e-9 * np.abs(terms).sum()
    masks, phi = cf.simulated_subsets(cf.Simulator(rec, exs, g, theta0), G, samples=3000, seed=0)
    assert np.abs(cf.banzhaf(masks, phi)[:, 0] - terms).max() <= 0.1 * np.abs(terms).max()
    again, _ = cf.counterfactual_values(rec, exs, g, theta0, G, samples=32, seed=0)
    assert np.array_equal(values, again)  # seeded


def test_the_fit_beats_banzhaf_on_a_nonadditive_run(tmp_path):
    """AdamW renormalises, so subsets are not additive; with the same 200 subsets the additive
    fit predicts 100 other simulated subsets better (Spearman) than the Banzhaf estimate does."""
    _, exs, rec = fine_tuned(tmp_path, dataclasses.replace(ADAMW, max_grad_norm=0.0))
    base, _, g, theta0 = gradients(rec, exs)
    G = concept(base.model, rec.names)[1]()
    masks, phi = cf.simulated_subsets(cf.Simulator(rec, exs, g, theta0), G, samples=300, seed=0)
    from policytrace.numeric.metrics import spearman

    test_m, test_phi = masks[200:].astype(float), phi[200:, 0]
    fit = spearman(test_m @ cf.additive_fit(masks[:200], phi[:200])[:, 0], test_phi)
    ban = spearman(test_m @ cf.banzhaf(masks[:200], phi[:200])[:, 0], test_phi)
    assert fit > ban, (fit, ban)


def test_bad_settings(tmp_path, monkeypatch):
    for bad in (1, -3):
        with pytest.raises(Exception, match="simulations"):
            TrainCfg(simulations=bad)
    _, exs, rec = fine_tuned(tmp_path, ADAMW)
    monkeypatch.setattr(cf, "MAX_GRADIENT_BYTES", 1000)
    with pytest.raises(InvalidValueError, match="train.pair_value"):
        gradients(rec, exs)
    monkeypatch.undo()
    _, _, g, theta0 = gradients(rec, exs)
    masks, phi = cf.simulated_subsets(cf.Simulator(rec, exs, g, theta0), g[:1], samples=8, seed=0)
    with pytest.raises(InvalidValueError, match="train.simulations = 8 is too few for 7 pairs"):
        cf.additive_fit(masks, phi)
