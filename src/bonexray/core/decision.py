"""The clinical reading of one probability: calibration, then three states.

Every front end (CLI, Python API, serve, PACS) reports ``finding`` from :func:`finding_state` and
nothing else decides it: ``"negative"`` below the suspicious operating point (chosen for high
sensitivity), ``"positive"`` at or above the definite one (chosen for high specificity),
``"suspicious"`` between them; ``None`` where the image is out of scope or the output is not finite.
A model card without stated operating points falls back to the threshold plus or minus the card's
borderline band, which is how the earlier "borderline" band is defined in these terms.
"""
from __future__ import annotations

import math
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
    """The card's calibration applied to one raw probability (temperature scaling on the logit);
    the probability unchanged where the card states none."""
    cal = getattr(card, "calibration", None)
    if not cal or not math.isfinite(prob):
        return prob
    temperature = float(cal["temperature"])
    p = min(max(prob, 1e-12), 1 - 1e-12)
    logit = math.log(p / (1 - p))
    return 1.0 / (1.0 + math.exp(-logit / temperature))
