"""Batched per-example gradients from hooks (gradient mode's pair side) against the per-pair
path they replace, on tiny float64 models of every family: any batch composition, order and
padding gives each pair its solo result to 1e-10 (whole-gradient products and projections; SGD,
Adam's first step, LoRA), the tied embedding and every parameter kind included, and the model is
left untouched."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from policytrace.gradients.batched import (  # noqa: E402
    Projections,
    TrainExample,
    WholeProducts,
    ghost_is_cheaper,
    pack,
    per_example,
)
from policytrace.gradients.per_pair import direction_products, update_direction  # noqa: E402
from policytrace.gradients.projection import Factored  # noqa: E402
from policytrace.model.config import UpdateCfg  # noqa: E402
from policytrace.model.update import UpdateEngine  # noqa: E402

from _model_helpers import digest  # noqa: E402
from _tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.model

PAIRS = [
    ("tell me story please", "i can't help with that"),
    ("how to bake bread", "sure here is how you bake bread ."),
    ("hi", "hello"),
    ("what is two plus two ?", "four , of course . anything else ?"),
    ("please help", "no"),
]
C = 3  # concepts


@functools.lru_cache(maxsize=None)
def setup(arch: str, optimizer: str, lora: int, params: str = "all"):
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_causal_lm(arch, len(tok)).double()
    eng = UpdateEngine(model, tok, UpdateCfg(lr=1e-3, optimizer=optimizer, lora_rank=lora, params=params))
    for p in model.parameters():
        p.requires_grad_(False)
    shapes = {n: tuple(eng.base[n].shape) for n in eng.trainable}
    gen = torch.Generator().manual_seed(0)
    concepts = torch.randn(C, sum(int(np.prod(s)) for s in shapes.values()), generator=gen, dtype=torch.float64)
    proj = Factored(shapes, 4, 0)
    examples, whole, projected = [], [], []
    for i, (p, r) in enumerate(PAIRS):
        ids, start = eng.tokens(p, r, str(i))
        examples.append(TrainExample.from_start(ids[0].tolist(), start))
        whole.append(direction_products(eng, concepts, p, r, str(i)))
        projected.append(proj(update_direction(eng, p, r, str(i))))
    return tok, model, eng, shapes, concepts, proj, examples, torch.stack(whole), torch.stack(projected)


def batched(arch, optimizer, lora, order, kind, params="all"):
    tok, model, eng, shapes, concepts, proj, examples, _, _ = setup(arch, optimizer, lora, params)
    batch = [examples[i] for i in order]
    if kind == "whole":
        sink = WholeProducts(concepts, eng.trainable, shapes, optimizer, eng.cfg.lr, len(batch))
    else:
        sink = Projections(proj, optimizer, eng.cfg.lr, len(batch), torch.float64, "cpu")
    per_example(model, eng.trainable, sink, batch, tok.pad_token_id, "cpu")
    return sink.result()


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt_neox"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["whole", "projected"])
def test_every_family_matches_the_per_pair_path(arch, optimizer, kind):
    *_, whole, projected = setup(arch, optimizer, 0)
    ref = whole if kind == "whole" else projected
    order = list(range(len(PAIRS)))
    assert rel(batched(arch, optimizer, 0, order, kind), ref) < 1e-10


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["whole", "projected"])
def test_lora_adapters_match_the_per_pair_path(optimizer, kind):
    *_, whole, projected = setup("llama", optimizer, 4)
    ref = whole if kind == "whole" else projected
    assert rel(batched("llama", optimizer, 4, list(range(len(PAIRS))), kind), ref) < 1e-10


def test_a_subset_of_parameters_matches():
    *_, whole, _ = setup("llama", "sgd", 0, "mlp")
    assert rel(batched("llama", "sgd", 0, list(range(len(PAIRS))), "whole", "mlp"), whole) < 1e-10


@settings(max_examples=20, deadline=None)
@given(order=st.lists(st.integers(0, len(PAIRS) - 1), min_size=1, max_size=5, unique=True),
       kind=st.sampled_from(["whole", "projected"]), optimizer=st.sampled_from(["sgd", "adam"]))
def test_any_batch_composition_gives_each_pair_its_solo_result(order, kind, optimizer):
    *_, whole, projected = setup("llama", optimizer, 0)
    ref = (whole if kind == "whole" else projected)[order]
    got = batched("llama", optimizer, 0, order, kind)
    for row in range(len(order)):
        assert rel(got[row], ref[row]) < 1e-10, (order, row)


def test_the_model_is_left_untouched():
    tok, model, *_ = setup("llama", "sgd", 0)
    before = digest(model)
    batched("llama", "sgd", 0, [0, 1, 2], "whole")
    batched("llama", "adam", 0, [3, 4], "projected")
    assert digest(model) == before
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_pack_respects_the_token_budget():
    lengths = [90, 12, 40, 40, 88, 7, 300]
    batches = pack(lengths, 200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 200
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert batches[0] == [6]  # longer than the budget: alone
    assert pack(lengths, 10_000, max_batch=3) == [[6, 0, 4], [2, 3, 1], [5]]


def test_router_prefers_the_formed_gradient_unless_one_token_or_one_concept():
    assert not ghost_is_cheaper(16, 87, 576, 1536, 8)
    assert ghost_is_cheaper(16, 1, 576, 1536, 8)
    assert ghost_is_cheaper(16, 87, 576, 1536, 1)
