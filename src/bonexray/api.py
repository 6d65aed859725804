"""The Python API for notebooks and scripts (re-exported by ``bonexray``).

``load_model(path)`` gives a :class:`Model` (checkpoint or ONNX export) whose ``predict`` takes image
files, folders or decoded 2-D arrays and returns one :class:`Prediction` per image, decided at the
model card's threshold. Images go through the same decode + letterbox path as training and
``bonexray predict`` (``data.preprocess.load_for_model``), so the numbers are the CLI's.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .data.datasets import load_dataset
from .data.imageio import DecodedImage
from .data.preprocess import Letterbox, ModelInput, letterbox, read_for_model
from .errors import BonexrayError, BonexrayWarning, ImageReadError
from .inference.results import finite_rows, nonfinite_reason

from .inference.results import box_records, original_boxes
from .inference.scope import source_evidence

if TYPE_CHECKING:
    from PIL.Image import Image

    from .model.checkpoint import ModelCard

__all__ = ["Model", "Prediction", "load_dataset", "load_model"]

#: One image: a file (PNG, JPEG, DICOM, ...), a decoded 2-D gray array of any size, or a PIL image.
ImageInput = Union[str, os.PathLike, np.ndarray, "Image"]


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image."""

    prob_abnormal: float
    #: ``prob_abnormal >= threshold`` of the model card; None when the image is out of scope (no verdict).
    abnormal: bool | None
    #: None when the image is out of scope.
    body_part: str | None
    #: Probability of every body-part class of the model, in the card's class order.
    body_part_probs: dict[str, float]
    #: The file it came from; None for an array or PIL image.
    path: str | None = None
    #: The file ended early and was decoded as far as it went.
    truncated: bool = False
    #: Fracture boxes in the original image's pixels, best first: dicts {x0, y0, x1, y1, score}, at the
    #: card's box threshold; None for a model without a box head.
    boxes: list[dict[str, float]] | None = None
    #: False: the model cannot judge this image (see ``scope_reason``; ``abnormal``/``body_part`` are None);
    #: None: not checked (``load_model(..., scope_check=False)``).
    in_scope: bool | None = True
    scope_reason: str | None = None
    #: "clear" or "borderline" (|p - threshold| < the card's band); None when out of scope.
    confidence: str | None = None


class Model:
    """A loaded bonexray model; build it with :func:`load_model`."""

    def __init__(self, predictor: Any, scope_check: bool = True) -> None:
        from .inference.scope import ScopeGate, borderline_band

        self._predictor = predictor
        self._gate = ScopeGate(predictor.card, enabled=scope_check)
        self.borderline_band = borderline_band(predictor.card)[0]

    @property
    def card(self) -> ModelCard:
        """The model card: backbone, image_size, body_parts, threshold, normalisation, version."""
        return self._predictor.card

    @property
    def body_parts(self) -> list[str]:
        return list(self._predictor.body_parts)

    @property
    def threshold(self) -> float:
        return float(self._predictor.threshold)

    @property
    def image_size(self) -> int:
        return int(self._predictor.image_size)

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16) -> Prediction | list[Prediction]:
        """Predict one image (-> a :class:`Prediction`) or a list / folder of them (-> a list, in input order).

        Unreadable files raise :class:`bonexray.errors.ImageReadError` naming the file.
        """
        single = not isinstance(images, (list, tuple)) and not _is_folder(images)
        items = _expand([images] if single or _is_folder(images) else list(images))
        if batch_size < 1:
            raise BonexrayError(f"batch_size must be at least 1, got {batch_size}")
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inputs = [self._input(item) for item in chunk]
            pred = self._predictor.predict_batch(np.stack([m.tile for m in inputs]))
            finite = finite_rows(pred.prob, pred.parts)
            if not finite.all():
                # No verdict (the CLI's policy, inference/results.py); an exception, because a result field
                # left empty would read as "normal" in `if p.abnormal`.
                bad = chunk[int(np.flatnonzero(~finite)[0])]
                raise BonexrayError(f"{_describe(bad, start + int(np.flatnonzero(~finite)[0]))}: "
                                    f"{nonfinite_reason(self._predictor.path)}")
            boxes = pred.boxes if pred.boxes is not None else [None] * len(chunk)
            evidence = [source_evidence(item) if self._gate.enabled and not isinstance(item, np.ndarray) else None
                        for item in chunk]
            reasons = self._gate.reasons([m.decoded.pixels if m.decoded is not None else None for m in inputs],
                                         [m.truncated for m in inputs], evidence, pred.embedding)
            for item, m, p, parts, bx, why in zip(chunk, inputs, pred.prob, pred.parts, boxes, reasons):
                found = None if bx is None else box_records(original_boxes(bx, m.geometry))
                results.append(self._result(item, float(p), parts, m.truncated, found, why))
        return results[0] if single else results

    def _input(self, item: ImageInput) -> ModelInput:
        size = self.image_size
        if isinstance(item, (str, os.PathLike)):
            return read_for_model(item, size)
        gray = _as_gray_array(item)
        return ModelInput(letterbox(gray, size), False, Letterbox(size, gray.shape[1], gray.shape[0]),
                          DecodedImage(gray, False, "array"))

    def _result(self, item: ImageInput, prob: float, parts: np.ndarray, truncated: bool, boxes=None,
                scope_reason: str | None = None) -> Prediction:
        from .inference.results import confidence

        names = self.body_parts
        verdict = scope_reason is None
        return Prediction(
            prob_abnormal=prob,
            abnormal=bool(prob >= self.threshold) if verdict else None,
            body_part=names[int(np.argmax(parts))] if verdict else None,
            body_part_probs={n: float(v) for n, v in zip(names, parts)},
            path=os.fspath(item) if isinstance(item, (str, os.PathLike)) else None,
            truncated=bool(truncated),
            boxes=boxes if verdict else None,
            in_scope=(scope_reason is None) if self._gate.enabled else None,
            scope_reason=scope_reason,
            confidence=confidence(prob, self.threshold, self.borderline_band) if verdict else None,
        )

    def __repr__(self) -> str:
        card = self.card
        return (f"bonexray.Model({self._predictor.path}, backbone={card.backbone!r}, image_size={card.image_size}, "
                f"body_parts={card.body_parts}, threshold={card.threshold:.3f})")


def load_model(path: str | os.PathLike | None = None, device: str = "auto", tta: str = "none",
               scope_check: bool = True) -> Model:
    """A bonexray checkpoint (``.ckpt``), ONNX export (``.onnx``) or bundled model name (``"fracatlas"``;
    None: the default bundled model) ready to ``predict``.

    ``device``: ``auto`` (GPU when there is one), ``cpu`` or ``cuda[:N]``. ``tta="flip"`` averages
    each image with its mirror. ``scope_check=False`` gives a verdict for every image (``in_scope`` None).
    """
    from .inference.predictor import Predictor

    return Model(Predictor(path, device=device, tta=tta), scope_check=scope_check)


def _describe(item: object, position: int) -> str:
    """How an error names an input: its path, or its position for an array / PIL image."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"image {position} ({type(item).__name__})"


def _is_folder(x: object) -> bool:
    return isinstance(x, (str, os.PathLike)) and Path(x).is_dir()


def _expand(items: Iterable[ImageInput]) -> list[ImageInput]:
    """Folders become their image files (recursively, sorted); everything else stays as given."""
    from .inference.inputs import InputPlan, _walk_images

    out: list[ImageInput] = []
    for item in items:
        if _is_folder(item):
            # The walk of `bonexray predict`: the same files (hidden ones skipped), the same order.
            plan = InputPlan()
            found = _walk_images(Path(item), plan)
            if plan.errors:
                raise ImageReadError(*plan.errors[0])
            if plan.skipped:
                first, why = plan.skipped[0]
                warnings.warn(f"{item}: {len(plan.skipped)} file(s) skipped as bonexray predict skips them "
                              f"(first: {first}: {why})", BonexrayWarning, stacklevel=3)
            if not found:
                raise ImageReadError(item, "folder holds no image files")
            out.extend(str(p) for p in found)
        else:
            out.append(item)
    return out


def _as_gray_array(item: object) -> np.ndarray:
    if hasattr(item, "convert") and hasattr(item, "mode"):  # a PIL image: luma, as read_image does
        return np.asarray(item.convert("L"))
    if not isinstance(item, np.ndarray):
        raise BonexrayError(f"cannot predict a {type(item).__name__}: give a file path, a 2-D array or a PIL image")
    if item.ndim != 2 or item.size == 0:
        raise BonexrayError(f"an image array must be 2-D grayscale (H, W), got shape {item.shape}")
    if item.dtype.kind not in "buif":
        raise BonexrayError(f"an image array must hold real numbers (integers or floats), got dtype {item.dtype}")
    if item.dtype.kind == "f" and not np.isfinite(item).all():
        # NaN/inf pixels are no image: a verdict on them would be made up.
        raise BonexrayError(f"an image array holds {int((~np.isfinite(item)).sum())} NaN or infinite value(s) of "
                            f"{item.size}; give finite pixel values")
    return item
