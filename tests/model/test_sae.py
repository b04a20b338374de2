"""SAE training and reading: train_topk_sae, SaeReader, load_sae, sae_quality, collect_activations."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from policytrace.errors import ConfigError
from policytrace.model import sae as sae_mod
from policytrace.model import sae_train
from policytrace.model.probe import ProbeRunner
from policytrace.model.sites import HookSite

from _helpers import expect
from _model_helpers import LAYER, PROMPTS

SAE_CFG = sae_train.TrainSpec(d_sae=64, k=4, steps=60, batch_size=256, lr=1e-2, seed=0, max_tokens=2000)


@pytest.fixture(scope="module")
def acts():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(24, 16))
    codes = rng.exponential(size=(1500, 24)) * (rng.random((1500, 24)) < 0.15)
    return (codes @ basis + 0.05 * rng.normal(size=(1500, 16)) + 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def trained_sae(acts):
    return sae_train.train_topk_sae(acts, SAE_CFG, "tiny-llama", "model.layers.1")


def test_sae_save_load_roundtrip(trained_sae, acts, tmp_path):
    from sae_lens import SAE

    trained_sae.save_model(str(tmp_path))
    loaded = SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(loaded).__name__ == type(trained_sae).__name__
    assert loaded.cfg.k == SAE_CFG.k and loaded.cfg.d_sae == SAE_CFG.d_sae and loaded.cfg.d_in == 16
    a, b = sae_mod.SaeReader(trained_sae), sae_mod.SaeReader(loaded)
    assert np.array_equal(a.encode(acts), b.encode(acts))
    assert np.array_equal(a.pre(acts), b.pre(acts))
    via_loader = sae_mod.load_sae(path=str(tmp_path))
    assert np.array_equal(sae_mod.SaeReader(via_loader).encode(acts), a.encode(acts))


def test_sae_codes_topk(trained_sae, acts):
    reader = sae_mod.SaeReader(trained_sae)
    codes, pre = reader.encode(acts), reader.pre(acts)
    k = SAE_CFG.k
    assert codes.shape == (len(acts), SAE_CFG.d_sae)
    assert (codes >= 0).all()
    nnz = (codes != 0).sum(1)
    assert (nnz <= k).all()
    kth = np.sort(pre, axis=1)[:, -k]
    pos = kth > 0
    assert pos.mean() > 0.5
    assert (nnz[pos] == k).all()
    # the non-zeros are the k largest pre-activations, with their values
    top = np.argsort(-pre, axis=1)[:, :k]
    for r in np.flatnonzero(pos)[:200]:
        assert set(np.flatnonzero(codes[r])) == set(top[r])
        np.testing.assert_allclose(codes[r, top[r]], pre[r, top[r]], rtol=1e-6)


def test_sae_encoder_matches_training_formula(trained_sae, acts):
    """pre = (x - b_dec) W_enc + b_enc, the encoder train_topk_sae fitted."""
    X = torch.as_tensor(acts)
    with torch.no_grad():
        ref = (X - trained_sae.b_dec) @ trained_sae.W_enc + trained_sae.b_enc
    np.testing.assert_allclose(sae_mod.SaeReader(trained_sae).pre(acts), ref.numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        norms = trained_sae.W_dec.norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), 1.0, atol=1e-5)


def test_sae_quality(trained_sae, acts):
    """FVU, L0 and the dead fraction equal a direct float64 computation from the SAE's weights:
    codes = ReLU of the k largest (x − b_dec) W_enc + b_enc, reconstruction codes W_dec + b_dec."""
    q = sae_train.sae_quality(trained_sae, acts)
    W_enc, b_enc, W_dec, b_dec = (getattr(trained_sae, n).detach().double().numpy()
                                  for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x, k = acts.astype(np.float64), SAE_CFG.k
    pre = (x - b_dec) @ W_enc + b_enc
    srt = np.sort(pre, axis=1)
    # float32 rounding of pre (sae_quality's precision) cannot change which latents are chosen:
    # the k-th largest is clear of the (k+1)-th and of zero by far more than that rounding
    eps32 = float(np.finfo(np.float32).eps)
    slack = 8 * eps32 * (np.abs(x - b_dec) @ np.abs(W_enc) + np.abs(b_enc)).max(axis=1)
    assert (srt[:, -k] - srt[:, -k - 1] > slack).all() and (np.abs(srt[:, -k]) > slack).all()
    top = np.argsort(-pre, axis=1)[:, :k]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top, np.maximum(np.take_along_axis(pre, top, 1), 0.0), 1)
    r = codes @ W_dec + b_dec - x
    fvu = (r**2).sum() / ((x - x.mean(0)) ** 2).sum()
    # float32 error of sae_quality: each residual is off by eps32 times the row's largest term,
    # the squares' sum by twice that times Σ|r|, plus the summation's own rounding
    big = (np.abs(x) + np.abs(b_dec) + np.abs(codes) @ np.abs(W_dec)).max()
    rtol = 2 * eps32 * big * np.abs(r).sum() / (r**2).sum() + 2 * eps32 * np.log2(r.size)
    assert q["fvu"] == pytest.approx(fvu, rel=rtol)
    assert q["fvu"] < 0.9  # it learned something on this low-rank data
    assert q["l0"] == (codes != 0).sum(1).mean()
    assert q["dead_fraction"] == ((codes != 0).sum(0) == 0).mean()
    assert q["n_tokens"] == len(acts)


def test_sae_training_deterministic(trained_sae, acts):
    again = sae_train.train_topk_sae(acts, SAE_CFG, "tiny-llama", "model.layers.1")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(again, name), getattr(trained_sae, name)), name


def test_load_sae_errors(tmp_path):
    expect(ConfigError, lambda: sae_mod.load_sae(path=str(tmp_path)), "cfg.json")
    expect(ConfigError, lambda: sae_mod.load_sae(), "sae")


def test_sae_on_probe_activations(model, tok, prompt_ids, tset, tmp_path):
    """End to end on the tiny model: block outputs -> SAE -> codes with at most k non-zeros."""
    from policytrace.model import LoadedModel

    m32 = copy.deepcopy(model).float()
    lm = LoadedModel(m32, tok, "tiny")
    acts = sae_train.collect_activations(lm, HookSite(LAYER), PROMPTS, ["the history of cats and dogs"] * 3, max_tokens=500)
    assert acts.shape[1] == 32 and acts.dtype == np.float32
    n_tok = sum(len(ids) for ids in prompt_ids) + 3 * 6
    assert len(acts) == n_tok
    cfg = sae_train.TrainSpec(d_sae=48, k=3, steps=20, batch_size=64, seed=1)
    s = sae_train.train_topk_sae(acts, cfg, "tiny", f"model.layers.{LAYER}")
    H, _ = ProbeRunner(m32, tok, LAYER, tset).run(prompt_ids)
    codes = sae_mod.SaeReader(s).encode(H)
    assert ((codes != 0).sum(1) <= 3).all()
    assert re.fullmatch(r"model\.layers\.\d+", s.cfg.metadata.hook_name)


def test_collect_corpus_rows_are_the_probe_pass_and_the_plain_tokens(model, tok, prompt_ids, tset):
    """Recipe 2's rows in float64: the pooled rows are the probe pass's pooled activations (the
    same template prefix shared through its KV cache), the token rows every position of the
    requests (the shared prefix once) and then of the plain documents, each against a plain
    full forward of that one sequence."""
    from policytrace.model import LoadedModel
    from policytrace.model.chat import format_prompt
    from policytrace.model.sites import capture

    lm = LoadedModel(model, tok, "tiny")
    docs = ["the history of cats and dogs", "a story about the weather"]
    corpus = sae_train.collect_corpus(lm, HookSite(LAYER), PROMPTS, docs, max_tokens=10_000, batch_size=2)
    H, _ = ProbeRunner(model, tok, LAYER, tset).run(prompt_ids)
    np.testing.assert_allclose(corpus.pooled, H, rtol=0, atol=1e-5)  # the collector keeps float32

    def full(ids):
        with torch.no_grad(), capture(model, HookSite(LAYER)) as store:
            model(torch.tensor([ids]))
        return store["h"][0].numpy()

    reqs = [format_prompt(tok, p) for p in PROMPTS]
    P = sae_train._shared_prefix(reqs, [len(r) - 1 for r in reqs])
    assert P > 0
    order = np.argsort([len(r) for r in reqs], kind="stable")
    expected = [full(reqs[0])[:P]] + [full(reqs[i])[P:] for i in order]
    expected += [full(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    np.testing.assert_allclose(corpus.tokens, np.concatenate(expected), rtol=0, atol=1e-5)
    cut = sae_train.collect_corpus(lm, HookSite(LAYER), PROMPTS, docs, max_tokens=P + 3, batch_size=2)
    assert len(cut.tokens) == P + 3 and len(cut.pooled) == len(PROMPTS)  # token rows cut, pooled rows never


def test_pool_position_follows_the_probe_pooling(tok):
    ids = [5, 7, 9, 7, 3]
    assert sae_train.pool_position(ids) == 4
    assert sae_train.pool_position(ids, "eot", 7) == 3
    assert sae_train.pool_position(ids, "mean") == 4


def test_weighted_training_loss_is_the_two_fvus(acts):
    """With pooled rows, one full-batch step's loss is FVU(tokens) + FVU(pooled), each about its
    own mean, computed here in float64 from the initial weights (lr ~ 0: the weights stay)."""
    rng = np.random.default_rng(1)
    pooled = (acts[:40] * 0.1 + 3.0 + 0.01 * rng.normal(size=(40, 16))).astype(np.float32)
    spec = sae_train.TrainSpec(d_sae=32, k=4, steps=1, batch_size=64, lr=1e-30, seed=3, pooled_share=0.25)
    sae = sae_train.train_topk_sae(acts, spec, "tiny", "model.layers.1", pooled=pooled)
    # Replay the one batch the trainer drew, in float64.
    g = torch.Generator().manual_seed(spec.seed)
    torch.randn(spec.d_sae, 16, generator=g)
    x_tok = acts[torch.randint(0, len(acts), (48,), generator=g).numpy()].astype(np.float64)
    x_pool = pooled[torch.randint(0, len(pooled), (16,), generator=g).numpy()].astype(np.float64)
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))

    def err(x):
        pre = (x - b_dec) @ W_enc + b_enc
        top = np.argsort(-pre, axis=1)[:, :4]
        codes = np.zeros_like(pre)
        np.put_along_axis(codes, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
        return ((codes @ W_dec + b_dec - x) ** 2).sum(1).mean()

    a64, p64 = acts.astype(np.float64), pooled.astype(np.float64)
    expected = err(x_tok) / ((a64 - a64.mean(0)) ** 2).sum(1).mean() + err(x_pool) / ((p64 - p64.mean(0)) ** 2).sum(1).mean()
    losses = []
    sae_train.train_topk_sae(acts, spec, "tiny", "model.layers.1", pooled=pooled,
                             on_step=lambda loss: losses.append(loss))
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(b_dec, np.concatenate([a64, p64]).mean(0), rtol=1e-5)


def test_cache_key_changes_with_the_recipe_and_the_pooling():
    site = HookSite(LAYER)
    spec = sae_train.TrainSpec(d_sae=8, k=2, steps=1, seed=0)
    keys = {sae_train.cache_key("m", site, ["a"], ["b"], spec),
            sae_train.cache_key("m", site, ["a"], ["b"], spec, "eot"),
            sae_train.cache_key("m", site, ["a"], ["b"], sae_train.TrainSpec(d_sae=8, k=2, steps=1, seed=0, recipe=1)),
            sae_train.cache_key("m", site, ["a"], ["b"], sae_train.TrainSpec(d_sae=8, k=2, steps=1, seed=0,
                                                                            pooled_share=0.25))}
    assert len(keys) == 4
    chats, docs = sae_train.corpus_texts(["my prompt"])
    assert chats[0] == "my prompt" and docs == sae_train.generic_docs()
    assert set(docs) <= set(chats) and len(chats) > 1 + 2 * len(docs)  # docstrings and their sentences as turns
