"""Per-image result records and MURA's study aggregation (a study's probability is the mean of its
in-scope images'), as plain dicts that every writer (JSON lines, CSV, the web API) serialises the same way.

Scope (inference/scope.py): every record has ``in_scope`` (true/false; null when the check was turned
off with ``--no-scope-check``) and ``scope_reason`` (null unless out of scope). An out-of-scope image
gets ``abnormal``, ``body_part``, ``confidence`` and ``boxes`` null: no verdict; its probabilities stay
in the record for research. ``confidence`` is ``"clear"`` or ``"borderline"`` (|p - threshold| < the
card's band). A study's verdict uses its in-scope images only (``n_out_of_scope`` says how many were left out).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def finite_rows(probs: np.ndarray, part_probs: np.ndarray) -> np.ndarray:
    """Boolean mask of the images whose outputs are all finite numbers.

    The one NaN policy of every front end (predict, the Python API, serve): a NaN probability compares
    False with the threshold and would read "normal", so an image outside this mask gets no verdict and
    the caller reports :func:`nonfinite_reason` for it instead.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    parts = np.asarray(part_probs, dtype=np.float64).reshape(len(probs), -1)
    return np.isfinite(probs) & np.isfinite(parts).all(axis=1)


def nonfinite_reason(model_path: object) -> str:
    """What every front end says about an image with a non-finite model output."""
    return f"the model's output is not a finite number (NaN/inf); no verdict given (is {model_path} damaged?)"


def _r(x: float) -> float:
    return round(float(x), 6)


@dataclass
class ImageResult:
    path: str
    prob_abnormal: float
    body_part_probs: np.ndarray
    truncated: bool
    study: str | None = None
    cam: str | None = None
    #: Fracture boxes in the original image's pixels, best first; None for a model without a box head.
    boxes: list[dict[str, float]] | None = None
    #: Why the model cannot judge this image (inference/scope.py SCOPE_REASONS); None: in scope.
    scope_reason: str | None = None
    #: False with --no-scope-check: in_scope is then null (not checked), never a claimed true.
    scope_checked: bool = True

    @property
    def in_scope(self) -> bool | None:
        return None if not self.scope_checked else self.scope_reason is None


def original_boxes(tile_boxes: np.ndarray, geometry) -> np.ndarray:
    """(n, 5) boxes in letterbox-tile pixels -> (n, 5) in the original image's pixels (``geometry``:
    data/preprocess.py Letterbox of that image); scores and order unchanged."""
    b = np.asarray(tile_boxes, dtype=np.float64).reshape(-1, 5)
    return np.concatenate([geometry.to_original(b[:, :4]), b[:, 4:5]], 1)


def box_records(boxes_xyxys: np.ndarray | None) -> list[dict[str, float]] | None:
    """(n, 5) [x0, y0, x1, y1, score] in original pixels -> the ``boxes`` field: a list of
    {x0, y0, x1, y1, score} (pixels rounded to 0.1, scores to 6 places), in the given (score) order."""
    if boxes_xyxys is None:
        return None
    return [{"x0": round(float(b[0]), 1), "y0": round(float(b[1]), 1), "x1": round(float(b[2]), 1),
             "y1": round(float(b[3]), 1), "score": _r(b[4])} for b in np.asarray(boxes_xyxys).reshape(-1, 5)]


def confidence(prob: float, threshold: float, band: float) -> str:
    """``"borderline"`` when the probability lies within ``band`` of the threshold, else ``"clear"``."""
    return "borderline" if abs(prob - threshold) < band else "clear"


def image_record(res: ImageResult, body_parts: Sequence[str], threshold: float,
                 band: float | None = None) -> dict[str, Any]:
    """``band``: the borderline half-width (inference/scope.py ``borderline_band``; None: its default)."""
    if band is None:
        from .scope import DEFAULT_BAND

        band = DEFAULT_BAND
    verdict = res.in_scope is not False
    rec: dict[str, Any] = {
        "type": "image",
        "path": res.path,
        "prob_abnormal": _r(res.prob_abnormal),
        "abnormal": bool(res.prob_abnormal >= threshold) if verdict else None,
        "body_part": body_parts[int(np.argmax(res.body_part_probs))] if verdict else None,
        "confidence": confidence(res.prob_abnormal, threshold, band) if verdict else None,
        "in_scope": res.in_scope,
        "scope_reason": res.scope_reason,
    }
    rec.update({f"prob_{b}": _r(p) for b, p in zip(body_parts, res.body_part_probs)})
    rec["truncated"] = bool(res.truncated)
    rec["boxes"] = res.boxes if verdict else None
    if res.study is not None:
        rec["study"] = res.study
    if res.cam is not None:
        rec["cam"] = res.cam
    return rec


def study_records(results: Iterable[ImageResult], body_parts: Sequence[str], threshold: float,
                  band: float | None = None) -> list[dict[str, Any]]:
    """One aggregate per study, in order of first appearance, over its in-scope images."""
    if band is None:
        from .scope import DEFAULT_BAND

        band = DEFAULT_BAND
    groups: dict[str, list[ImageResult]] = {}
    for r in results:
        if r.study is not None:
            groups.setdefault(r.study, []).append(r)
    out = []
    for study, everyone in groups.items():
        members = [m for m in everyone if m.in_scope is not False]
        n_out = len(everyone) - len(members)
        checked = all(m.scope_checked for m in everyone)
        if not members:
            out.append({"type": "study", "study": study, "n_images": len(everyone), "n_out_of_scope": n_out,
                        "prob_abnormal": None, "abnormal": None, "body_part": None, "confidence": None,
                        "in_scope": False, "scope_reason": "no image of the study is in scope",
                        **{f"prob_{b}": None for b in body_parts}})
            continue
        prob = float(np.mean([m.prob_abnormal for m in members]))
        mean_bp = np.mean(np.stack([m.body_part_probs for m in members]), axis=0)
        votes = Counter(int(np.argmax(m.body_part_probs)) for m in members)
        top = max(votes.values())
        tied = [k for k, v in votes.items() if v == top]
        winner = max(tied, key=lambda k: mean_bp[k])  # ties: highest mean probability
        rec: dict[str, Any] = {
            "type": "study",
            "study": study,
            "n_images": len(everyone),
            "n_out_of_scope": n_out,
            "prob_abnormal": _r(prob),
            "abnormal": bool(prob >= threshold),
            "body_part": body_parts[winner],
            "confidence": confidence(prob, threshold, band),
            "in_scope": True if checked else None,
            "scope_reason": None,
        }
        rec.update({f"prob_{b}": _r(p) for b, p in zip(body_parts, mean_bp)})
        out.append(rec)
    return out


def records_from_outputs(names: Sequence[str], probs, body_part_probs, truncated: Sequence[bool], study: str,
                         body_parts: Sequence[str], threshold: float,
                         boxes: Sequence[list[dict[str, float]] | None] | None = None,
                         scope_reasons: Sequence[str | None] | None = None, scope_checked: bool = True,
                         band: float | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(image records, study record) for images predicted together in memory as one study.

    The in-memory front ends (``serve``'s uploads, ``pacs`` studies) use this so their records are
    the ones ``predict --study`` writes for the same images. ``boxes``: per image its ``boxes`` field
    (:func:`box_records` of boxes in original pixels), or None for a model without a box head.
    ``scope_reasons``: per image None or why it is out of scope (inference/scope.py ScopeGate).
    Needs at least one image.
    """
    boxes = list(boxes) if boxes is not None else [None] * len(names)
    reasons = list(scope_reasons) if scope_reasons is not None else [None] * len(names)
    results = [ImageResult(str(n), float(p), np.asarray(bp), bool(t), study, boxes=bx, scope_reason=why,
                           scope_checked=scope_checked)
               for n, p, bp, t, bx, why in zip(names, probs, body_part_probs, truncated, boxes, reasons)]
    if not results:
        raise ValueError("records_from_outputs needs at least one image")
    images = [image_record(r, body_parts, threshold, band) for r in results]
    return images, study_records(results, body_parts, threshold, band)[0]
