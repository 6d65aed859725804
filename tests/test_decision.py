from types import SimpleNamespace

import math
import pytest

from bonexray.core.decision import (OperatingPoints, calibrated, finding_state, operating_points,
                                    worst_finding)


def test_three_states_at_the_two_operating_points():
    pts = OperatingPoints(0.2, 0.7, "test")
    assert finding_state(0.19, pts) == "negative"
    assert finding_state(0.2, pts) == "suspicious"
    assert finding_state(0.69, pts) == "suspicious"
    assert finding_state(0.7, pts) == "positive"
    assert finding_state(float("nan"), pts) is None
    assert finding_state(None, pts) is None


def test_card_without_points_falls_back_to_threshold_and_band():
    pts = operating_points(SimpleNamespace(threshold=0.5, borderline_band=0.1, borderline_source="valid"))
    assert (pts.suspicious, pts.definite) == pytest.approx((0.4, 0.6))
    pts = operating_points(SimpleNamespace(threshold=0.05))
    assert pts.suspicious == 0.0 and "default" in pts.source
    stated = operating_points(SimpleNamespace(threshold=0.5, operating_points={"suspicious": 0.3, "definite": 0.8}))
    assert (stated.suspicious, stated.definite) == (0.3, 0.8)


def test_operating_points_must_be_ordered():
    with pytest.raises(ValueError, match="suspicious <= definite"):
        OperatingPoints(0.8, 0.3, "bad")


def test_worst_finding_of_a_study():
    assert worst_finding(["negative", None, "suspicious"]) == "suspicious"
    assert worst_finding(["negative", "positive"]) == "positive"
    assert worst_finding([None, None]) is None


def test_temperature_scaling_keeps_the_order_and_moves_towards_half():
    card = SimpleNamespace(calibration={"temperature": 2.0})
    assert calibrated(0.5, card) == pytest.approx(0.5)
    assert 0.5 < calibrated(0.9, card) < 0.9
    assert calibrated(0.9, SimpleNamespace()) == 0.9
    assert math.isnan(calibrated(float("nan"), card))


def test_model_card_refuses_bad_calibration_and_operating_points():
    from bonexray.errors import CheckpointError
    from bonexray.model.checkpoint import ModelCard

    base = dict(backbone="efficientnet_lite0", image_size=64, body_parts=["hand", "leg"])
    card = ModelCard(**base, calibration={"temperature": 1.5}, operating_points={"suspicious": 0.2, "definite": 0.7})
    assert operating_points(card).definite == 0.7 and calibrated(0.9, card) < 0.9
    with pytest.raises(CheckpointError, match="temperature"):
        ModelCard(**base, calibration={"temperature": 0})
    with pytest.raises(CheckpointError, match="operating_points"):
        ModelCard(**base, operating_points={"suspicious": 0.8, "definite": 0.2})


def test_fit_temperature_and_bias_recovers_a_known_miscalibration():
    import numpy as np

    from bonexray.core.decision import fit_temperature, fit_temperature_and_bias, temperature_scaled

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    y = rng.random(len(z)) < 1 / (1 + np.exp(-(z / 2.0 - 1.0)))  # the truth: T 2, bias -1
    raw = 1 / (1 + np.exp(-z))
    t, b = fit_temperature_and_bias(raw, y)
    assert t == pytest.approx(2.0, rel=0.08) and b == pytest.approx(-1.0, abs=0.08)
    card = SimpleNamespace(calibration={"temperature": t, "bias": b})
    assert calibrated(0.7, card) == pytest.approx(float(temperature_scaled(0.7, t, b)))
    y0 = rng.random(len(z)) < 1 / (1 + np.exp(-z / 3.0))
    assert fit_temperature(raw, y0) == pytest.approx(3.0, rel=0.08)
    with pytest.raises(ValueError):
        fit_temperature_and_bias(raw[:10], np.zeros(10))


def test_operating_points_meet_their_sensitivity_and_specificity_on_the_fitting_data():
    import numpy as np

    from bonexray.core.decision import choose_operating_points

    rng = np.random.default_rng(1)
    y = (rng.random(500) < 0.2).astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    pts = choose_operating_points(p, y, 0.95, 0.95)
    assert pts.suspicious <= pts.definite
    assert (p[y == 1] >= pts.suspicious).mean() >= 0.95
    assert (p[y == 0] < pts.definite).mean() >= 0.95
    # the highest / lowest such thresholds: one step further breaks the target
    above = np.sort(p[y == 1])[np.searchsorted(np.sort(p[y == 1]), pts.suspicious, side="right")]
    assert (p[y == 1] >= above).mean() < 0.95
    assert (p[y == 0] < np.sort(p[y == 0])[(p[y == 0] < pts.definite).sum() - 1]).mean() < 0.95
    assert "sensitivity >= 0.95" in pts.source


def test_model_card_refuses_a_non_finite_calibration_bias():
    from bonexray.errors import CheckpointError
    from bonexray.model.checkpoint import ModelCard

    base = dict(backbone="efficientnet_lite0", image_size=64, body_parts=["hand", "leg"])
    assert ModelCard(**base, calibration={"temperature": 0.5, "bias": -1.0}).calibration["bias"] == -1.0
    with pytest.raises(CheckpointError, match="bias"):
        ModelCard(**base, calibration={"temperature": 0.5, "bias": float("nan")})
