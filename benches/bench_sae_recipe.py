"""The default SAE's recipe against the probes it must read (issue "Features that carry the
change"): FVU on the pooled probe activations of the behaviour's own probes (in the corpus) and
of the sycophancy probes (never in it), for variants of the corpus and the training spec.

    python benches/bench_sae_recipe.py "copies:0" "copies:1,k:128,steps:800" ...

Each argument is one variant: ``copies`` = how many request-framed copies of every corpus
sentence join the chat requests ("Is this correct? …", "My colleague says: … Do you agree?",
…: the styles users write in), and any ``TrainSpec`` field (``d_sae``, ``k``, ``steps``,
``pooled_share``, ``lr``). Prints one JSON line per variant (FVU on training tokens, on the
training pooled rows, on each probe set's pooled rows, training seconds). It only measures.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

FRAMES = ["Can you explain what this means? {s}", "Is this correct? {s}", "I read that {l} Is that true?",
          "Please summarize the following in one sentence: {s}", "My colleague says: \"{s}\" Do you agree?",
          "Rewrite this more clearly: {s}", "Quick question about this: {s} Any advice?",
          "Help me understand why {l}"]


def framed(sents: list[str], copies: int) -> list[str]:
    out = []
    for c in range(copies):
        for j, s in enumerate(sents):
            out.append(FRAMES[(j + 3 * c) % len(FRAMES)].format(s=s, l=s[0].lower() + s[1:]))
    return out


def prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    import torch

    from policytrace.model import sae_train as st
    from policytrace.model.loading import load_model_cfg
    from policytrace.model.sites import HookSite
    from policytrace.pipeline import config as cfgmod

    cfg = cfgmod.resolve({"preset": "demo"})
    lm = load_model_cfg(cfg.model)
    site = HookSite(cfg.sae.layer, cfg.sae.site)
    data = Path(st.__file__).parent.parent / "behaviours" / "data"
    own = prompts(data / "refusal" / "probes.jsonl")
    unseen = prompts(data / "sycophancy" / "probes.jsonl")
    pool_own = st.collect_corpus(lm, site, own, [], 0).pooled
    pool_unseen = st.collect_corpus(lm, site, unseen, [], 0).pooled
    chats, docs = st.corpus_texts(prompts(data / "refusal" / "pairs.jsonl") + own)
    sents = st.sentences(st.generic_docs())
    base = st.TrainSpec.from_config(cfg.sae)
    corpora: dict[int, object] = {}
    for arg in argv or ["copies:0"]:
        kv = dict(x.split(":") for x in arg.split(","))
        copies = int(kv.pop("copies", 0))
        spec = dataclasses.replace(base, **{k: (float(v) if k in ("lr", "pooled_share") else int(v)) for k, v in kv.items()})
        if copies not in corpora:
            t = time.perf_counter()
            corpora[copies] = st.collect_corpus(lm, site, chats + framed(sents, copies), docs, base.max_tokens)
            print(f"corpus, {copies} framed copies: {len(corpora[copies].pooled)} pooled rows, "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        c = corpora[copies]
        t = time.perf_counter()
        sae = st.train_topk_sae(c.tokens, spec, lm.name, site.hook_name, pooled=c.pooled)
        print(json.dumps({"copies": copies, "d_sae": spec.d_sae, "k": spec.k, "steps": spec.steps,
                          "pooled_share": spec.pooled_share, "threads": torch.get_num_threads(),
                          "train_s": round(time.perf_counter() - t, 1),
                          "fvu_tokens": round(st.sae_quality(sae, c.tokens)["fvu"], 4),
                          "fvu_pooled_train": round(st.sae_quality(sae, c.pooled)["fvu"], 4),
                          "fvu_refusal_probes": round(st.sae_quality(sae, pool_own)["fvu"], 4),
                          "fvu_sycophancy_probes": round(st.sae_quality(sae, pool_unseen)["fvu"], 4)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
