"""What bonexray says about one image and one study: the only place a verdict is decided.

:class:`ImageFinding` and :class:`StudyFinding` are the records of every front end: the JSON lines
and CSV rows of ``bonexray predict`` (:meth:`ImageFinding.record`), the Python API's result, the
schema of ``serve``'s ``/api/predict`` and the input of the PACS results (SR, secondary capture).
:func:`read_image` and :func:`aggregate` build them from model outputs under a :class:`ReadingPolicy`
(the model card's threshold, band, operating points and box thresholds), so the front ends agree by
construction:

* a non-finite output gives no finding at all (:func:`finite_rows`; the caller names the file with
  :func:`nonfinite_reason`): a NaN compares False with the threshold and would read "normal";
* an out-of-scope image keeps its probabilities (for research) but gets ``abnormal``, ``finding``,
  ``body_part``, ``confidence`` and ``boxes`` null;
* ``prob_abnormal`` is the calibrated probability when the card states a calibration
  (:func:`bonexray.core.decision.calibrated`); ``abnormal`` is the raw probability at or above the
  card's threshold (the threshold was chosen on raw probabilities; temperature scaling keeps the
  order, so only the printed number moves); ``finding`` comes from the calibrated probability and
  the card's operating points (:func:`bonexray.core.decision.finding_state`);
* boxes are reported in the original image's pixels with a ``level``: ``"definite"`` at or above the
  card's box threshold, ``"suspicious"`` between ``suspicious_threshold`` and it; lower ones are not
  reported.

File names that are not valid UTF-8 (``os.fsdecode`` turns their bytes into lone surrogates) are
written with each such byte as the four characters ``\\xNN`` (:func:`printable_path`), so no record
holds raw bytes (CSV) or lone surrogates (JSON).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .decision import Finding, OperatingPoints, calibrated, finding_state, operating_points, worst_finding

BoxLevel = Literal["definite", "suspicious"]
Confidence = Literal["clear", "borderline"]
NO_IMAGE_IN_SCOPE = "no image of the study is in scope"


def _r(x: float) -> float:
    return round(float(x), 6)


def printable_path(path: str | os.PathLike | None) -> str | None:
    """A file name as records carry it: undecodable bytes (surrogate escapes) become ``\\xNN``, other lone
    surrogates ``\\uNNNN``; every valid name is unchanged."""
    if path is None:
        return None
    text = os.fsdecode(path) if not isinstance(path, str) else path
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return text
    out = []
    for c in text:
        code = ord(c)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)


def finite_rows(probs: np.ndarray, part_probs: np.ndarray) -> np.ndarray:
    """Boolean mask of the images whose outputs are all finite numbers (the one NaN policy)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    parts = np.asarray(part_probs, dtype=np.float64).reshape(len(probs), -1)
    return np.isfinite(probs) & np.isfinite(parts).all(axis=1)


def nonfinite_reason(model_path: object) -> str:
    """What every front end says about an image with a non-finite model output."""
    return f"the model's output is not a finite number (NaN/inf); no verdict given (is {model_path} damaged?)"


def confidence(prob: float, threshold: float, band: float) -> Confidence:
    """``"borderline"`` when the probability lies within ``band`` of the threshold, else ``"clear"``."""
    return "borderline" if abs(prob - threshold) < band else "clear"


class _Record(BaseModel):
    """Dict-style reading (``rec["abnormal"]``, ``rec.get("boxes")``) of the JSON record, for callers that
    handle records as mappings."""

    model_config = ConfigDict(extra="allow")

    def __getitem__(self, key: str) -> Any:
        return self.record()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.record().get(key, default)

    def record(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


class Box(_Record):
    """A fracture box in the original image's pixels."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    level: BoxLevel = Field(description="definite: score at or above the card's box threshold; suspicious: between "
                                        "its suspicious_threshold and it")

    def record(self) -> dict[str, Any]:
        return self.model_dump()


class ImageFinding(_Record):
    """What the model says about one image (one JSON line of ``bonexray predict``)."""

    type: Literal["image"] = "image"
    path: str | None = Field(None, description="the file (uploads: its name); null for an array or PIL image")
    prob_abnormal: float = Field(description="calibrated when the model card states a calibration; kept for "
                                             "research also when the image is out of scope")
    abnormal: bool | None = Field(description="raw probability >= the card's threshold; null when out of scope")
    finding: Finding | None = Field(description="negative / suspicious / positive at the card's operating points; "
                                                "null when out of scope")
    body_part: str | None = Field(description="null when out of scope")
    confidence: Confidence | None = Field(description="borderline: |p - threshold| < the card's band; null when out "
                                                      "of scope")
    in_scope: bool | None = Field(description="false: the model cannot judge this image (see scope_reason); null: "
                                               "not checked")
    scope_reason: str | None = Field(None, description="why the image is out of scope")
    body_part_probs: dict[str, float] = Field(default_factory=dict, exclude=True,
                                              description="per body part (the record has prob_<part>)")
    truncated: bool = Field(False, description="the file ended early; what was there was decoded")
    boxes: list[Box] | None = Field(None, description="fracture boxes in the original image's pixels, best first; "
                                                      "null for a model without a box head or out of scope")
    study: str | None = Field(None, description="the study the image was grouped into")
    cam: str | None = Field(None, description="the heatmap picture written for it (predict --cam)")
    study_uid: str | None = Field(None, exclude=True, description="DICOM StudyInstanceUID, when the file states one")
    prob_raw: float | None = Field(None, exclude=True, description="the probability before calibration")

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "type": "image", "path": self.path, "prob_abnormal": _r(self.prob_abnormal), "abnormal": self.abnormal,
            "finding": self.finding, "body_part": self.body_part, "confidence": self.confidence,
            "in_scope": self.in_scope, "scope_reason": self.scope_reason,
        }
        rec.update({f"prob_{b}": _r(p) for b, p in self.body_part_probs.items()})
        rec["truncated"] = bool(self.truncated)
        rec["boxes"] = None if self.boxes is None else [b.record() for b in self.boxes]
        if self.study is not None:
            rec["study"] = self.study
        if self.cam is not None:
            rec["cam"] = self.cam
        return rec


class StudyFinding(_Record):
    """A study: its in-scope images' mean probability, majority body part and worst finding."""

    type: Literal["study"] = "study"
    study: str
    n_images: int
    n_out_of_scope: int = Field(description="images left out of the verdict: out of scope")
    n_assessed: int = Field(description="images with a finding (in scope or not checked)")
    n_positive: int
    n_suspicious: int
    n_negative: int
    prob_abnormal: float | None = Field(description="mean over the assessed images; null when none is")
    abnormal: bool | None
    finding: Finding | None = Field(description="the worst finding of its assessed images")
    body_part: str | None = Field(description="majority vote of the assessed images (ties: highest mean probability)")
    body_parts: list[str] = Field(description="the distinct predicted body parts of its assessed images")
    mixed_body_parts: bool = Field(description="its assessed images show more than one body part")
    confidence: Confidence | None
    in_scope: bool | None
    scope_reason: str | None = None
    body_part_probs: dict[str, float | None] = Field(default_factory=dict, exclude=True)

    def record(self) -> dict[str, Any]:
        rec = self.model_dump(exclude={"body_part_probs"})
        if rec["prob_abnormal"] is not None:
            rec["prob_abnormal"] = _r(rec["prob_abnormal"])
        rec.update({f"prob_{b}": None if p is None else _r(p) for b, p in self.body_part_probs.items()})
        return rec


@dataclass(frozen=True)
class ReadingPolicy:
    """How one model's outputs are read: everything :func:`read_image` and :func:`aggregate` need from the card."""

    body_parts: tuple[str, ...]
    threshold: float
    band: float
    points: OperatingPoints
    card: Any
    box_threshold: float | None = None
    box_suspicious: float | None = None

    @classmethod
    def from_card(cls, card, band: float) -> ReadingPolicy:
        boxes = getattr(card, "boxes", None) or None
        definite = float(boxes.get("threshold", 0.3)) if boxes else None
        suspicious = boxes.get("suspicious_threshold") if boxes else None
        suspicious = definite if suspicious is None or definite is None else min(float(suspicious), definite)
        return cls(tuple(card.body_parts), float(card.threshold), float(band), operating_points(card), card,
                   definite, suspicious)

    def box_level(self, score: float) -> BoxLevel | None:
        if self.box_threshold is None or not math.isfinite(score):
            return None
        if score >= self.box_threshold:
            return "definite"
        return "suspicious" if score >= self.box_suspicious else None


def boxes_of(policy: ReadingPolicy, boxes_xyxys: np.ndarray | None) -> list[Box] | None:
    """(n, 5) [x0, y0, x1, y1, score] in original pixels -> reported boxes (pixels to 0.1), order kept."""
    if boxes_xyxys is None:
        return None
    out = []
    for b in np.asarray(boxes_xyxys, dtype=np.float64).reshape(-1, 5):
        level = policy.box_level(float(b[4]))
        if level is not None:
            out.append(Box(x0=round(float(b[0]), 1), y0=round(float(b[1]), 1), x1=round(float(b[2]), 1),
                           y1=round(float(b[3]), 1), score=_r(b[4]), level=level))
    return out


def read_image(policy: ReadingPolicy, *, path: str | None, prob: float, part_probs: Sequence[float],
               truncated: bool = False, boxes: np.ndarray | None = None, scope_reason: str | None = None,
               scope_checked: bool = True, study: str | None = None, study_uid: str | None = None) -> ImageFinding:
    """One image's finding from its (finite) raw outputs; ``boxes``: (n, 5) in original pixels or None."""
    in_scope = None if not scope_checked else scope_reason is None
    verdict = in_scope is not False
    prob = float(prob)
    shown = float(calibrated(prob, policy.card))
    parts = np.asarray(part_probs, dtype=np.float64)
    return ImageFinding(
        path=printable_path(path), prob_abnormal=shown,
        abnormal=bool(prob >= policy.threshold) if verdict else None,
        finding=finding_state(shown, policy.points) if verdict else None,
        body_part=policy.body_parts[int(np.argmax(parts))] if verdict else None,
        confidence=confidence(prob, policy.threshold, policy.band) if verdict else None,
        in_scope=in_scope, scope_reason=scope_reason,
        body_part_probs={b: float(p) for b, p in zip(policy.body_parts, parts, strict=True)},
        truncated=bool(truncated), boxes=boxes_of(policy, boxes) if verdict else None,
        study=study, study_uid=study_uid, prob_raw=prob)


def _majority_part(policy: ReadingPolicy, members: Sequence[ImageFinding], mean_bp: np.ndarray) -> str:
    votes = Counter(policy.body_parts.index(m.body_part) for m in members if m.body_part is not None)
    if not votes:  # scope not checked: every member still has a body part
        votes = Counter(int(np.argmax([m.body_part_probs[b] for b in policy.body_parts])) for m in members)
    top = max(votes.values())
    return policy.body_parts[max((k for k, v in votes.items() if v == top), key=lambda k: mean_bp[k])]


def aggregate(policy: ReadingPolicy, study: str, images: Sequence[ImageFinding]) -> StudyFinding:
    """One study from its images' findings (in any order); the verdict uses the assessed images only."""
    members = [m for m in images if m.in_scope is not False]
    counts = Counter(m.finding for m in members)
    base = dict(study=study, n_images=len(images), n_out_of_scope=len(images) - len(members),
                n_assessed=len(members), n_positive=counts["positive"], n_suspicious=counts["suspicious"],
                n_negative=counts["negative"])
    if not members:
        return StudyFinding(**base, prob_abnormal=None, abnormal=None, finding=None, body_part=None, body_parts=[],
                            mixed_body_parts=False, confidence=None, in_scope=False, scope_reason=NO_IMAGE_IN_SCOPE,
                            body_part_probs={b: None for b in policy.body_parts})
    raw = [m.prob_abnormal if m.prob_raw is None else m.prob_raw for m in members]
    prob = float(np.mean(raw))
    mean_bp = np.mean([[m.body_part_probs[b] for b in policy.body_parts] for m in members], axis=0)
    parts = list(dict.fromkeys(m.body_part for m in members if m.body_part is not None))
    checked = all(m.in_scope is not None for m in images)
    return StudyFinding(**base, prob_abnormal=float(calibrated(prob, policy.card)),
                        abnormal=bool(prob >= policy.threshold),
                        finding=worst_finding(m.finding for m in members),
                        body_part=_majority_part(policy, members, mean_bp), body_parts=parts,
                        mixed_body_parts=len(parts) > 1, confidence=confidence(prob, policy.threshold, policy.band),
                        in_scope=True if checked else None,
                        body_part_probs={b: float(p) for b, p in zip(policy.body_parts, mean_bp, strict=True)})

