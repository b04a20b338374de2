"""A full attribution job into a run folder (DESIGN §2, §3).

The folder holds ``config.toml`` (resolved), ``manifest.json``, ``features.parquet``,
``policy.parquet``, ``probes.parquet`` and, once every pair is done, ``pairs.parquet``,
``pair_features.parquet`` and ``interference.parquet``. Pairs are processed in shards of
``run.pair_batch`` pairs; each shard is written atomically to ``shards/`` and recorded in the
manifest, so a killed run resumes at the first missing shard and finishes with the same bytes as
an unbroken run. A finished run is not recomputed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import polars as pl
import scipy.sparse as sp

from . import config as cfgmod
from .data import load_dataset
from .decomposition import Attributor, summarize_interference
from .errors import ConfigError, InvalidValueError
from .features import select_features
from .policy import fit_policy

MANIFEST_VERSION = 1


def _log_default(msg: str) -> None:
    print(f"[policytrace] {msg}", flush=True)


def _stratified(pairs: pl.DataFrame, max_pairs: int, seed: int) -> pl.DataFrame:
    """A seeded subset with categories as equal as possible (all pairs when max_pairs = 0)."""
    if max_pairs == 0 or max_pairs >= pairs.height:
        return pairs
    rng = np.random.default_rng(seed)
    by_cat = {c: rng.permutation(np.flatnonzero((pairs["category"] == c).to_numpy())).tolist()
              for c in sorted(set(pairs["category"].to_list()))}
    chosen: list[int] = []
    while len(chosen) < max_pairs:
        for c in by_cat:
            if by_cat[c] and len(chosen) < max_pairs:
                chosen.append(by_cat[c].pop(0))
    return pairs[sorted(chosen)]


class Run:
    def __init__(self, cfg: dict, run_dir: str | Path, log: Callable[[str], None] = _log_default, progress: bool = True):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.log = log
        self.progress = progress
        self.digest = cfgmod.digest(cfg)
        self.manifest_path = self.dir / "manifest.json"

    # --- manifest -----------------------------------------------------------------------
    def _manifest(self) -> dict:
        if self.manifest_path.exists():
            m = json.loads(self.manifest_path.read_text())
            if m.get("version") != MANIFEST_VERSION:
                raise InvalidValueError(f"{self.dir} was written by another policytrace version; use a new run folder")
            if m.get("config_digest") != self.digest:
                raise ConfigError(
                    f"{self.dir} holds a run of a different configuration; pass a new run folder "
                    "(or delete this one) to run this config"
                )
            return m
        return {"version": MANIFEST_VERSION, "config_digest": self.digest, "status": "started",
                "stages": {}, "shards": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _save_manifest(self, m: dict) -> None:
        cfgmod.write_atomic(self.manifest_path, json.dumps(m, indent=1, sort_keys=True))

    def _write_parquet(self, frame: pl.DataFrame, name: str) -> None:
        import io

        buf = io.BytesIO()
        frame.write_parquet(buf, statistics=False)
        cfgmod.write_atomic(self.dir / name, buf.getvalue())

    def setup(self) -> SimpleNamespace:
        """Everything before the pairs: data, model, SAE, base probe pass (cached in the folder as
        ``base.npz``), features and policy. Deterministic for a config, so ``validate`` can
        rebuild the same state from a finished folder."""
        import torch

        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg["run"]["seed"])

        ds = load_dataset(cfg["data"]["probes"] or None, cfg["data"]["pairs"] or None)
        probes = ds.probes
        pairs = _stratified(ds.pairs, cfg["data"]["max_pairs"], cfg["run"]["seed"])
        self.log(f"{probes.height} probes, {pairs.height} of {ds.pairs.height} pairs")

        from .model import load_model
        from .probe import ProbeRunner, TargetSet, encode_prompts
        from .sae import SaeReader, TrainConfig, default_sae, load_sae

        m = cfg["model"]
        lm = load_model(m["name"] or None, m["gguf_file"] or None, m["device"], m["dtype"], m["chat_template"] or None)
        layer = cfg["sae"]["layer"]
        s = cfg["sae"]
        quality = None
        if s["path"] or (s["release"] and s["id"]):
            sae = load_sae(s["path"] or None, s["release"] or None, s["id"] or None, m["device"])
        else:
            tc = TrainConfig(d_sae=s["train_d_sae"], k=s["train_k"], steps=s["train_steps"], seed=s["train_seed"])
            folder, quality = default_sae(lm, layer, ds.pairs["prompt"].to_list() + probes["prompt"].to_list(),
                                          cfgmod.cache_dir(cfg), tc, self.log, site=s["site"])
            sae = load_sae(str(folder), device=m["device"])
        reader = SaeReader(sae, m["device"])
        if reader.d_in != lm.model.config.hidden_size:
            raise ConfigError(
                f"the SAE reads {reader.d_in}-dimensional activations but the model's hidden size is "
                f"{lm.model.config.hidden_size}: SAE and model do not match"
            )
        targets = TargetSet.from_strings(lm.tokenizer, cfg["behaviour"]["targets"], cfg["behaviour"]["anti_targets"])
        p = cfg["probe"]
        runner = ProbeRunner(lm.model, lm.tokenizer, layer, targets, p["pooling"], p["eot_token"] or None,
                             p["batch_size"], m["device"], p["share_prefix"], site=s["site"])
        probe_ids = encode_prompts(lm.tokenizer, probes["prompt"].to_list(), probes["id"].to_list(), p["max_length"])

        # --- base pass, features, policy (one stage, cached in the folder) ---------------
        base_path = self.dir / "base.npz"
        if base_path.exists():
            base = np.load(base_path)
            H0, y0 = base["H0"], base["y0"]
        else:
            self.log("base probe pass")
            H0, y0 = runner.run(probe_ids, probe_ids=probes["id"].to_list())
            import io

            buf = io.BytesIO()
            np.savez(buf, H0=H0, y0=y0)
            cfgmod.write_atomic(base_path, buf.getvalue())
        codes = reader.encode(H0)
        X_all = sp.csr_matrix(codes.astype(np.float64))
        harmful = probes["harmful"].to_numpy()
        f = cfg["features"]
        thr = None if f["threshold"] < 0 else f["threshold"]
        if f["method"] == "mean_diff":
            if probes["harmful"].null_count():
                raise InvalidValueError("features.method = 'mean_diff' needs a harmful flag on every probe")
            sel = select_features(X_all, y0, groups=harmful.astype(bool), method="mean_diff", k=f["k"], threshold=thr,
                                  min_active=f["min_active"], threads=cfg["run"]["threads"])
        else:
            sel = select_features(X_all, y0, method="corr", k=f["k"], threshold=thr, min_active=f["min_active"],
                                  threads=cfg["run"]["threads"])
        chosen = sel.filter(pl.col("selected"))
        if chosen.height == 0:
            raise InvalidValueError("feature selection chose no feature; lower features.threshold or min_active")
        cols = chosen["column"].to_numpy()
        pre0 = reader.pre(H0)[:, cols].astype(np.float64)
        gated = cfg["decompose"]["delta_x"] == "gated"
        X = np.maximum(pre0, 0.0) if gated else codes[:, cols].astype(np.float64)
        # Feature group: the probe category where the feature's mean activation is highest;
        # label: its top-activating probes.
        cats = probes["category"].to_numpy()
        levels = sorted(set(cats.tolist()))
        means = np.stack([X[cats == c].mean(0) for c in levels], axis=1)
        fgroup = [levels[i] for i in means.argmax(1)]
        top = [", ".join(probes["id"][np.argsort(-X[:, j], kind="stable")[:3]].to_list()) for j in range(X.shape[1])]
        labels = [f"{g}: {probes['prompt'][int(np.argmax(X[:, j]))][:60]}" for j, g in enumerate(fgroup)]
        pol_cfg = cfg["policy"]
        policy = fit_policy(X, y0, lam=pol_cfg["lam"], intercept=pol_cfg["intercept"], standardize=pol_cfg["standardize"],
                            feature_ids=chosen["feature_id"].to_numpy(), labels=labels, threads=cfg["run"]["threads"])
        features = chosen.select("feature_id", "n_active", "frac_active", "mean", "corr", "score", "rank").with_columns(
            pl.Series("group", fgroup), pl.Series("label", labels), pl.Series("top_probes", top))
        pred = policy.predict(X)
        from .fidelity import policy_fidelity

        fid = policy_fidelity(X, y0, harmful.astype(bool) if probes["harmful"].null_count() == 0 else None, cats,
                              policy.lam, pol_cfg["intercept"], pol_cfg["standardize"], seed=cfg["run"]["seed"])
        from .engine import UpdateConfig, UpdateEngine

        u = cfg["update"]
        ucfg = UpdateConfig(u["optimizer"], u["lr"], u["steps"],
                            tuple(u["params"]) if isinstance(u["params"], list) else u["params"], u["max_length"],
                            lora_rank=u["lora_rank"], lora_alpha=u["lora_alpha"], lora_targets=tuple(u["lora_targets"]),
                            lora_seed=cfg["run"]["seed"])
        engine = UpdateEngine(lm.model, lm.tokenizer, ucfg, m["device"])
        return SimpleNamespace(
            cfg=cfg, probes=probes, pairs=pairs, all_pairs=ds.pairs, lm=lm, reader=reader, runner=runner,
            probe_ids=probe_ids, H0=H0, y0=y0, cols=cols, gated=gated, pre0=pre0, X=X, cats=cats, fgroup=fgroup,
            features=features, policy=policy, pred=pred, fid=fid, quality=quality, engine=engine,
            w_enc=reader.w_enc(cols) if gated else None, gate=(pre0 > 0) if gated else None,
        )

    def delta(self, ctx: SimpleNamespace, params: dict) -> tuple[np.ndarray, np.ndarray]:
        """ΔX (selected features) and Δy of the probe set under updated weights."""
        H1, y1 = ctx.runner.run(ctx.probe_ids, params=params, probe_ids=ctx.probes["id"].to_list())
        if ctx.gated:
            dX = ctx.gate * ((H1.astype(np.float64) - ctx.H0.astype(np.float64)) @ ctx.w_enc)
        else:
            dX = ctx.reader.encode(H1)[:, ctx.cols].astype(np.float64) - ctx.X
        return dX, y1 - ctx.y0

    # --- the job ------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self._manifest()
        if manifest["status"] == "complete":
            self.log(f"{self.dir} is complete; nothing to do")
            return manifest
        cfgmod.write_atomic(self.dir / "config.toml", cfgmod.to_toml(cfg))
        self._save_manifest(manifest)
        t0 = time.time()
        ctx = self.setup()
        probes, pairs, policy, X, y0 = ctx.probes, ctx.pairs, ctx.policy, ctx.X, ctx.y0
        cols, cats, fgroup, features, engine = ctx.cols, ctx.cats, ctx.fgroup, ctx.features, ctx.engine
        self._write_parquet(policy.to_frame(), "policy.parquet")
        policy.save(self.dir / "policy.json")
        self._write_parquet(features, "features.parquet")
        self._write_parquet(probes.with_columns(pl.Series("y", y0), pl.Series("y_pred", ctx.pred)), "probes.parquet")
        manifest["stages"]["base"] = {"n_probes": probes.height, "n_features": int(len(cols)), "lam": policy.lam,
                                      "sae_quality": ctx.quality, "fidelity": ctx.fid}
        self._save_manifest(manifest)

        att = Attributor(policy, X, y0, method=cfg["decompose"]["method"], probe_groups=cats.tolist(),
                         feature_groups=fgroup, threads=cfg["run"]["threads"], keep=False)
        batch = cfg["run"]["pair_batch"]
        n_shards = (pairs.height + batch - 1) // batch
        todo = [i for i in range(n_shards) if str(i) not in manifest["shards"]]
        bar = _progress(total=pairs.height, initial=(n_shards - len(todo)) * batch if todo else pairs.height,
                        enabled=self.progress)
        t_pairs, n_done = time.time(), 0
        for shard in todo:
            rows = pairs[shard * batch : (shard + 1) * batch]
            dXs, dys = [], []
            for r in rows.iter_rows(named=True):
                dX, dy = self.delta(ctx, engine.update(r["prompt"], r["response"], r["id"]))
                dXs.append(sp.csr_matrix(dX))
                dys.append(dy)
                bar.update(1)
            import io

            buf = io.BytesIO()
            np.savez(buf, dX=np.stack([d.toarray() for d in dXs]), dy=np.stack(dys), ids=np.array(rows["id"].to_list()))
            cfgmod.write_atomic(self.dir / f"shards/deltas-{shard:05d}.npz", buf.getvalue())
            frame = att.add(dXs, np.stack(dys), pair_ids=rows["id"].to_list(), pair_groups=rows["category"].to_list())
            att_pairs = att.last_pairs
            self._write_parquet(frame, f"shards/pair_features-{shard:05d}.parquet")
            self._write_parquet(att_pairs.with_columns(pl.Series("label", rows["label"].to_list())),
                                f"shards/pairs-{shard:05d}.parquet")
            manifest["shards"][str(shard)] = {"pairs": rows.height}
            n_done += rows.height
            self._save_manifest(manifest)
        bar.close()

        # --- finalize -----------------------------------------------------------------------
        pf = pl.concat([pl.read_parquet(self.dir / f"shards/pair_features-{i:05d}.parquet") for i in range(n_shards)])
        pr = pl.concat([pl.read_parquet(self.dir / f"shards/pairs-{i:05d}.parquet") for i in range(n_shards)])
        self._write_parquet(pf, "pair_features.parquet")
        self._write_parquet(pr, "pairs.parquet")
        fg = features.select("feature_id", pl.col("group").alias("feature_group"))
        self._write_parquet(summarize_interference(pf, pr, fg), "interference.parquet")
        manifest["status"] = "complete"
        manifest["stages"]["pairs"] = {"n_pairs": pairs.height, "shards": n_shards}
        if n_done:
            # Informational, left out of the outputs' bytes: the manifest is not an output.
            manifest["stages"]["pairs"]["seconds_per_pair"] = round((time.time() - t_pairs) / n_done, 3)
        self._save_manifest(manifest)
        self.log(f"done in {time.time() - t0:.0f} s: {self.dir}")
        return manifest


def _progress(total: int, initial: int, enabled: bool, what: str = "pair"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{what}s", unit=what, disable=not enabled)


def run(config: dict | str | Path, run_dir: str | Path, progress: bool = True) -> dict:
    cfg = cfgmod.load(config) if isinstance(config, (str, Path)) else cfgmod.resolve(config)
    return Run(cfg, run_dir, progress=progress).execute()
