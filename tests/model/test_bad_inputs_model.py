"""Bad inputs to the model layer: devices, chat templates, damaged model and SAE folders and a
diverging update. Each must raise a PolicytraceError subclass whose message names the config key
or file (and fail at load, not at first use), never leak a torch / jinja / safetensors /
sae-lens exception and never hand back NaN features.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")

from policytrace.errors import ConfigError, NonFiniteError, PolicytraceError  # noqa: E402
from policytrace.model.config import UpdateCfg  # noqa: E402
from policytrace.model.loading import load_model  # noqa: E402
from policytrace.model.probe import TargetSet  # noqa: E402
from policytrace.model.sae import SaeReader, load_sae  # noqa: E402
from policytrace.model.sites import capture_block_output  # noqa: E402
from policytrace.model.update import UpdateEngine  # noqa: E402

from _tiny import tiny_causal_lm, tiny_tokenizer, write_tiny_model  # noqa: E402
from _helpers import expect  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An intact tiny model folder, shared read-only by the tests that do not damage it."""
    torch.set_num_threads(1)
    return write_tiny_model(tmp_path_factory.mktemp("bad_inputs") / "m")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --------------------------------------------------------------------------------------
# 7. model.device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["banana", "", "CPU", "cuda:banana"])
def test_load_model_unknown_device(model_dir, device):
    expect(ConfigError, lambda: load_model(str(model_dir), device=device), "model.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_load_model_cuda_without_cuda(model_dir, device):
    expect(ConfigError, lambda: load_model(str(model_dir), device=device), "model.device")


def test_load_model_cuda_index_out_of_range(model_dir):
    expect(ConfigError, lambda: load_model(str(model_dir), device="cuda:4096"), "model.device")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_load_model_mps_without_mps(model_dir):
    # A known device type this machine lacks: today torch's RuntimeError leaks.
    expect(ConfigError, lambda: load_model(str(model_dir), device="mps"), "model.device")


# --------------------------------------------------------------------------------------
# 8. chat template
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    ["{% for m in messages %}", "{{ ", "{% if %}", "{{ messages[0]['nope']['x'] }}"],
    ids=["unterminated-for", "unterminated-expr", "empty-if", "undefined"],
)
def test_load_model_malformed_chat_template(model_dir, template):
    # At load, not at the first probe.
    expect(ConfigError, lambda: load_model(str(model_dir), chat_template=template), "chat_template")


# --------------------------------------------------------------------------------------
# damaged model folders (nearby)
# --------------------------------------------------------------------------------------


def test_load_model_truncated_config_json(tmp_path):
    folder = write_tiny_model(tmp_path / "m")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    expect(ConfigError, lambda: load_model(str(folder)), "config.json")


def test_load_model_damaged_weights(tmp_path):
    # Today safetensors' SafetensorError leaks.
    folder = write_tiny_model(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    expect(ConfigError, lambda: load_model(str(folder)), "model.safetensors")


def test_load_model_truncated_weights(tmp_path):
    folder = write_tiny_model(tmp_path / "m")
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    expect(ConfigError, lambda: load_model(str(folder)), "model.safetensors")


def test_load_model_unknown_dtype(model_dir):
    expect(ConfigError, lambda: load_model(str(model_dir), dtype="float8"), "model.dtype")


# --------------------------------------------------------------------------------------
# 9. SAE folders
# --------------------------------------------------------------------------------------


def _sae_folder(folder: Path) -> Path:
    from sae_lens.saes import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    folder.mkdir(parents=True, exist_ok=True)
    TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4, metadata=SAEMetadata(model_name="x", hook_name="y"))).save_model(
        str(folder)
    )
    return folder


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "sae_weights.safetensors"))


def _load_and_encode(folder: Path):
    """Load the SAE and encode one batch: a broken SAE may be refused at either step (load is
    better), but never produce NaN codes or leak a torch error."""
    reader = SaeReader(load_sae(path=str(folder)))
    codes = reader.encode(np.ones((2, reader.d_in), dtype=np.float32))
    assert np.isfinite(codes).all(), f"NaN/inf SAE codes: {codes}"
    return codes


def test_intact_sae_folder_loads(tmp_path):
    codes = _load_and_encode(_sae_folder(tmp_path / "sae"))
    assert codes.shape == (2, 32)


def test_sae_truncated_cfg_json(tmp_path):
    folder = _sae_folder(tmp_path / "sae")
    text = (folder / "cfg.json").read_text()
    (folder / "cfg.json").write_text(text[: len(text) // 2])
    expect(ConfigError, lambda: load_sae(path=str(folder)), "cfg.json")


def test_sae_cfg_json_not_utf8(tmp_path):
    folder = _sae_folder(tmp_path / "sae")
    (folder / "cfg.json").write_bytes(b"\xff\xfe{}")
    expect(ConfigError, lambda: load_sae(path=str(folder)), "cfg.json")


def test_sae_weights_missing(tmp_path):
    folder = _sae_folder(tmp_path / "sae")
    (folder / "sae_weights.safetensors").unlink()
    expect(ConfigError, lambda: load_sae(path=str(folder)), "sae_weights.safetensors")


def test_sae_weights_truncated(tmp_path):
    folder = _sae_folder(tmp_path / "sae")
    raw = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(raw[: len(raw) // 2])
    expect(ConfigError, lambda: load_sae(path=str(folder)), "sae_weights.safetensors")


@pytest.mark.parametrize("field,value", [("d_in", 24), ("d_sae", 64)])
def test_sae_cfg_contradicts_weights(tmp_path, field, value):
    folder = _sae_folder(tmp_path / "sae")
    _edit_cfg(folder, **{field: value})
    expect(ConfigError, lambda: load_sae(path=str(folder)), field)


def test_sae_unknown_architecture(tmp_path):
    # Today sae-lens' KeyError('banana') leaks.
    folder = _sae_folder(tmp_path / "sae")
    _edit_cfg(folder, architecture="banana")
    expect(ConfigError, lambda: load_sae(path=str(folder)), "architecture")


def test_sae_topk_k_larger_than_d_sae(tmp_path):
    # Loads today; encoding then leaks torch's RuntimeError("selected index k out of range").
    folder = _sae_folder(tmp_path / "sae")
    _edit_cfg(folder, k=100)
    msg = str(expect(ConfigError, lambda: _load_and_encode(folder)))
    assert re.search(r"\bk\b", msg), f"the error does not name `k`: {msg!r}"


def test_sae_decoder_of_wrong_shape(tmp_path):
    # Today torch's load_state_dict RuntimeError leaks.
    folder = _sae_folder(tmp_path / "sae")
    _edit_weights(folder, lambda w: w.__setitem__("W_dec", torch.zeros(32, 24)))
    expect(ConfigError, lambda: load_sae(path=str(folder)), "W_dec")


def test_sae_decoder_missing(tmp_path):
    folder = _sae_folder(tmp_path / "sae")
    _edit_weights(folder, lambda w: w.pop("W_dec"))
    expect(ConfigError, lambda: load_sae(path=str(folder)), "W_dec")


def test_sae_nan_weights(tmp_path):
    # Loads today and encodes to NaN features.
    folder = _sae_folder(tmp_path / "sae")

    def poison(w):
        w["W_enc"][0, 0] = float("nan")

    _edit_weights(folder, poison)
    expect(PolicytraceError, lambda: _load_and_encode(folder), "W_enc")


def test_sae_path_is_a_file(tmp_path):
    folder = _sae_folder(tmp_path / "sae")
    expect(ConfigError, lambda: load_sae(path=str(folder / "cfg.json")), "sae.path")


# --------------------------------------------------------------------------------------
# 10. a diverging update
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_lr_1e308_diverges_with_typed_error(tok, optimizer):
    model = tiny_causal_lm("llama", len(tok))
    for p in model.parameters():
        p.requires_grad_(False)
    engine = UpdateEngine(model, tok, UpdateCfg(lr=1e308, optimizer=optimizer))
    expect(NonFiniteError, lambda: engine.update("tell me story", "sure here is the answer", "pair-17"), "update.lr", "pair-17")


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-4, "1e-4"])
def test_update_cfg_bad_lr(lr):
    expect(ConfigError, lambda: UpdateCfg(lr=lr), "update.lr")


# --------------------------------------------------------------------------------------
# nearby: targets and hook sites
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [[""], [], ["i can't", "i"]], ids=["empty-string", "none", "prefix"])
def test_target_set_bad_targets(tok, targets):
    expect(ConfigError, lambda: TargetSet.from_strings(tok, targets), "behaviour.targets")


@pytest.mark.parametrize("layer", [2, -1, 2**70])
def test_hook_layer_out_of_range(tok, layer):
    model = tiny_causal_lm("llama", len(tok))

    def run():
        with capture_block_output(model, layer):
            pass

    expect(PolicytraceError, run, "sae.layer")
