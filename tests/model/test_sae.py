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
