"""ECE (evaluation/calibration.py) against torchmetrics, its bootstrap CI, before/after the card's calibration."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bonexray.evaluation.calibration import calibration_report, ece, ece_ci


def test_ece_matches_torchmetrics():
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    rng = np.random.default_rng(0)
    p = rng.random(3000)
    y = (rng.random(3000) < p ** 1.5).astype(int)
    ref = float(binary_calibration_error(torch.tensor(p, dtype=torch.float32), torch.tensor(y), n_bins=10, norm="l1"))
    assert ece(y, p) == pytest.approx(ref, abs=1e-4)


def test_ece_ci_brackets_the_estimate_and_report_has_before_and_after():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-(z / 2 - 1)))).astype(int)
    raw = 1 / (1 + np.exp(-z))
    lo, hi = ece_ci(y, raw, groups=np.arange(2000) // 4, n_bootstrap=200)
    assert lo <= ece(y, raw) <= hi
    card = SimpleNamespace(calibration={"temperature": 2.0, "bias": -1.0})
    rep = calibration_report(y, raw, card, n_bootstrap=100)
    assert rep["after"]["ece"] < rep["before"]["ece"] / 2 and rep["ece"] == rep["after"]["ece"]
    assert rep["before"]["ece_ci95"] is not None
    plain = calibration_report(y, raw, SimpleNamespace(), n_bootstrap=0)
    assert plain["after"] is None and plain["ece"] == plain["before"]["ece"] and plain["ece_ci95"] is None


def test_outlier_photos_are_the_same_every_time():
    """The scope head's outliers are reproducible: scikit-image's one random sample (binary_blobs) is seeded."""
    pytest.importorskip("skimage")
    from bonexray.inference.outliers import photos

    first, second = photos(("binary_blobs", "camera"), per_photo=2), photos(("binary_blobs", "camera"), per_photo=2)
    assert len(first) == 4 and first == second
