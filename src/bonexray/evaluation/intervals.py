"""Small numeric helpers shared by the metric modules: JSON-safe floats and percentile bootstrap intervals.

Kept free of scikit-learn and torch so that importing a metric module stays cheap.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["finite_or_none", "percentile_ci"]


def finite_or_none(x: Any) -> float | None:
    """Python float, or None for NaN/inf/None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def percentile_ci(values: np.ndarray) -> list[float] | None:
    """95% percentile interval of the finite values (a resample where a value is undefined is skipped)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]
