#!/usr/bin/env python
"""The numeric core's speed as a property of the whole public call (issue "What outside checks
found", item 1): ``pt.decompose`` on ΔX given dense, as one stacked CSR, or as a list of per-pair
CSR matrices, against the compiled kernel alone (``Decomposer.run`` on what the call hands it)
and against two plain numpy per-pair loops written here, in the same process:

* ``numpy refits``: per pair, the policy refit literally (the paper's definition: three ridge
  solves for exact, the first-order formula per pair), dense float64, BLAS-backed;
* ``numpy solve``: per pair, the perturbed normal equations solved directly (one Gram update and
  one solve for exact; first order against one Cholesky factor), the strongest plain numpy loop;
* ``reference``: the package's own float64 numpy transcription (``_backend="numpy"``: literal
  refits through its sparse-aware design code, pair by pair), the loop the core's earlier
  benchmarks and the issue's bar compare with.

    python benches/whole_call.py                      # the issue's shape: JSON + table on stdout
    python benches/whole_call.py --guard              # CI: exit 1 when a ratio collapses
    python benches/whole_call.py --compare-with DIR   # also an older build (PYTHONPATH=DIR), side by side

Nothing here asserts speed except ``--guard``, whose floors sit far below the measured ratios
(benches/README.md) so that noise on a shared CI machine never trips them but a 10x collapse
(the 0.2.0 regression: dense ΔX through scipy COO) does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
FORMS = ("dense", "csr", "list")
METHODS = ("exact", "first_order")
# --guard floors: whole call / kernel at most this, whole call at least this many times the
# package's reference loop. Far inside the measured ratios (benches/README.md), far outside what
# 0.2.0's dense path gave (whole / kernel 6-35x).
GUARD_OVERHEAD = 4.0
GUARD_SPEEDUP = 4.0


def data(p: int, n: int, k: int, density: float, seed: int = 0):
    """SAE-like X (log-normal codes, ~10 % active) and ΔX at ``density`` of its cells."""
    rng = np.random.default_rng(seed)
    X = rng.lognormal(size=(n, k)) * (rng.random((n, k)) < 0.1)
    y = X @ rng.normal(size=k) + rng.normal(size=n)
    dX = rng.normal(size=(p, n, k)) * (rng.random((p, n, k)) < density) * 0.05
    dy = rng.normal(size=(p, n)) * 0.01
    return X, y, dX, dy


def forms(dX: np.ndarray) -> dict:
    k = dX.shape[2]
    return {"dense": dX, "csr": sp.csr_matrix(dX.reshape(-1, k)), "list": [sp.csr_matrix(d) for d in dX]}


def design(X, y, scale, lam):
    Z = X / scale
    zm, ym = Z.mean(axis=0), y.mean()
    Zc, yc = Z - zm, y - ym
    return Zc, yc, Zc.T @ Zc + lam * np.eye(X.shape[1])


def numpy_refits(X, y, dX, dy, scale, lam, method):
    """The literal definition, pair by pair (refits for exact, the formula for first order)."""

    def ridge(Xa, ya):
        Zc, yc, A = design(Xa, ya, scale, lam)
        return np.linalg.solve(A, Zc.T @ yc)

    b = ridge(X, y)
    Zc, yc, A = design(X, y, scale, lam)
    r = yc - Zc @ b
    out = np.empty((dX.shape[0], X.shape[1]))
    for i in range(dX.shape[0]):
        if method == "exact":
            out[i] = ridge(X + dX[i], y + dy[i]) - b
        else:
            dZ = dX[i] / scale
            dZc, dyc = dZ - dZ.mean(axis=0), dy[i] - dy[i].mean()
            out[i] = np.linalg.solve(A, dZc.T @ r - Zc.T @ (dZc @ b) + Zc.T @ dyc)
    return out


def numpy_solve(X, y, dX, dy, scale, lam, method):
    """The perturbed normal equations per pair, sharing what does not change (one factor)."""
    Zc, yc, A = design(X, y, scale, lam)
    cho = sla.cho_factor(A)
    b = sla.cho_solve(cho, Zc.T @ yc)
    r = yc - Zc @ b
    out = np.empty((dX.shape[0], X.shape[1]))
    for i in range(dX.shape[0]):
        dZ = dX[i] / scale
        dZc, dyc = dZ - dZ.mean(axis=0), dy[i] - dy[i].mean()
        if method == "exact":
            dG = Zc.T @ dZc
            dG = dG + dG.T + dZc.T @ dZc
            rhs = (Zc + dZc).T @ (yc + dyc) - (A + dG - lam * np.eye(len(b))) @ b - lam * b
            out[i] = np.linalg.solve(A + dG, rhs)
        else:
            out[i] = sla.cho_solve(cho, dZc.T @ r - Zc.T @ (dZc @ b) + Zc.T @ dyc)
    return out


def reference(pt, pol, X, y, dX, dy, method):
    """The package's float64 numpy transcription on the same pairs (``backend="numpy"`` before
    0.3, ``_backend="numpy"`` since), as a (P, K) array of d_coef."""
    import inspect

    key = "_backend" if "_backend" in inspect.signature(pt.decompose).parameters else "backend"
    frame = pt.decompose(pol, X, y, dX, dy, method=method, **{key: "numpy"})
    return frame["d_coef"].to_numpy().reshape(dX.shape[0], -1)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def kernel_arg(pt, dX_form, n, k):
    """What the public call hands the core for this form (new builds: the form itself; builds
    before 0.3 always built one stacked CSR first)."""
    try:
        from policytrace.numeric._inputs import pairs_arg
    except ImportError:
        from policytrace.numeric._inputs import csr_tuple, stack_pairs

        return csr_tuple(stack_pairs(dX_form, n, k, validate=False)[0])
    return pairs_arg(dX_form, n, k)[0]


def measure(p: int, n: int, k: int, density: float, repeats: int, baseline_pairs: int, threads: int) -> dict:
    import policytrace as pt

    X, y, dX, dy = data(p, n, k, density)
    pol = pt.fit_policy(X, y, lam=5.0)
    res: dict = {"policytrace": pt.__version__, "shape": [p, n, k], "density": density, "threads": threads,
                 "repeats": repeats, "baseline_pairs": baseline_pairs, "cases": {}}
    fs = forms(dX)
    bp = min(baseline_pairs, p)
    for method in METHODS:
        att = pt.Attributor(pol, X, y, method=method, threads=threads)
        row: dict = {}
        ours = pt.decompose(pol, X, y, dX[:bp], dy[:bp], method=method)["d_coef"].to_numpy().reshape(bp, k)
        for name, loop in (("numpy_refits", numpy_refits), ("numpy_solve", numpy_solve), ("reference", None)):
            run = (lambda: reference(pt, pol, X, y, dX[:bp], dy[:bp], method)) if loop is None else (
                lambda: loop(X, y, dX[:bp], dy[:bp], pol.scale, pol.lam, method))
            row[name] = best_of(run, max(1, repeats // 3)) * p / bp
            theirs = run()
            row[f"{name}_max_rel_diff"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        for form in FORMS:
            arg = kernel_arg(pt, fs[form], n, k)
            kern = best_of(lambda: att._core.run(arg, dy, method, threads), repeats)
            whole = best_of(lambda: pt.decompose(pol, X, y, fs[form], dy, method=method, threads=threads), repeats)
            row[form] = {"whole": whole, "kernel": kern, "overhead": whole / kern,
                         "speedup_refits": row["numpy_refits"] / whole, "speedup_solve": row["numpy_solve"] / whole,
                         "speedup_reference": row["reference"] / whole}
        res["cases"][method] = row
    return res


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "avx512": " avx512f" in flags, "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def table(runs: dict[str, dict]) -> str:
    lines = ["| build | method | ΔX form | whole call (ms) | kernel (ms) | whole / kernel | × reference | × numpy refits "
             "| × numpy solve |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        for method in METHODS:
            c = r["cases"][method]
            for form in FORMS:
                f = c[form]
                lines.append(f"| {label} | `{method}` | {form} | {1e3 * f['whole']:.1f} | {1e3 * f['kernel']:.1f} | "
                             f"{f['overhead']:.2f} | {f['speedup_reference']:.1f}× | {f['speedup_refits']:.1f}× | "
                             f"{f['speedup_solve']:.1f}× |")
    return "\n".join(lines)


def guard(r: dict) -> list[str]:
    bad = []
    for method in METHODS:
        for form in FORMS:
            f = r["cases"][method][form]
            if f["overhead"] > GUARD_OVERHEAD:
                bad.append(f"{method}/{form}: whole call {f['overhead']:.1f}x the kernel (floor {GUARD_OVERHEAD}x)")
            if f["speedup_reference"] < GUARD_SPEEDUP:
                bad.append(f"{method}/{form}: {f['speedup_reference']:.1f}x the reference loop (floor {GUARD_SPEEDUP}x)")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline-pairs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guard", action="store_true", help="exit 1 when a ratio falls below its floor")
    ap.add_argument("--compare-with", type=Path, help="an older build's site folder, measured in a subprocess")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = (args.pairs, args.probes, args.features, args.density, args.repeats, args.baseline_pairs, args.threads)
    if args.json_only:
        print(json.dumps(measure(*shape)))
        return 0
    runs = {}
    if args.compare_with:
        env = os.environ | {"PYTHONPATH": str(args.compare_with)}
        cmd = [sys.executable, __file__, "--json-only"] + [a for a in (argv or sys.argv[1:]) if not a.startswith("--compare")
                                                           and a != str(args.compare_with)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd="/")
        old = json.loads(out.stdout.strip().splitlines()[-1])
        runs[f"before ({old['policytrace']})"] = old
    new = measure(*shape)
    runs[f"after ({new['policytrace']})"] = new
    doc = {"benchmark": "whole call", "machine": machine(), "runs": runs}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    print(f"{doc['machine']['cpu']}, {args.threads} threads, ΔX {list(shape[:3])} at {args.density:.0%} density")
    print(table(runs))
    if args.guard:
        bad = guard(new)
        for b in bad:
            print(f"GUARD: {b}", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
