"""Record helpers over :mod:`bonexray.core.findings` for callers that hold outputs, not findings.

The decisions (NaN policy, scope, verdict, finding, confidence, boxes, study aggregation) live in
core/findings.py and are made there only; :func:`image_record` and :func:`study_records` build an
:class:`~bonexray.core.findings.ImageFinding` / ``StudyFinding`` under a card that states only a
threshold and a band, and return its JSON record.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..core.decision import DEFAULT_BAND
from ..core.findings import (ImageFinding, ReadingPolicy, aggregate, confidence, finite_rows, nonfinite_reason,
                             read_image)

__all__ = ["ImageResult", "confidence", "finite_rows", "image_record", "nonfinite_reason", "original_boxes",
           "study_records"]


@dataclass
class ImageResult:
    """One image's outputs: raw probability and body-part probabilities (a model without boxes)."""

    path: str
    prob_abnormal: float
    body_part_probs: np.ndarray
    truncated: bool
    study: str | None = None
    cam: str | None = None
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


def _policy(body_parts: Sequence[str], threshold: float, band: float | None) -> ReadingPolicy:
    band = DEFAULT_BAND if band is None else float(band)
    card = SimpleNamespace(body_parts=list(body_parts), threshold=float(threshold), borderline_band=band,
                           borderline_source="given", operating_points=None, calibration=None, boxes=None)
    return ReadingPolicy.from_card(card, band)


def _finding(policy: ReadingPolicy, res: ImageResult) -> ImageFinding:
    f = read_image(policy, path=res.path, prob=res.prob_abnormal, part_probs=res.body_part_probs,
                   truncated=res.truncated, scope_reason=res.scope_reason, scope_checked=res.scope_checked,
                   study=res.study)
    return f.model_copy(update={"cam": res.cam})


def image_record(res: ImageResult, body_parts: Sequence[str], threshold: float,
                 band: float | None = None) -> dict[str, Any]:
    """The JSON record of one image (``band``: the borderline half-width; None: the default)."""
    return _finding(_policy(body_parts, threshold, band), res).record()


def study_records(results: Iterable[ImageResult], body_parts: Sequence[str], threshold: float,
                  band: float | None = None) -> list[dict[str, Any]]:
    """One aggregate per study, in order of first appearance, over its in-scope images."""
    policy = _policy(body_parts, threshold, band)
    groups: dict[str, list[ImageFinding]] = {}
    for r in results:
        if r.study is not None:
            groups.setdefault(r.study, []).append(_finding(policy, r))
    return [aggregate(policy, name, members).record() for name, members in groups.items()]
