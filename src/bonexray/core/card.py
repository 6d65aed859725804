"""The model card: what a consumer needs besides the weights, one type for a checkpoint's card, an ONNX
file's metadata and ``/api/model``.

Torch-free, so reading an ONNX file's card imports no torch. Every card is checked once, by
:meth:`ModelCard.validate` (called on construction): a card that would give wrong or no answers
(threshold outside (0, 1], absurd image size, duplicate or colliding class names) refuses the model
with one line.

A card that states no ``mean``/``std`` (written by hand, or by a bonexray that did not record them)
gets its backbone's normalisation, which only the backbone registry knows: ``bonexray.model.registry``
registers that lookup here (:func:`set_backbone_normalisation`) when it is imported. Cards bonexray
writes always state both, so the torch-free ONNX path never needs the lookup.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import CheckpointError
from .version import __version__

#: Image sizes a model card may ask for: below, no backbone has a feature map left; above, one image alone
#: takes gigabytes through the network (a card of 10000 px drove predict into the OOM killer).
IMAGE_SIZE_RANGE = (32, 2048)
#: Output fields of a prediction record: a class named so that ``prob_<name>`` is one of them would overwrite it.
RESERVED_PROB_NAMES = ("abnormal",)
#: A body-part name is shown in CSV headers, JSON keys, DICOM SR text and the web page.
MAX_NAME_CHARS = 64
_NAME_PUNCTUATION = set(" _-.()/+")
#: Test-time augmentation: "flip" averages the probabilities of the tile and its mirror, "d4" over its 8
#: quarter turns and mirrors (a radiograph's verdict should not depend on how it was turned).
TTA_MODES = ("none", "flip", "d4")


def _plain_name(name: str) -> bool:
    return len(name) <= MAX_NAME_CHARS and all(c.isalnum() or c in _NAME_PUNCTUATION for c in name)


@dataclass
class ModelCard:
    """What a consumer needs besides the weights: see docs/ARCHITECTURE.md."""

    backbone: str
    image_size: int
    in_chans: int = 1
    #: Backbone normalisation (applied inside the net). None -> the registry's default.
    mean: list[float] | None = None
    std: list[float] | None = None
    #: Class order of the body-part head.
    body_parts: list[str] = field(default_factory=list)
    #: Abnormality decision threshold on the sigmoid probability.
    threshold: float = 0.5
    version: str = __version__
    #: The training split: source, seed, fractions, --limit and a fingerprint of (image, split) pairs
    #: (data/splits.py split_fingerprint). None for models from before bonexray recorded it.
    split: dict | None = None
    #: SHA-256 of the network weights (:func:`weights_sha256`), written with the checkpoint.
    weights_sha256: str | None = None
    #: Box head settings (model/detection.py BoxSettings: threshold, nms_iou, max_detections, stride,
    #: threshold_source); None for models without a box head.
    boxes: dict | None = None
    #: Feature-space scope statistics (inference/scope.py FeatureScope.to_card: PCA of the training
    #: embeddings, threshold, how it was chosen); None: only the image-statistics checks run.
    scope: dict | None = None
    #: Half-width of the "borderline" band around ``threshold`` and how it was set; None: the stated default.
    borderline_band: float | None = None
    borderline_source: str | None = None
    #: Probability calibration fitted on held-out predictions (core/decision.py ``calibrated``):
    #: {"method": "temperature" or "temperature+bias", "temperature": T, "bias": b (optional, 0),
    #: "fitted_on": ...}; None: probabilities as the net gives them.
    calibration: dict | None = None
    #: The two operating points of the three-state finding (core/decision.py): {"suspicious": p_low,
    #: "definite": p_high, "source": ...} on the calibrated probability; None: threshold -/+ band.
    operating_points: dict | None = None
    #: The test-time augmentation (``TTA_MODES``) the calibration and operating points were fitted
    #: under, and the one every front end uses unless told otherwise; None: "none".
    tta: str | None = None

    def __post_init__(self) -> None:
        if self.mean is None or self.std is None:
            mean, std = _backbone_normalisation(self.backbone)
            self.mean = list(mean) if self.mean is None else self.mean
            self.std = list(std) if self.std is None else self.std
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        self.body_parts = [str(b) for b in self.body_parts]
        self.image_size = int(self.image_size)
        self.in_chans = int(self.in_chans)
        self.threshold = float(self.threshold)
        self.validate()

    def validate(self) -> None:
        """Refuse a card that would give wrong or no answers (:class:`CheckpointError`, one line, no path:
        callers prefix the model file). Every model bonexray loads goes through here."""
        if not math.isfinite(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise CheckpointError(f"model card threshold {self.threshold!r} is not a probability in (0, 1]")
        lo, hi = IMAGE_SIZE_RANGE
        if not lo <= self.image_size <= hi:
            raise CheckpointError(f"model card image_size {self.image_size} is outside {lo}..{hi} pixels")
        if not self.body_parts:
            raise CheckpointError("model card has no body_parts")
        blank = [b for b in self.body_parts if not isinstance(b, str) or not b.strip()]
        if blank:
            raise CheckpointError(f"model card has an empty body-part name in {self.body_parts}")
        odd = [b for b in self.body_parts if not _plain_name(b)]
        if odd:
            raise CheckpointError(f"model card body part {odd[0]!r} is not a plain name (it reaches CSV headers, JSON "
                                  f"keys and web pages): use at most {MAX_NAME_CHARS} letters, digits, spaces or "
                                  "_-.()/+, without control characters or markup")
        dupes = sorted({b for b in self.body_parts if self.body_parts.count(b) > 1})
        if dupes:
            raise CheckpointError(f"model card names body part(s) {', '.join(dupes)} twice; each class needs its "
                                  "own name")
        clash = [b for b in self.body_parts if b in RESERVED_PROB_NAMES]
        if clash:
            raise CheckpointError(f"model card body part {clash[0]!r} would overwrite the output field "
                                  f"prob_{clash[0]}; rename the class")
        if self.tta is not None and self.tta not in TTA_MODES:
            raise CheckpointError(f"model card tta {self.tta!r} is not one of {', '.join(TTA_MODES)}")
        band = self.borderline_band
        if band is not None and not (isinstance(band, (int, float)) and math.isfinite(band) and 0.0 <= band < 0.5):
            raise CheckpointError(f"model card borderline_band {band!r} is not a probability distance in [0, 0.5)")
        cal = self.calibration
        if cal is not None:
            t = cal.get("temperature") if isinstance(cal, Mapping) else None
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise CheckpointError(f"model card calibration {cal!r} has no positive finite temperature")
            b = cal.get("bias", 0.0)
            if not (isinstance(b, (int, float)) and math.isfinite(b)):
                raise CheckpointError(f"model card calibration {cal!r} has a bias that is not a finite number")
        pts = self.operating_points
        if pts is not None:
            lo = pts.get("suspicious") if isinstance(pts, Mapping) else None
            hi = pts.get("definite") if isinstance(pts, Mapping) else None
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)) or not 0 <= lo <= hi <= 1:
                raise CheckpointError(f"model card operating_points {pts!r} are not two probabilities with "
                                      "suspicious <= definite")
        if self.scope is not None:
            need = ("k", "dim", "mean", "components", "variances", "residual_mean", "threshold", "far_threshold")
            lacking = [k for k in need if not isinstance(self.scope, Mapping) or k not in self.scope]
            if lacking:
                raise CheckpointError(f"model card scope statistics lack {', '.join(lacking)}")
            head = self.scope.get("head")
            if head is not None:
                need = ("dim", "classes", "mean", "scale", "coef", "intercept", "threshold")
                lacking = [k for k in need if not isinstance(head, Mapping) or k not in head]
                if lacking:
                    raise CheckpointError(f"model card scope head lacks {', '.join(lacking)}")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean) or not all(
                math.isfinite(v) for v in self.mean + self.std) or not all(v > 0 for v in self.std):
            raise CheckpointError(f"model card mean/std {self.mean}/{self.std} are not a valid normalisation")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what goes under ``"bonexray"`` and into ONNX metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"model card must be a dict, got {type(data).__name__}")
        missing = [k for k in ("backbone", "image_size", "body_parts") if k not in data]
        if missing:
            raise CheckpointError(f"model card lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"malformed model card: {err}") from err

_normalisation_lookup: Callable[[str], tuple[Sequence[float], Sequence[float]]] | None = None


def set_backbone_normalisation(lookup: Callable[[str], tuple[Sequence[float], Sequence[float]]]) -> None:
    """Register how a backbone name gives its (mean, std): called by ``bonexray.model.registry``."""
    global _normalisation_lookup
    _normalisation_lookup = lookup


def _backbone_normalisation(backbone: str) -> tuple[Sequence[float], Sequence[float]]:
    if _normalisation_lookup is None:
        raise CheckpointError(f"model card of backbone {backbone!r} states no mean/std, and the backbone registry "
                              "(bonexray.model.registry, which needs torch) is not loaded to give its default")
    return _normalisation_lookup(backbone)
