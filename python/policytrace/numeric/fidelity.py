"""How well the symbolic policy predicts the behaviour on held-out probes (docs/design.md,
"Evaluation")."""

from __future__ import annotations

import numpy as np

from .metrics import auc
from .policy import fit_policy


def policy_fidelity(X: np.ndarray, y: np.ndarray, flag: np.ndarray | None, categories: np.ndarray,
                    lam: float, intercept: bool, standardize: bool, folds: int = 5, seed: int = 0,
                    flag_name: str = "harmful") -> dict:
    """k-fold held-out fidelity with the policy's λ and settings refit on each training split.

    * ``r2_heldout``: R² of held-out predictions (the mean baseline, predicting the training
      mean, scores ≤ 0 by construction), overall and per probe category.
    * with the behaviour's boolean flag (refusal: harmful): held-out AUC of the predicted score
      for the flagged side against the other (``auc_heldout_<flag_name>``), and the accuracy of
      a threshold classifier (threshold fit on each training split) against the majority-class
      baseline.
    """
    n = len(y)
    folds = max(2, min(folds, n))
    perm = np.random.default_rng(seed).permutation(n)
    pred = np.zeros(n)
    mean_base = np.zeros(n)
    correct = np.zeros(n, dtype=bool)
    for f in range(folds):
        test = perm[f::folds]
        train = np.setdiff1d(perm, test)
        pol = fit_policy(X[train], y[train], lam=lam, intercept=intercept, standardize=standardize)
        pred[test] = pol.predict(X[test])
        mean_base[test] = y[train].mean()
        if flag is not None:
            ptrain = pol.predict(X[train])
            cands = np.unique(ptrain)
            accs = [((ptrain >= t) == flag[train]).mean() for t in cands]
            t = cands[int(np.argmax(accs))]
            correct[test] = (pred[test] >= t) == flag[test]
    sst = ((y - y.mean()) ** 2).sum()
    out: dict = {
        "folds": folds,
        "r2_heldout": float(1 - ((y - pred) ** 2).sum() / sst),
        "r2_mean_baseline": float(1 - ((y - mean_base) ** 2).sum() / sst),
        "r2_by_category": {},
    }
    for c in sorted(set(categories.tolist())):
        m = categories == c
        ss = ((y[m] - y[m].mean()) ** 2).sum()
        out["r2_by_category"][c] = float(1 - ((y[m] - pred[m]) ** 2).sum() / ss) if ss > 0 else float("nan")
    if flag is not None:
        out[f"auc_heldout_{flag_name}"] = auc(pred, flag)
        out[f"auc_measured_y_{flag_name}"] = auc(y, flag)
        out["accuracy_heldout"] = float(correct.mean())
        out["accuracy_majority_baseline"] = float(max(flag.mean(), 1 - flag.mean()))
    return out
