"""The abnormality decision threshold picked on held-out (valid) probabilities: used by training's
validation and by evaluate when it re-chooses the threshold on valid."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np


def _roc_curve(y: np.ndarray, p: np.ndarray):
    from sklearn.metrics import roc_curve

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return roc_curve(y, p, drop_intermediate=False)


def choose_threshold(y_true: Any, prob: Any, method: str = "youden", target: float = 0.9
                     ) -> float:
    """Pick an abnormality decision threshold (decision rule: abnormal if ``prob >= t``).

    * ``"youden"``: the ROC operating point maximising Youden's J = sensitivity +
      specificity - 1; among equal J the highest threshold wins.
    * ``"sensitivity"``: the highest threshold whose sensitivity is at least ``target``.

    The returned value is one of the observed probabilities, so applying ``prob >= t``
    reproduces exactly the chosen ROC point. If only one class is present the ROC is
    undefined: a warning is issued and 0.5 returned (so training can still finish).
    """
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    if method not in ("youden", "sensitivity"):
        raise ValueError(f"unknown threshold method {method!r} (use 'youden' or 'sensitivity')")
    if method == "sensitivity" and not 0.0 < target <= 1.0:
        raise ValueError("target sensitivity must be in (0, 1]")
    if len(y) == 0 or len(np.unique(y)) < 2:
        warnings.warn("choose_threshold needs both classes; falling back to 0.5", UserWarning,
                      stacklevel=2)
        return 0.5
    fpr, tpr, thr = _roc_curve(y, p)
    # The first ROC point is the (inf, nothing predicted positive) sentinel: skip it.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if method == "youden":
        j = tpr - fpr
        # Thresholds decrease along the ROC, so the first maximiser is the highest; the
        # tolerance makes equal J values computed with different rounding count as ties.
        i = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    else:
        # tpr is non-decreasing as thresholds decrease; tpr reaches 1 at the last point.
        i = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    return float(thr[i])
