"""A tiny Llama-style chat model and tokenizer, built offline for pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a tiny helpful assistant<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<eos>"]
WORDS = (
    "you are a tiny helpful assistant system user assistant i can't cannot sorry 'm can 't "
    "how do bake bread write insult about group explain history of holiday make weapon hack account "
    "sell drugs stop scam find address stalk person safe tip sure here is the answer no help with that "
    "what why when please tell me story poem code recipe plan list steps"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in WORDS + list("abcdefghijklmnopqrstuvwxyz?.,!'"):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_causal_lm(arch: str, vocab_size: int, seed: int = 0, layers: int = 2):
    """A tiny random causal LM of the named family (llama, qwen2, gpt_neox, gemma)."""
    import torch
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0)
    cfg = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **common),
        "gemma": lambda: tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common),
    }[arch]()
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "gemma": tf.GemmaForCausalLM,
           "gpt_neox": tf.GPTNeoXForCausalLM}[arch]
    torch.manual_seed(seed)
    return cls(cfg).eval()


def write_tiny_model(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny Llama chat model and its tokenizer saved as a local model folder."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", len(tok), seed=seed, layers=layers)
    model.config.eos_token_id = tok.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_data(folder: Path) -> tuple[Path, Path]:
    cats = ["alpha", "beta", "religious_stereotyping"]
    probes, pairs = [], []
    for c, cat in enumerate(cats):
        for i in range(6):
            harmful = i % 2 == 0
            words = ["how", "do", "make", "weapon"] if harmful else ["how", "do", "bake", "bread"]
            probes.append({"id": f"probe-{cat}-{i}", "prompt": " ".join(words + ["please"] * (i + 1) + [cat[:1]]),
                           "category": cat, "harmful": harmful})
        for i in range(4):
            harmful = i % 2 == 0
            prompt = " ".join((["write", "insult", "about", "group"] if harmful else ["tell", "me", "story"]) + ["list"] * (i + 1) + [cat[:1]])
            response = "i can't help with that" if harmful else "sure here is the answer"
            pairs.append({"id": f"pair-{cat}-{i}", "prompt": prompt, "response": response, "category": cat,
                          "label": "refusal" if harmful else "compliance", "harmful": harmful})
    p, q = folder / "probes.jsonl", folder / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in probes))
    q.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return p, q


def tiny_config(model_dir: Path, probes: Path, pairs: Path, cache: Path, **over) -> dict:
    cfg = {
        "model": {"name": str(model_dir)},
        "sae": {"layer": 1, "train_d_sae": 64, "train_k": 4, "train_steps": 30},
        "data": {"probes": str(probes), "pairs": str(pairs)},
        "behaviour": {"targets": ["i can't", "sorry"]},
        "features": {"k": 8, "min_active": 1},
        "run": {"pair_batch": 4, "cache_dir": str(cache), "threads": 1},
    }
    for table, values in over.items():
        cfg.setdefault(table, {}).update(values)
    return cfg
