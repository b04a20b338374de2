#!/usr/bin/env python
"""Benchmark of policytrace's numeric core against the float64 numpy reference and scikit-learn.

    python benches/bench_core.py          # full size; writes results/core.json + README table
    python benches/bench_core.py --quick  # small sizes; writes results/core-quick.json only

What is measured (see benches/README.md for the flop model and the memory method):

* machine peak: a large float64 matmul (numpy/BLAS) on the same thread budget;
* decomposition of P pairs, n probes, K features with SAE-like sparsity (ΔX has exactly X's
  sparsity pattern): ``exact`` and ``first_order``, Rust on all P pairs (median of
  ``--repeats``), the numpy reference (``_backend="numpy"``) and a loop of scikit-learn ``Ridge``
  refits on the first ``--baseline-pairs`` pairs (one run each); throughput is pairs/s;
* the fit path on a TopK-like sparse activation matrix: statistics + selection
  (``select_features``), ``selected_columns``, ``fit_policy(lam="gcv")`` over the default
  25-point grid, Rust vs ``backend="numpy"``.

Every measured case runs in a fresh subprocess (this script with ``--case NAME``) so that its
peak RSS can be read in isolation. Both sides get the same thread budget: ``threads=`` for the
Rust core, ``threadpoolctl.threadpool_limits`` for BLAS/OpenMP in numpy, scipy and scikit-learn.
The script only measures and writes; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = HERE / "README.md"
BEGIN, END = "<!-- core:begin -->", "<!-- core:end -->"

# The targets (speed-up of the Rust core over the numpy reference, pairs/s ratio).
TARGETS = {"exact": 10.0, "first_order": 20.0, "fit": 5.0}

RECORDED_ENV = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "POLARS_MAX_THREADS",
    "POLICYTRACE_NUM_THREADS",
)

DECOMP_CASES = (
    "decomp-exact-rust",
    "decomp-exact-numpy",
    "decomp-exact-sklearn",
    "decomp-first_order-rust",
    "decomp-first_order-numpy",
)
FIT_CASES = ("fit-rust", "fit-numpy")
ALL_CASES = ("peak-matmul",) + DECOMP_CASES + FIT_CASES


@dataclasses.dataclass
class Config:
    quick: bool = False
    seed: int = 20240611
    threads: int = 2
    repeats: int = 3
    # decomposition
    pairs: int = 2000
    probes: int = 2000
    features: int = 128
    baseline_pairs: int = 200
    density: float = 0.10
    dx_rel: float = 0.05
    # fit path
    fit_probes: int = 20000
    fit_features: int = 16384
    fit_nnz: int = 64
    fit_k: int = 128
    select_method: str = "mean_diff"
    # machine peak
    matmul_size: int = 4096

    @classmethod
    def quick_defaults(cls) -> "Config":
        return cls(
            quick=True,
            pairs=200,
            probes=500,
            features=64,
            baseline_pairs=50,
            fit_probes=4000,
            fit_features=4096,
            fit_k=64,
            matmul_size=2048,
        )


# ---------------------------------------------------------------------------------------
# memory: peak RSS of this process above a baseline (Linux /proc; ru_maxrss as a fallback)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so that memory freed by the data
    generation is not silently reused by the measured call without raising the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager: peak resident memory above the RSS at entry, in MiB.

    With a resettable VmHWM the peak is exact for the block; otherwise ru_maxrss is used,
    which is only right when the block exceeds every earlier peak of the process. Freed heap
    memory is returned to the OS first (``malloc_trim``) so reuse of it is counted.
    """

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        self.base = _status_kib("VmRSS")
        self.exact = self.base is not None and _reset_hwm()
        if not self.exact:
            self.base = self.base if self.base is not None else _maxrss_kib()
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self.exact else _maxrss_kib()
        self.mib = max(0, (peak or 0) - self.base) / 1024.0
        self.method = "VmHWM reset (clear_refs)" if self.exact else "ru_maxrss"


# ---------------------------------------------------------------------------------------
# synthetic data (fixed seeds; every child regenerates exactly the same arrays)


def decomp_data(cfg: Config, n_pairs: int):
    """X (n, K) dense, SAE-like; y; stacked ΔX CSR (n_pairs*n, K) with X's pattern; dy."""
    import numpy as np
    import scipy.sparse as sp

    n, k = cfg.probes, cfg.features
    rng = np.random.default_rng([cfg.seed, 1])
    # Per-feature firing rates: log-normal around the target density (heavy-tailed, like
    # SAE latents), per-feature magnitude scales, and heavy-tailed positive codes.
    freq = np.clip(rng.lognormal(np.log(cfg.density) - 0.245, 0.7, size=k), 0.01, 0.6)
    mag = rng.lognormal(0.0, 0.5, size=k)
    active = rng.random((n, k)) < freq
    # Every feature fires on at least 5 probes (so no column is constant).
    for j in range(k):
        if active[:, j].sum() < 5:
            active[rng.choice(n, 5, replace=False), j] = True
    X = np.where(active, rng.lognormal(0.0, 0.8, size=(n, k)) * mag, 0.0)
    w = rng.standard_normal(k) * (rng.random(k) < 0.3)
    signal = X @ w
    y = signal + 0.5 * (signal.std() + 1e-3) * rng.standard_normal(n)

    Xc = sp.csr_matrix(X)
    nnz = Xc.nnz
    ysd = float(y.std())
    data = np.empty(n_pairs * nnz)
    dy = np.empty((n_pairs, n))
    cols = Xc.indices
    for p in range(n_pairs):
        rp = np.random.default_rng([cfg.seed, 3, p])
        # Gated linearization: ΔX_ij = gate_ij · Δpre_ij, non-zero exactly where X is active.
        data[p * nnz : (p + 1) * nnz] = cfg.dx_rel * mag[cols] * rp.standard_normal(nnz)
        dy[p] = ysd * (0.02 * rp.standard_normal(n) + 0.05 * rp.standard_normal())
    indptr = np.concatenate(
        [[0], (np.arange(n_pairs, dtype=np.int64)[:, None] * nnz + Xc.indptr[1:][None, :]).ravel()]
    )
    indices = np.tile(Xc.indices, n_pairs)
    dX = sp.csr_matrix((data, indices, indptr), shape=(n_pairs * n, k))
    row_nnz = np.diff(Xc.indptr)
    return X, y, dX, dy, {"nnz_x": int(nnz), "sum_row_nnz_sq": int((row_nnz**2).sum())}


def fit_data(cfg: Config):
    """TopK-like sparse activations (n, F), harmful flag, behaviour score y."""
    import numpy as np
    import scipy.sparse as sp

    n, f, m = cfg.fit_probes, cfg.fit_features, cfg.fit_nnz
    rng = np.random.default_rng([cfg.seed, 2])
    # Zipf-like feature popularity, randomly permuted over latent indices.
    perm = rng.permutation(f)
    pop = np.empty(f)
    pop[perm] = 1.0 / np.arange(1, f + 1) ** 0.9
    cdf = np.cumsum(pop / pop.sum())
    harmful = rng.random(n) < 0.5
    # Behaviour features (moderately popular): harmful probes fire them more often.
    n_beh = max(2 * cfg.fit_k, 16)
    behaviour = perm[rng.choice(np.arange(min(100, f // 4), min(4000, f)), n_beh, replace=False)]
    n_extra = max(m // 8, 1)
    # TopK-like rows of exactly m distinct latents: draw 2m candidates by popularity, drop
    # repeats, keep the m with the smallest random priority (behaviour draws always kept).
    cand = np.minimum(np.searchsorted(cdf, rng.random((n, 2 * m))), f - 1)
    key = rng.random((n, 2 * m))
    cand[harmful, :n_extra] = behaviour[rng.integers(0, n_beh, size=(int(harmful.sum()), n_extra))]
    key[harmful, :n_extra] = -1.0
    order = np.lexsort((key, cand), axis=-1)
    cs, ks = np.take_along_axis(cand, order, 1), np.take_along_axis(key, order, 1)
    ks[:, 1:][cs[:, 1:] == cs[:, :-1]] = np.inf
    keep = np.argpartition(ks, m - 1, axis=1)[:, :m]
    cols = np.take_along_axis(cs, keep, 1)
    vals = rng.lognormal(0.0, 0.8, size=(n, m))
    rows = np.repeat(np.arange(n), m)
    Xf = sp.coo_matrix((vals.ravel(), (rows, cols.ravel())), shape=(n, f)).tocsr()
    Xf.sum_duplicates()
    w = np.zeros(f)
    w[behaviour] = rng.standard_normal(n_beh)
    signal = np.asarray(Xf @ w).ravel() + 1.0 * harmful
    y = signal + 0.5 * signal.std() * rng.standard_normal(n)
    return Xf, harmful, y


# ---------------------------------------------------------------------------------------
# cases (run in a child process)


def _timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        out = None  # free the previous result before the next run
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _policy(cfg: Config, X, y):
    import policytrace as pt

    return pt.fit_policy(X, y, lam="gcv", _backend="rust", threads=cfg.threads)


def case_peak_matmul(cfg: Config, work: Path) -> dict:
    import numpy as np

    s = cfg.matmul_size
    rng = np.random.default_rng([cfg.seed, 9])
    a, b = rng.standard_normal((s, s)), rng.standard_normal((s, s))
    a @ b  # warm-up
    times, _ = _timed(lambda: a @ b, 3)
    best = min(times)
    return {
        "size": s,
        "times_s": times,
        "best_s": best,
        "gflops": 2.0 * s**3 / best / 1e9,
        "timing": "best of 3 after one warm-up",
    }


def _flops_per_pair(method: str, n: int, k: int, nnz: int, sum_row_sq: int) -> float:
    if method == "first_order":
        return 4.0 * n * k + 4.0 * nnz + 2.0 * k * k
    return 2.0 * nnz * k + sum_row_sq + k**3 / 3.0 + 4.0 * k * k + 2.0 * n * k


def case_decomp(cfg: Config, work: Path, method: str, side: str) -> dict:
    import numpy as np

    import policytrace as pt

    n, k = cfg.probes, cfg.features
    full = side == "rust"
    n_pairs = cfg.pairs if full else min(cfg.baseline_pairs, cfg.pairs)
    X, y, dX, dy, shape = decomp_data(cfg, n_pairs)
    pol = _policy(cfg, X, y)
    res: dict = {
        "method": method,
        "side": side,
        "pairs_timed": n_pairs,
        "nnz_dx": int(dX.nnz),
        "density_x": shape["nnz_x"] / (n * k),
        "lam": pol.lam,
        **shape,
    }
    bsub = min(cfg.baseline_pairs, n_pairs)
    if side == "rust":
        from policytrace.numeric._inputs import csr_tuple

        res["timing"] = f"median of {cfg.repeats}"
        with PeakRSS() as mem:
            times, frame = _timed(
                lambda: pt.decompose(pol, X, y, dX, dy, method=method, threads=cfg.threads),
                cfg.repeats,
            )
        del frame
        res.update(api_times_s=times, api_s=statistics.median(times), api_peak_mib=mem.mib)
        # The compiled core alone: prepared once, run on a ready CSR tuple (no Python glue).
        core = pt.numeric._backend.backend("rust").Decomposer(
            pol.coef, pol.intercept, pol.lam, pol.scale, pol.fit_intercept, X, y, cfg.threads
        )
        dxt = csr_tuple(dX)
        with PeakRSS() as mem:
            times, out = _timed(lambda: core.run(dxt, dy, method, cfg.threads), cfg.repeats)
        res.update(core_times_s=times, core_s=statistics.median(times), core_peak_mib=mem.mib)
        res["memory_method"] = mem.method
        res["n_fallback"] = int(out.n_fallback)
        d_t, d_x, d_y = (np.asarray(getattr(out, key))[:bsub] for key in ("d_total", "d_x", "d_y"))
        flops = n_pairs * _flops_per_pair(method, n, k, shape["nnz_x"], shape["sum_row_nnz_sq"])
        res["flops"] = flops
        res["api_gflops"] = flops / res["api_s"] / 1e9
        res["core_gflops"] = flops / res["core_s"] / 1e9
    elif side == "numpy":
        res["timing"] = "one run"
        with PeakRSS() as mem:
            times, frame = _timed(
                lambda: pt.decompose(
                    pol, X, y, dX, dy, method=method, _backend="numpy", threads=cfg.threads
                ),
                1,
            )
        res.update(api_times_s=times, api_s=times[0], api_peak_mib=mem.mib)
        res["memory_method"] = mem.method
        d_t, d_x, d_y = (
            frame[c].to_numpy().reshape(n_pairs, k)[:bsub]
            for c in ("d_coef", "d_coef_x", "d_coef_y")
        )
    elif side == "sklearn":
        from sklearn.linear_model import Ridge

        res["timing"] = "one run"
        res["sklearn_solver"] = "auto (cholesky for dense input)"
        s, b, lam, ic = pol.scale, pol.coef, pol.lam, pol.fit_intercept

        def refit(Z, t):
            return Ridge(alpha=lam, fit_intercept=ic).fit(Z, t).coef_

        def loop():
            Z = X / s
            out = np.zeros((3, n_pairs, k))
            for p in range(n_pairs):
                Zp = (X + dX[p * n : (p + 1) * n].toarray()) / s
                yp = y + dy[p]
                out[0, p] = refit(Zp, yp) - b  # total
                out[1, p] = refit(Zp, y) - b  # x-path
                out[2, p] = refit(Z, yp) - b  # y-path
            return out

        with PeakRSS() as mem:
            times, out = _timed(loop, 1)
        res.update(api_times_s=times, api_s=times[0], api_peak_mib=mem.mib)
        res["memory_method"] = mem.method
        d_t, d_x, d_y = out[0][:bsub], out[1][:bsub], out[2][:bsub]
    else:
        raise ValueError(side)
    np.savez(work / f"decomp-{method}-{side}.npz", d_total=d_t, d_x=d_x, d_y=d_y)
    return res


def case_fit(cfg: Config, work: Path, side: str) -> dict:
    import numpy as np

    import policytrace as pt

    Xf, harmful, y = fit_data(cfg)
    sel_kw = dict(method=cfg.select_method, k=cfg.fit_k)
    if cfg.select_method == "mean_diff":
        # threshold 0: the top-k by |mean difference| (k fixes the policy's size)
        sel_kw.update(groups=harmful, threshold=0.0)

    def run():
        t0 = time.perf_counter()
        frame = pt.select_features(Xf, y, _backend=side, threads=cfg.threads, **sel_kw)
        t1 = time.perf_counter()
        Xs, ids = pt.selected_columns(Xf, frame)
        t2 = time.perf_counter()
        pol = pt.fit_policy(Xs, y, lam="gcv", feature_ids=ids, _backend=side, threads=cfg.threads)
        t3 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2, t3 - t0), pol

    reps = cfg.repeats if side == "rust" else 1
    stages = []
    with PeakRSS() as mem:
        for _ in range(reps):
            st, pol = run()
            stages.append(st)
    med = [statistics.median(col) for col in zip(*stages)]
    n, k = cfg.fit_probes, pol.n_features
    flops = 6.0 * Xf.nnz + 2.0 * n * k * k + 10.0 * k**3
    np.savez(
        work / f"fit-{side}.npz",
        feature_ids=pol.feature_ids,
        coef=pol.coef,
        lam=np.array([pol.lam]),
        gcv_score=pol.gcv_score,
    )
    return {
        "side": side,
        "timing": f"median of {reps}" if reps > 1 else "one run",
        "nnz": int(Xf.nnz),
        "nnz_per_row": Xf.nnz / n,
        "k_selected": k,
        "gcv_points": int(len(pol.gcv_grid)),
        "lam": pol.lam,
        "stage_runs_s": stages,
        "select_s": med[0],
        "columns_s": med[1],
        "fit_s": med[2],
        "total_s": med[3],
        "peak_mib": mem.mib,
        "memory_method": mem.method,
        "flops": flops,
        "gflops": flops / med[3] / 1e9,
    }


def run_case(name: str, cfg: Config, work: Path) -> dict:
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=cfg.threads):
        info = threadpool_info()
        if name == "peak-matmul":
            out = case_peak_matmul(cfg, work)
        elif name.startswith("decomp-"):
            _, method, side = name.split("-")
            out = case_decomp(cfg, work, method, side)
        elif name.startswith("fit-"):
            out = case_fit(cfg, work, name.split("-")[1])
        else:
            raise ValueError(f"unknown case {name}")
    keys = ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture")
    out["threadpools"] = [{kk: d.get(kk) for kk in keys} for d in info]
    return out


# ---------------------------------------------------------------------------------------
# parent: orchestration, comparison, reporting


def _spawn(name: str, cfg_path: Path, work: Path, timeout: float) -> dict:
    env = dict(os.environ)
    # polars' own pool follows the same budget (only set in the child; never overrides a
    # value the user set). BLAS/OpenMP are limited inside the child with threadpoolctl.
    env.setdefault("POLARS_MAX_THREADS", str(json.loads(cfg_path.read_text())["threads"]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name,
           "--workdir", str(work), "--config", str(cfg_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    out_file = work / f"{name}.json"
    if proc.returncode != 0 or not out_file.exists():
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    res = json.loads(out_file.read_text())
    res["child_wall_s"] = wall
    return res


def _rel_diff(a, b) -> float:
    """max over pairs of max|a_p - b_p| / max|b_p| (b is the reference)."""
    import numpy as np

    den = np.maximum(np.abs(b).max(axis=1), np.finfo(float).tiny)
    return float((np.abs(a - b).max(axis=1) / den).max())


def _agreement(work: Path, method: str, other: str) -> dict | None:
    import numpy as np

    fa, fb = work / f"decomp-{method}-rust.npz", work / f"decomp-{method}-{other}.npz"
    if not (fa.exists() and fb.exists()):
        return None
    a, b = np.load(fa, allow_pickle=False), np.load(fb, allow_pickle=False)
    m = min(a["d_total"].shape[0], b["d_total"].shape[0])
    out = {key: _rel_diff(a[key][:m], b[key][:m]) for key in ("d_total", "d_x", "d_y")}
    return out | {"pairs": m}


def _fit_agreement(work: Path) -> dict | None:
    import numpy as np

    fa, fb = work / "fit-rust.npz", work / "fit-numpy.npz"
    if not (fa.exists() and fb.exists()):
        return None
    a, b = np.load(fa, allow_pickle=False), np.load(fb, allow_pickle=False)
    ia, ib = a["feature_ids"], b["feature_ids"]
    same = ia.shape == ib.shape and bool((ia == ib).all())
    out = {"same_features": same, "lam_rust": float(a["lam"][0]), "lam_numpy": float(b["lam"][0])}
    if same:
        diff = np.abs(a["coef"] - b["coef"]).max() / np.abs(b["coef"]).max()
        out["coef_max_rel_diff"] = float(diff)
    return out


def _machine() -> dict:
    cpu = None
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        cpu = platform.processor()
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "simd": sorted(f for f in ("avx2", "fma", "avx512f") if f in flags),
        "memory_gib": mem,
        "platform": platform.platform(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict:
    import numpy
    import polars
    import scipy
    import sklearn
    import threadpoolctl

    import policytrace
    import policytrace._core as core

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "polars": polars.__version__,
        "threadpoolctl": threadpoolctl.__version__,
        "policytrace": policytrace.__version__,
        "policytrace_core": core.__version__,
        "core_library": os.path.relpath(core.__file__, ROOT),
    }


def _git() -> dict:
    def git(*args):
        try:
            proc = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
            return proc.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"commit": commit, "dirty": dirty}


def _fmt(v, nd=2, suffix=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0" + suffix
        if abs(v) >= 100:
            return f"{v:,.0f}{suffix}"
        if abs(v) < 0.01:
            return f"{v:.1e}{suffix}"
        return f"{v:.{nd}f}{suffix}"
    return f"{v}{suffix}"


def _pct(frac) -> str:
    return "" if frac is None else _fmt(frac * 100, 1, "%")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summarize(doc: dict) -> dict:
    """Derived numbers: pairs/s, speed-ups, fractions of peak."""
    cases = doc["cases"]
    peak = cases.get("peak-matmul", {}).get("gflops")
    summary: dict = {"peak_gflops": peak, "decomposition": {}, "fit": {}}
    for method in ("exact", "first_order"):
        r = cases.get(f"decomp-{method}-rust", {})
        if "api_s" not in r:
            continue
        row = {
            "rust_api_pairs_per_s": r["pairs_timed"] / r["api_s"],
            "rust_core_pairs_per_s": r["pairs_timed"] / r["core_s"],
            "rust_api_gflops": r["api_gflops"],
            "rust_core_gflops": r["core_gflops"],
        }
        if peak:
            row["rust_core_frac_of_peak"] = r["core_gflops"] / peak
            row["rust_api_frac_of_peak"] = r["api_gflops"] / peak
        for other in ("numpy", "sklearn"):
            name = f"decomp-{method}-{other}" if other == "numpy" else "decomp-exact-sklearn"
            b = cases.get(name, {})
            if "api_s" not in b:
                continue
            pps = b["pairs_timed"] / b["api_s"]
            row[f"{other}_pairs_per_s"] = pps
            row[f"speedup_vs_{other}_api"] = row["rust_api_pairs_per_s"] / pps
            row[f"speedup_vs_{other}_core"] = row["rust_core_pairs_per_s"] / pps
        row["target_vs_numpy"] = TARGETS[method]
        summary["decomposition"][method] = row
    fr, fn = cases.get("fit-rust", {}), cases.get("fit-numpy", {})
    if "total_s" in fr and "total_s" in fn:
        summary["fit"] = {
            "speedup_total": fn["total_s"] / fr["total_s"],
            "speedup_select": fn["select_s"] / fr["select_s"],
            "speedup_fit": fn["fit_s"] / fr["fit_s"],
            "target": TARGETS["fit"],
        }
        if peak:
            summary["fit"]["rust_frac_of_peak"] = fr["gflops"] / peak
    return summary


def render(doc: dict) -> str:
    cfg, cases, summ = doc["config"], doc["cases"], doc["summary"]
    peak = summ.get("peak_gflops")
    m = doc["machine"]
    out = []
    out.append(
        f"Run {doc['timestamp']} on {m['cpu']} ({m['usable_cores']} usable cores, "
        f"{m['memory_gib']} GiB), commit `{(doc['git']['commit'] or 'n/a')[:10]}`"
        f"{' (dirty tree)' if doc['git']['dirty'] else ''}; "
        f"{cfg['threads']} threads on every side; "
        f"BLAS: {doc['blas']}; size: {'quick' if cfg['quick'] else 'full'}; load average "
        f"before/after: {(doc.get('loadavg_start') or ['?'])[0]} / "
        f"{(doc.get('loadavg_end') or ['?'])[0]}."
    )
    pm = cases.get("peak-matmul", {})
    out.append("")
    if peak:
        out.append(
            f"**Machine peak** (numpy float64 matmul {pm['size']}², {pm['timing']}): "
            f"{_fmt(peak, 1)} GFLOP/s."
        )
    else:
        out.append(f"**Machine peak**: not measured{' (error)' if 'error' in pm else ''}.")
    # --- decomposition
    d0 = next((cases[c] for c in DECOMP_CASES if "density_x" in cases.get(c, {})), {})
    out.append("")
    out.append(
        f"**Decomposition**: P = {cfg['pairs']:,} pairs, n = {cfg['probes']:,} probes, "
        f"K = {cfg['features']} features, X density {_fmt(d0.get('density_x'), 3)} "
        f"(ΔX has X's pattern, {_fmt(d0.get('nnz_x'))} non-zeros per pair). Rust runs all P pairs "
        f"(median of {cfg['repeats']}); baselines run the first "
        f"{min(cfg['baseline_pairs'], cfg['pairs'])} "
        f"pairs once. *api* = `pt.decompose(...)` end to end (input checks, CSR copies, the output "
        f"frame); *core* = `Decomposer.run` on a prepared CSR tuple."
    )
    out.append("")
    rows = []
    for method in ("exact", "first_order"):
        s = summ["decomposition"].get(method, {})
        r = cases.get(f"decomp-{method}-rust", {})
        if "error" in r:
            rows.append([method, "rust", "error", "", "", "", "", "", "", ""])
        if s:
            rows.append([
                f"`{method}`", "rust (api)", r["pairs_timed"], _fmt(r["api_s"], 3),
                _fmt(s["rust_api_pairs_per_s"], 1), "", _fmt(r["api_peak_mib"], 1),
                _fmt(r["api_gflops"], 2), _pct(s.get("rust_api_frac_of_peak")), "",
            ])
            rows.append([
                f"`{method}`", "rust (core)", r["pairs_timed"], _fmt(r["core_s"], 3),
                _fmt(s["rust_core_pairs_per_s"], 1), "", _fmt(r["core_peak_mib"], 1),
                _fmt(r["core_gflops"], 2), _pct(s.get("rust_core_frac_of_peak")), "",
            ])
        for other in ("numpy", "sklearn"):
            if other == "sklearn" and method != "exact":
                continue
            b = cases.get(f"decomp-{method}-{other}", {})
            label = "numpy reference" if other == "numpy" else "sklearn `Ridge` loop"
            if "error" in b:
                rows.append([f"`{method}`", label, "error", "", "", "", "", "", "", ""])
                continue
            if "api_s" not in b:
                continue
            agree = doc["agreement"].get(f"{method}-{other}") or {}
            sp_api = s.get(f"speedup_vs_{other}_api")
            sp_core = s.get(f"speedup_vs_{other}_core")
            speed = f"{_fmt(sp_api, 1)}× / {_fmt(sp_core, 1)}×"
            if other == "numpy":
                speed += f" (target {TARGETS[method]:.0f}×)"
            rows.append([
                f"`{method}`", label, b["pairs_timed"], _fmt(b["api_s"], 3),
                _fmt(b["pairs_timed"] / b["api_s"], 1), speed, _fmt(b["api_peak_mib"], 1), "", "",
                _fmt(agree.get("d_total"), 1),
            ])
    out.append(_table(
        ["method", "side", "pairs", "time (s)", "pairs/s", "Rust speed-up api / core",
         "peak RSS Δ (MiB)", "GFLOP/s", "% of peak", "max rel diff d_coef"],
        rows,
    ))
    fo = summ["decomposition"].get("first_order", {})
    sk = cases.get("decomp-exact-sklearn", {})
    if fo and "api_s" in sk:
        spd = fo["rust_core_pairs_per_s"] / (sk["pairs_timed"] / sk["api_s"])
        out.append("")
        out.append(
            f"`first_order` (core) against the sklearn refit loop: {_fmt(spd, 1)}× "
            "(not the same quantity: the refits give the exact shift)."
        )
    # --- fit path
    fr, fn = cases.get("fit-rust", {}), cases.get("fit-numpy", {})
    out.append("")
    fit_desc = (
        f"**Fit path**: n = {cfg['fit_probes']:,} probes, F = {cfg['fit_features']:,} candidate "
        f"features, ~{_fmt(fr.get('nnz_per_row') or fn.get('nnz_per_row'), 1)} non-zeros per row; "
        f"`select_features(method=\"{cfg['select_method']}\", k={cfg['fit_k']})` → "
        f"`selected_columns` → `fit_policy(lam=\"gcv\")` over {fr.get('gcv_points', 25)} λ. "
        f"Rust: median of {cfg['repeats']}; reference: one run."
    )
    out.append(fit_desc)
    out.append("")
    frows = []
    for side, r in (("rust", fr), ("numpy reference", fn)):
        if "error" in r:
            frows.append([side, "error", "", "", "", "", "", ""])
            continue
        if not r:
            continue
        frows.append([
            side, _fmt(r["select_s"], 3), _fmt(r["columns_s"], 3), _fmt(r["fit_s"], 3),
            _fmt(r["total_s"], 3), _fmt(r["peak_mib"], 1), _fmt(r["gflops"], 2),
            _fmt(r["gflops"] / peak * 100, 1, "%") if peak else "",
        ])
    fs = summ.get("fit") or {}
    if fs:
        frows.append([
            "**speed-up**", f"{_fmt(fs['speedup_select'], 1)}×", "",
            f"{_fmt(fs['speedup_fit'], 1)}×",
            f"**{_fmt(fs['speedup_total'], 1)}×** (target {TARGETS['fit']:.0f}×)", "", "", "",
        ])
    out.append(_table(
        ["side", "stats + selection (s)", "selected_columns (s)", "fit + GCV (s)", "total (s)",
         "peak RSS Δ (MiB)", "GFLOP/s", "% of peak"],
        frows,
    ))
    fa = doc["agreement"].get("fit")
    if fa:
        out.append("")
        out.append(
            f"Same selected features: {fa['same_features']}; λ rust {fa['lam_rust']:.4g} vs "
            f"numpy {fa['lam_numpy']:.4g}"
            + (
                f"; max rel diff of coef {fa['coef_max_rel_diff']:.1e}."
                if "coef_max_rel_diff" in fa
                else "."
            )
        )
    return "\n".join(out)


def write_readme(body: str) -> None:
    section = f"{BEGIN}\n{body}\n{END}"
    if README.exists():
        text = README.read_text()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            README.write_text(pre + section + post)
            return
        README.write_text(text.rstrip("\n") + "\n\n" + section + "\n")
        return
    README.write_text(README_INTRO + "\n" + section + "\n")


README_INTRO = """# Benchmarks

`bench_core.py` measures the numeric core (the compiled Rust backend) against the package's
float64 numpy reference (`_backend="numpy"`, `policytrace/numeric/_reference.py`) and a loop of
scikit-learn `Ridge` refits, in one run, on one machine, with every side held to the same
thread budget (default 2): `threads=` for the core, `threadpoolctl.threadpool_limits` for
BLAS/OpenMP in numpy, scipy and scikit-learn, and `POLARS_MAX_THREADS` for polars.

    pip install -e . scikit-learn threadpoolctl
    python benches/bench_core.py          # full size (minutes): results/core.json + the table below
    python benches/bench_core.py --quick  # small sizes: results/core-quick.json only

Options: `--pairs P --probes n --features K --baseline-pairs B --threads T --repeats R
--out PATH --write-readme/--no-readme --cases a,b`. The script only measures and writes; it
asserts nothing.

## What is measured

* **Machine peak**: best of 3 float64 matmuls (4096² by default) with numpy on the same
  threads, as the roofline for the numbers below.
* **Decomposition** (`pt.decompose`): P pairs × n probes × K features. X is non-negative and
  heavy-tailed (log-normal codes, log-normal per-feature firing rates around 10 % density);
  y is linear in X plus noise; each pair's ΔX is non-zero exactly where X is active
  (gated linearization), ~5 % of the feature's scale; Δy is small. ΔX is one pair-major CSR
  of shape (P·n, K). The Rust core runs all P pairs (median of 3); the numpy reference
  (`exact` = three literal refits per pair, `first_order` = the per-pair formula) and the
  scikit-learn loop (`Ridge(alpha=λ, fit_intercept=True)` on Z = X/s for the total, x-path
  and y-path refits) run the first B pairs once. Throughput is pairs/s; a speed-up is the
  Rust pairs/s over the baseline's pairs/s. *api* times `pt.decompose` end to end; *core*
  times `Decomposer.run` on a ready CSR tuple. The Rust output on those B pairs is compared
  with each baseline: max over pairs of max|Δβ_rust − Δβ_ref| / max|Δβ_ref|.
* **Fit path**: TopK-like activations (Zipf-like feature popularity, ~64 non-zeros per row),
  a random harmful flag with harmful probes firing a set of behaviour features more often;
  `select_features` (statistics + selection of the top k), `selected_columns`, and
  `fit_policy(lam="gcv")` over the default 25-point grid, per stage.

## Flop model

Achieved GFLOP/s = model flops / measured time; "% of peak" divides by the matmul GFLOP/s.
Per pair, with nnz = non-zeros of that pair's ΔX (= nnz of X) and nnz_r those of row r:

* `first_order` ≈ 4·n·K (the two GEMM columns Z̃ᵀ[Δy, ΔZβ]) + 4·nnz (the sparse passes
  ΔZβ and ΔZᵀr) + 2·K² (the solves against the base factorization);
* `exact` ≈ 2·nnz·K (Z̃ᵀΔZ) + Σ_r nnz_r² (ΔZᵀΔZ) + K³/3 (Cholesky of A + ΔG)
  + 4·K² (ΔGβ and the two-column solve) + 2·n·K (Z̃ᵀΔy).

The fit path model is 6·nnz (statistics) + 2·n·K² (Gram) + 10·K³ (eigendecomposition and
solve); it is rough, as that path is dominated by memory traffic and Python glue.

The model counts useful work of the algorithm the core uses, not the (much larger) work of
the refits the baselines do, so the baselines get no GFLOP/s figure.

## Peak memory

Each case runs in a fresh subprocess (`bench_core.py --case NAME`). After imports and data
generation the child returns freed heap pages to the OS (glibc `malloc_trim(0)`, so that
reusing memory freed by the data generation still counts), resets the kernel's peak-RSS
mark (`echo 5 > /proc/self/clear_refs`),
runs the measured call(s) and reads `VmHWM` from `/proc/self/status`; the reported figure is
that peak minus the RSS just before the call, i.e. the extra memory the call needed over
its inputs (which are already in memory). Where the mark cannot be reset, `ru_maxrss` is
used instead (recorded as `memory_method` in the JSON).

## Caveats

* Run on an otherwise idle machine: the JSON records the load average before and after
  the run, and the script prints a note when the machine was busy at the start.
* The quick mode (`--quick`) only checks that the script works; its sizes are too small
  for the speed-ups to mean much.

## Results
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; writes core-quick.json")
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--probes", type=int)
    ap.add_argument("--features", type=int)
    ap.add_argument("--baseline-pairs", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--fit-probes", type=int)
    ap.add_argument("--fit-features", type=int)
    ap.add_argument("--fit-nnz", type=int)
    ap.add_argument("--fit-k", type=int)
    ap.add_argument("--select-method", choices=("mean_diff", "corr"))
    ap.add_argument("--matmul-size", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--out", type=Path)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write-readme", action="store_true", default=None)
    g.add_argument("--no-readme", dest="write_readme", action="store_false")
    ap.add_argument("--cases", help=f"comma-separated subset of {','.join(ALL_CASES)}")
    ap.add_argument("--case-timeout", type=float, default=3600.0)
    # internal: run one case in this process
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.case:
        cfg = Config(**json.loads(args.config.read_text()))
        res = run_case(args.case, cfg, args.workdir)
        (args.workdir / f"{args.case}.json").write_text(json.dumps(res))
        return 0

    cfg = Config.quick_defaults() if args.quick else Config()
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "quick":
            setattr(cfg, f.name, v)
    cases = ALL_CASES if not args.cases else tuple(c.strip() for c in args.cases.split(","))
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {ALL_CASES}")
    out_path = args.out or HERE / "results" / ("core-quick.json" if cfg.quick else "core.json")
    readme = args.write_readme if args.write_readme is not None else not cfg.quick

    import numpy  # noqa: F401  (load the BLAS libraries so threadpoolctl sees them)
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=cfg.threads):
        blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
    blas_desc = ", ".join(
        f"{d.get('internal_api')} {d.get('version')} "
        f"({d.get('architecture')}, {d.get('num_threads')} thr)"
        for d in blas
    ) or "unknown"

    doc: dict = {
        "benchmark": "policytrace core",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "machine": _machine(),
        "versions": _versions(),
        "git": _git(),
        "env": {k: os.environ.get(k) for k in RECORDED_ENV},
        "blas": blas_desc,
        "threadpools_parent": threadpool_info(),
        "loadavg_start": _loadavg(),
        "cases": {},
        "agreement": {},
    }
    print(f"policytrace core benchmark ({'quick' if cfg.quick else 'full'}), {cfg.threads} threads")
    load = doc["loadavg_start"]
    if load and load[0] > 1.0:
        print(f"  note: 1-min load average is {load[0]} before the run; timings may be disturbed")
    with tempfile.TemporaryDirectory(prefix="pt-bench-") as tmp:
        work = Path(tmp)
        cfg_path = work / "config.json"
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        for name in cases:
            print(f"  {name:<26}", end="", flush=True)
            res = _spawn(name, cfg_path, work, args.case_timeout)
            doc["cases"][name] = res
            if "error" in res:
                print(f"ERROR {res['error'][-400:]}")
            else:
                print(f"done in {res['child_wall_s']:.1f} s")
        for method in ("exact", "first_order"):
            for other in ("numpy", "sklearn"):
                a = _agreement(work, method, other)
                if a:
                    doc["agreement"][f"{method}-{other}"] = a
        fa = _fit_agreement(work)
        if fa:
            doc["agreement"]["fit"] = fa
    doc["loadavg_end"] = _loadavg()
    doc["summary"] = summarize(doc)
    body = render(doc)
    print()
    print(body)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_name(out_path.name + ".tmp")
    tmp_out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp_out, out_path)
    print(f"\nwrote {os.path.relpath(out_path)}")
    if readme:
        write_readme(body)
        print(f"updated {os.path.relpath(README)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
