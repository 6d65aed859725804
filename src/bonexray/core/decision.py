"""The clinical reading of one probability: calibration, then three states.

Every front end (CLI, Python API, serve, PACS) reports ``finding`` from :func:`finding_state` and
nothing else decides it: ``"negative"`` below the suspicious operating point (chosen for high
sensitivity), ``"positive"`` at or above the definite one (chosen for high specificity),
``"suspicious"`` between them; ``None`` where the image is out of scope or the output is not finite.
A model card without stated operating points falls back to the threshold plus or minus the card's
borderline band, which is how the earlier "borderline" band is defined in these terms.

The fitting rules live here too, so that one module says what the numbers in a card mean:
:func:`fit_temperature_and_bias` (sigmoid(logit / T + bias), the pair that minimises the log loss on
held-out labels; :func:`fit_temperature` the bias-free form) and :func:`choose_operating_points` (suspicious: the highest threshold whose
sensitivity on held-out images is at least ``sensitivity``; definite: the lowest threshold whose
specificity is at least ``specificity``; if the first lies above the second, both are the second).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Finding = Literal["negative", "suspicious", "positive"]
FINDINGS: tuple[Finding, ...] = ("negative", "suspicious", "positive")

#: Half-width of the band around the threshold when the card states neither operating points nor a
#: band (a stated default, not tuned on data).
DEFAULT_BAND = 0.1


@dataclass(frozen=True)
class OperatingPoints:
    """Two thresholds on the (calibrated) probability: ``suspicious <= definite``."""

    suspicious: float
    definite: float
    source: str

    def __post_init__(self) -> None:
        if not (0.0 <= self.suspicious <= self.definite <= 1.0):
            raise ValueError(f"operating points must satisfy 0 <= suspicious <= definite <= 1, "
                             f"got {self.suspicious} and {self.definite}")


def operating_points(card) -> OperatingPoints:
    """The card's two operating points, or threshold -/+ band where it states none."""
    stated = getattr(card, "operating_points", None)
    if stated:
        return OperatingPoints(float(stated["suspicious"]), float(stated["definite"]),
                               str(stated.get("source") or "stated in the model card"))
    threshold = float(getattr(card, "threshold", 0.5))
    band = getattr(card, "borderline_band", None)
    source = str(getattr(card, "borderline_source", None) or "stated in the model card")
    if band is None:
        band, source = DEFAULT_BAND, f"default band {DEFAULT_BAND} (not tuned on data)"
    band = float(band)
    return OperatingPoints(max(0.0, threshold - band), min(1.0, threshold + band),
                           f"threshold {threshold:g} -/+ band {band:g}: {source}")


def finding_state(prob: float | None, points: OperatingPoints) -> Finding | None:
    """The three-state finding of one probability; None for a missing or non-finite one."""
    if prob is None or not math.isfinite(prob):
        return None
    if prob >= points.definite:
        return "positive"
    if prob >= points.suspicious:
        return "suspicious"
    return "negative"


def worst_finding(findings) -> Finding | None:
    """A study's finding: the most severe of its images' (None if none was assessed)."""
    ranked = [FINDINGS.index(f) for f in findings if f is not None]
    return FINDINGS[max(ranked)] if ranked else None


def calibrated(prob: float, card) -> float:
    """The card's calibration applied to one raw probability: sigmoid(logit / temperature + bias)
    (``bias`` 0 when the card states none: plain temperature scaling); unchanged where the card has no
    calibration."""
    cal = getattr(card, "calibration", None)
    if not cal or not math.isfinite(prob):
        return prob
    temperature, bias = float(cal["temperature"]), float(cal.get("bias", 0.0))
    p = min(max(prob, 1e-12), 1 - 1e-12)
    z = math.log(p / (1 - p)) / temperature + bias
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def logit(prob):
    """log(p / (1 - p)), with p clipped to [1e-12, 1 - 1e-12]; elementwise on numpy arrays."""
    import numpy as np

    p = np.clip(np.asarray(prob, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def temperature_scaled(prob, temperature: float, bias: float = 0.0):
    """sigmoid(logit(prob) / temperature + bias), elementwise (what :func:`calibrated` does to one value)."""
    import numpy as np

    return 1.0 / (1.0 + np.exp(-(logit(prob) / float(temperature) + float(bias))))


def fit_temperature_and_bias(prob, labels, iterations: int = 100) -> tuple[float, float]:
    """(temperature, bias) minimising the mean log loss of sigmoid(logit / T + bias) on 0/1 labels
    (Platt scaling of the logit; Newton's method, a tiny ridge keeps it finite on separable data)."""
    import numpy as np

    z = logit(prob)
    y = np.asarray(labels, np.float64)
    if len(z) < 2 or len(z) != len(y) or len(np.unique(y)) < 2:
        raise ValueError("fitting a calibration needs abnormal and normal labelled images")
    x = np.stack([z, np.ones_like(z)], 1)

    def loss(w):
        s = x @ w
        return float(np.mean(np.logaddexp(0.0, s) - y * s) + 0.5e-6 * w @ w)

    w = np.array([1.0, 0.0])
    for _ in range(iterations):
        q = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))  # sigmoid without overflow
        grad = x.T @ (q - y) / len(y) + 1e-6 * w
        hess = (x * (q * (1 - q))[:, None]).T @ x / len(y) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        f0, t = loss(w), 1.0
        while loss(w - t * step) > f0 and t > 1e-8:  # damped Newton: never increase the loss
            t *= 0.5
        w = w - t * step
        if np.abs(t * step).max() < 1e-10:
            break
    if not w[0] > 0:
        raise ValueError("the fitted calibration reverses the model's order (slope <= 0): not used")
    return float(1.0 / w[0]), float(w[1])


def fit_temperature(prob, labels, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature that minimises the mean log loss of :func:`temperature_scaled` on 0/1 ``labels``
    (golden-section search over log T within ``bounds``; the loss is unimodal in 1/T)."""
    import numpy as np

    z = logit(prob)
    y = np.asarray(labels, np.float64)
    if len(z) == 0 or len(z) != len(y):
        raise ValueError("fit_temperature needs as many labels as probabilities, at least one")

    def loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))  # -log-likelihood of sigmoid(s)

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


def choose_operating_points(prob: Sequence[float], labels: Sequence[int], sensitivity: float = 0.95,
                            specificity: float = 0.95, source: str = "held-out images") -> OperatingPoints:
    """The two operating points by the module's rule, on (calibrated) held-out probabilities."""
    import numpy as np

    p = np.asarray(prob, np.float64)
    y = np.asarray(labels, np.int64)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    if not len(pos) or not len(neg):
        raise ValueError("choosing operating points needs abnormal and normal held-out images")
    # Sensitivity at threshold t is the share of positives with p >= t: the k-th smallest positive
    # keeps len - k of them; the highest t keeping ceil(sensitivity * n) is that order statistic.
    keep = int(math.ceil(sensitivity * len(pos) - 1e-9))
    suspicious = float(pos[len(pos) - keep]) if keep > 0 else 1.0
    # Specificity at t is the share of negatives with p < t: the smallest t above ceil(spec * n) of them.
    below = int(math.ceil(specificity * len(neg) - 1e-9))
    definite = float(np.nextafter(neg[below - 1], np.inf)) if below > 0 else 0.0
    definite = min(definite, 1.0)
    suspicious = min(suspicious, definite)
    return OperatingPoints(suspicious, definite,
                           f"{source}: suspicious = highest threshold with sensitivity >= {sensitivity:g} "
                           f"({len(pos)} abnormal), definite = lowest threshold with specificity >= {specificity:g} "
                           f"({len(neg)} normal)")


def decision_lines(info) -> list[str]:
    """What ``bonexray models`` prints about a card's (dict's) findings: operating points, calibration."""
    pts, cal = info.get("operating_points"), info.get("calibration")
    lines = []
    if pts:
        lines.append(f"finding: negative below {pts['suspicious']:.3f}, suspicious (high-sensitivity point) from "
                     f"{pts['suspicious']:.3f}, positive (high-specificity point) from {pts['definite']:.3f} "
                     "on the calibrated probability")
        lines.append(f"  operating points: {pts.get('source', '')}")
    else:
        lines.append("finding: no stated operating points (threshold -/+ the borderline band)")
    if cal:
        lines.append(f"calibration: {cal.get('method', 'temperature')} T {float(cal['temperature']):.3g}"
                     + (f", bias {float(cal['bias']):.3g}" if "bias" in cal else "") + f"; {cal.get('fitted_on', '')}")
    else:
        lines.append("calibration: none (probabilities as the network gives them)")
    tta = info.get("tta") or "none"
    lines.append(f"test-time augmentation: {tta}" + {"none": "", "flip": " (the image and its mirror averaged)",
                                                        "d4": " (8 quarter turns and mirrors averaged)"}.get(tta, ""))
    return lines
