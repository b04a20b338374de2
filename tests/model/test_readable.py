"""Readable features: the logit lens, token contexts and the category/side split, each against
a plain float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policytrace.model import readable
from policytrace.model.sae import SaeReader
from policytrace.model.sites import HookSite, capture

from _model_helpers import LAYER, PROMPTS


def test_logit_lens_is_the_scaled_direction_through_the_unembedding(model, tok):
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(3, model.config.hidden_size))
    gamma = model.get_decoder().norm.weight.detach().double().numpy()
    W_U = model.get_output_embeddings().weight.detach().double().numpy()
    expected = (dirs * gamma) @ W_U.T
    np.testing.assert_allclose(readable.lens_logits(model, dirs), expected, rtol=1e-12, atol=1e-12)
    toks, vals = readable.logit_lens(model, tok, dirs, 5)
    for j in range(3):
        top = np.argsort(-expected[j], kind="stable")[:5]
        assert toks[j] == [tok.decode([int(i)]) for i in top]
        np.testing.assert_allclose(vals[j], expected[j, top], rtol=1e-12)


@pytest.fixture(scope="module")
def reader():
    from sae_lens.saes import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=24, k=4, metadata=SAEMetadata(model_name="t", hook_name="h")))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return SaeReader(sae.double())


@pytest.mark.parametrize("gated", [False, True])
def test_contexts_are_the_largest_activations_with_their_windows(model, tok, reader, gated):
    """Every token of every sequence read alone (full forward, float64), the selected columns
    encoded; each feature's top-n over all tokens by brute force, windows included."""
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    cols = np.array([3, 7, 11, 20])
    acts = readable.feature_activations(model, reader, HookSite(LAYER), cols, gated, seqs, tok.pad_token_id,
                                        batch_size=2)
    for s, a in zip(seqs, acts):
        with torch.no_grad(), capture(model, HookSite(LAYER)) as store:
            model(torch.tensor([s]))
        h = store["h"][0].numpy()
        ref = np.maximum(reader.pre(h)[:, cols], 0) if gated else reader.encode(h)[:, cols]
        np.testing.assert_allclose(a, ref, rtol=0, atol=1e-5)  # float32 activations read in batches
    sources = [readable.Source("probe", f"p{i}", tuple(s)) for i, s in enumerate(seqs)]
    out = readable.top_contexts(acts, sources, [30, 70, 110, 200], top=3, window=2,
                                pieces=lambda ids: [tok.decode([int(t)]) for t in ids])
    for j, fid in enumerate([30, 70, 110, 200]):
        flat = [(a[p, j], si, p) for si, a in enumerate(acts) for p in range(len(a)) if a[p, j] > 0]
        flat.sort(key=lambda t: (-t[0], t[1], t[2]))
        rows = [i for i, f in enumerate(out["feature_id"]) if f == fid]
        assert len(rows) == min(3, len(flat))
        for rank, (i, (v, si, p)) in enumerate(zip(rows, flat), start=1):
            assert out["rank"][i] == rank and out["item_id"][i] == f"p{si}" and out["position"][i] == p
            assert out["activation"][i] == v and out["token"][i] == tok.decode([seqs[si][p]])
            lo, hi = max(0, p - 2), min(len(seqs[si]), p + 3)
            assert out["window_start"][i] == lo
            assert out["window_tokens"][i] == [tok.decode([t]) for t in seqs[si][lo:hi]]
            assert out["window_activations"][i] == list(acts[si][lo:hi, j])


def test_category_split_by_hand():
    from policytrace.pipeline.stages import category_split

    X = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [5.0, 0.0]])
    cats = np.array(["b", "a", "b", "a"])
    flag = np.array([True, False, False, True])
    by, on, off = category_split(X, cats, flag)
    assert on == [3.0, 0.0] and off == [1.5, 3.0]
    a, b = by[0]
    assert a == {"category": "a", "n": 2, "mean": 4.0, "mean_flagged": 5.0, "mean_unflagged": 3.0, "frac_active": 1.0}
    assert b == {"category": "b", "n": 2, "mean": 0.5, "mean_flagged": 1.0, "mean_unflagged": 0.0, "frac_active": 0.5}
    by2, on2, _ = category_split(X, cats, None)
    assert on2 == [None, None] and by2[1][0]["mean_flagged"] is None and by2[1][0]["mean"] == 1.0
