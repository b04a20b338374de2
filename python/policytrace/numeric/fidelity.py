"""How well the symbolic policy predicts the behaviour on held-out probes (docs/design.md,
"Evaluation")."""

from __future__ import annotations

import numpy as np

from .metrics import auc
from .policy import fit_policy


def policy_fidelity(X: np.ndarray, y: np.ndarray, flag: np.ndarray | None, categories: np.ndarray,
                    lam: float, intercept: bool, standardize: bool, folds: int = 5, seed: int = 0,
                    flag_name: str = "flag") -> dict:
    """k-fold held-out fidelity with the policy's λ and settings refit on each training split.

    * ``r2_heldout``: R² of held-out predictions (the mean baseline, predicting the training
      mean, scores ≤ 0 by construction), overall and per probe category.
    * ``accuracy_heldout_high_y``: does the held-out prediction tell probes with a high score
      (above the training folds' median y) from the rest, against always answering the training
      folds' majority class (``accuracy_majority_high_y``); ``auc_heldout_high_y`` likewise.
    * with the behaviour's boolean flag (``flag``, named ``flag_name``): held-out AUC of the predicted score
      for the flagged side against the other (``auc_heldout_<flag_name>``), and the accuracy of
      a threshold classifier (threshold fit on each training split) against the majority-class
      baseline.
    """
    n = len(y)
    folds = max(2, min(folds, n))
    perm = np.random.default_rng(seed).permutation(n)
    pred, mean_base, high = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
    correct_flag, correct_high, majority_high = (np.zeros(n, dtype=bool) for _ in range(3))
    for f in range(folds):
        test = perm[f::folds]
        train = np.setdiff1d(perm, test)
        pol = fit_policy(X[train], y[train], lam=lam, intercept=intercept, standardize=standardize)
        pred[test] = pol.predict(X[test])
        mean_base[test] = y[train].mean()
        # The behaviour itself, split at the training folds' median score.
        cut = np.median(y[train])
        high[test] = y[test] > cut
        correct_high[test] = (pred[test] > cut) == high[test]
        majority_high[test] = high[test] == ((y[train] > cut).mean() > 0.5)
        if flag is not None:
            correct_flag[test] = (pred[test] >= _best_cut(pol.predict(X[train]), flag[train])) == flag[test]
    out = _r2(y, pred, mean_base, categories) | {
        "accuracy_heldout_high_y": float(correct_high.mean()),
        "accuracy_majority_high_y": float(majority_high.mean()),
        "auc_heldout_high_y": auc(pred, high),
    }
    out["folds"] = folds
    if flag is not None:
        out[f"auc_heldout_{flag_name}"] = auc(pred, flag)
        out[f"auc_measured_y_{flag_name}"] = auc(y, flag)
        out["accuracy_heldout"] = float(correct_flag.mean())
        out["accuracy_majority_baseline"] = float(max(flag.mean(), 1 - flag.mean()))
    return out


def _best_cut(ptrain: np.ndarray, label: np.ndarray) -> float:
    """The threshold on training predictions that classifies ``label`` best."""
    cands = np.unique(ptrain)
    accs = [((ptrain >= t) == label).mean() for t in cands]
    return float(cands[int(np.argmax(accs))])


def _r2(y: np.ndarray, pred: np.ndarray, mean_base: np.ndarray, categories: np.ndarray) -> dict:
    sst = ((y - y.mean()) ** 2).sum()
    by_cat = {}
    for c in sorted(set(categories.tolist())):
        m = categories == c
        ss = ((y[m] - y[m].mean()) ** 2).sum()
        # None, not NaN, where a category's score does not vary (no R² to report).
        by_cat[c] = float(1 - ((y[m] - pred[m]) ** 2).sum() / ss) if ss > 0 else None
    return {"r2_heldout": float(1 - ((y - pred) ** 2).sum() / sst),
            "r2_mean_baseline": float(1 - ((y - mean_base) ** 2).sum() / sst),
            "r2_by_category": by_cat}
