"""policytrace quickstart: select features, fit the symbolic policy, decompose pairs.

Runs on synthetic SAE-like data (no model needed). With a real model the probe pass and the
per-pair update engine produce X, y, dX and dy; the numeric steps below are the same.
"""

import numpy as np
import scipy.sparse as sp

import policytrace as pt

rng = np.random.default_rng(0)
n_probes, n_latents, n_pairs = 400, 2048, 50

# Probe activations: sparse, non-negative SAE codes (n_probes x n_latents), a harmful flag,
# a category per probe and a behaviour score (e.g. log P(refusal)).
X_all = sp.random(n_probes, n_latents, density=0.02, random_state=1, format="csr")
harmful = rng.random(n_probes) < 0.5
# Plant a few latents that fire more on harmful (7, 19, 33) or harmless (100, 150) probes.
planted = np.zeros((n_probes, n_latents))
for latent, side, strength in [(7, True, 0.9), (19, True, 0.5), (33, True, 0.3),
                               (100, False, 0.6), (150, False, 0.4)]:
    rows = harmful == side
    planted[rows, latent] = strength * rng.exponential(1.0, size=rows.sum())
X_all = sp.csr_matrix(X_all + sp.csr_matrix(planted))
category = np.where(harmful, "harmful", "harmless")
dense = X_all.toarray()
y = 2.0 * dense[:, 7] + 1.0 * dense[:, 19] - 1.5 * dense[:, 100] + 0.1 * rng.normal(size=n_probes)

# 1. Feature selection: the paper's rule, |mean(harmful) - mean(harmless)| > 0.1 ...
selection = pt.select_features(X_all, y, groups=harmful, method="mean_diff", threshold=0.1)
# ... or the top-K by |corr(x, y)|: pt.select_features(X_all, y, method="corr", k=64)
X, feature_ids = pt.selected_columns(X_all, selection)
print(f"selected {len(feature_ids)} features:", feature_ids[:10])

# 2. The symbolic policy: ridge with intercept and standardized features, lambda by GCV.
policy = pt.fit_policy(X, y, lam="gcv", feature_ids=feature_ids)
print(policy.to_frame().sort("rank").head(5))

# 3. Per-pair changes (from the update engine in real use): dX as sparse as X, dy per probe.
dX = [sp.csr_matrix(X * rng.normal(scale=0.05, size=X.shape)) for _ in range(n_pairs)]
dy = rng.normal(scale=0.05, size=(n_pairs, n_probes))
pair_category = rng.choice(["harmful", "harmless"], size=n_pairs)

# 4. Decompose every pair's policy shift into the dX and dy pathways (exact refits).
frame = pt.decompose(policy, X, y, dX, dy, method="exact")
print(frame.head())

# 5. Streaming, with pair summaries and interference flags.
feature_stats, _ = pt.feature_stats(X, y, groups=category, feature_ids=feature_ids)
att = pt.Attributor(policy, X, y, method="first_order", feature_groups=feature_stats,
                    probe_groups=category)
for start in range(0, n_pairs, 20):
    stop = min(start + 20, n_pairs)
    att.add(dX[start:stop], dy[start:stop], pair_groups=pair_category[start:stop])
print(att.pairs().sort("score", descending=True).head())
print(att.interference_summary().head())
policy.save("quickstart_policy.json")
print("saved quickstart_policy.json")
