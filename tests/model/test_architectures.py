"""The probe pass, hook sites and update engine on tiny models of several HF families."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from policytrace.model.chat import encode_prompts, format_prompt  # noqa: E402
from policytrace.model.config import UpdateCfg  # noqa: E402
from policytrace.model.probe import ProbeRunner, TargetSet  # noqa: E402
from policytrace.model.sites import capture_block_output, decoder_layers  # noqa: E402
from policytrace.model.update import UpdateEngine  # noqa: E402

from _tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402

PROMPTS = ["how do bake bread", "write insult about group please", "tell me story"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt_neox"])
def test_probe_pass_and_update_on_family(arch, tok):
    torch.manual_seed(0)
    model = tiny_causal_lm(arch, len(tok)).double()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = encode_prompts(tok, PROMPTS, ["a", "b", "c"], 128)
    # The hook is the block output: hidden_states[layer + 1].
    with torch.no_grad(), capture_block_output(model, 0) as store:
        out = model(torch.tensor([ids[0]]), output_hidden_states=True)
    np.testing.assert_allclose(store["h"][0].numpy(), out.hidden_states[1][0].numpy(), rtol=0, atol=1e-12)
    targets = TargetSet.from_strings(tok, ["i can't", "sorry"])
    runner = ProbeRunner(model, tok, 0, targets, batch_size=2)
    H, y = runner.run(ids)

    def naive(m):
        """log P(targets | prompt) from one full forward pass per prompt and target."""
        out = []
        with torch.no_grad():
            for p in ids:
                lps = []
                for s in targets.targets:
                    logp = torch.log_softmax(m(torch.tensor([p + list(s)])).logits[0], -1)
                    lps.append(sum(logp[len(p) - 1 + t, s[t]] for t in range(len(s))))
                out.append(torch.logsumexp(torch.stack(lps), 0).item())
        return np.array(out)

    np.testing.assert_allclose(y, naive(model), rtol=0, atol=1e-9)
    params = UpdateEngine(model, tok, UpdateCfg(lr=1e-2)).update("tell me story", "sure here is the answer", "p")
    H1, y1 = runner.run(ids, params=params)
    # the probe pass through params= is the plain model with those weights written in
    updated = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in updated.named_parameters():
            p.copy_(params[n])
    assert np.abs(y1 - y).max() > 1e-6  # the update is visible at this tolerance
    np.testing.assert_allclose(y1, naive(updated), rtol=0, atol=1e-9)


def test_hook_sites(tok):
    model = tiny_causal_lm("llama", len(tok), layers=3).double()  # block 1 is not the last
    x = torch.tensor([format_prompt(tok, "tell me story")])
    block = decoder_layers(model)[1]
    seen = {}
    hooks = [block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o)),
             block.self_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o[0]))]
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        got = {}
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            with capture_block_output(model, 1, site) as store:
                model(x)
            got[site] = store["h"]
    for h in hooks:
        h.remove()
    np.testing.assert_array_equal(got["resid_pre"].numpy(), out.hidden_states[1].numpy())
    np.testing.assert_array_equal(got["resid_post"].numpy(), out.hidden_states[2].numpy())
    np.testing.assert_array_equal(got["mlp_out"].numpy(), seen["mlp"].numpy())
    np.testing.assert_array_equal(got["attn_out"].numpy(), seen["attn"].numpy())
    from policytrace.errors import ConfigError

    with pytest.raises(ConfigError, match="sae.site"):
        with capture_block_output(model, 1, "nowhere"):
            pass
