"""Hook sites: capture_block_output reads the block output, is removed afterwards, and checks its layer."""

from __future__ import annotations

import copy

import pytest
import torch

from policytrace.errors import InvalidValueError
from policytrace.model.chat import format_prompt
from policytrace.model.probe import ProbeRunner
from policytrace.model.sites import capture_block_output, decoder_layers

from _helpers import expect
from _model_helpers import LAYER, N_LAYERS

# --------------------------------------------------------------------------------------
# the hook reads the block output
# --------------------------------------------------------------------------------------


def test_hook_is_block_output_not_block_input(tok, model):
    ids = torch.tensor([format_prompt(tok, "write a poem about cats")])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == N_LAYERS + 1
    for layer in range(N_LAYERS):
        with capture_block_output(model, layer) as store, torch.no_grad():
            model(ids)
        h = store["h"]
        assert h.shape == hs[0].shape
        if layer < N_LAYERS - 1:
            assert torch.equal(h, hs[layer + 1]), f"layer {layer}"
        else:  # transformers applies the final norm to its last hidden state
            assert torch.allclose(model.model.norm(h), hs[layer + 1], rtol=0, atol=1e-12)
        assert (h - hs[layer]).abs().max() > 1e-3, f"layer {layer}: the hook read the block input"


def test_hook_last_block_without_final_norm(tok, model):
    """With the final norm removed, hidden_states[L] is the raw output of the last block."""
    bare = copy.deepcopy(model)
    bare.model.norm = torch.nn.Identity()
    ids = torch.tensor([format_prompt(tok, "tell me a story")])
    with torch.no_grad():
        ref = bare(ids, output_hidden_states=True).hidden_states[N_LAYERS]
    with capture_block_output(model, N_LAYERS - 1) as store, torch.no_grad():
        model(ids)
    assert torch.equal(store["h"], ref)


def test_hook_is_removed_after_the_block(tok, model):
    layer = decoder_layers(model)[LAYER]
    before = len(layer._forward_hooks)
    with capture_block_output(model, LAYER):
        assert len(layer._forward_hooks) == before + 1
    assert len(layer._forward_hooks) == before
    with pytest.raises(RuntimeError, match="^boom$"):  # the block's own error, passed through
        with capture_block_output(model, LAYER):
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == before


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_error_layer_out_of_range(model, tok, prompt_ids, tset):
    for layer in (N_LAYERS, -1, 99):
        expect(InvalidValueError, lambda: capture_block_output(model, layer).__enter__(), str(layer))
        runner = ProbeRunner(model, tok, layer, tset)
        expect(InvalidValueError, lambda: runner.run(prompt_ids), str(layer))
