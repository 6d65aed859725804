"""The Python API for notebooks and scripts (re-exported by ``bonexray``).

``load_model(path)`` gives a :class:`Model` (checkpoint or ONNX export) whose ``predict`` takes image
files, folders, their bytes, decoded 2-D arrays, PIL images or pydicom Datasets and returns one
:class:`Prediction` (bonexray.core.findings.ImageFinding) per image. Images go through
:mod:`bonexray.pipeline`, the pipeline of ``bonexray predict``, ``serve`` and ``pacs``, so the
findings are the CLI's.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .core.findings import ImageFinding
from .data.datasets import load_dataset
from .errors import BonexrayError, BonexrayWarning, ImageReadError
from .pipeline import Analyser, decode

if TYPE_CHECKING:
    from PIL.Image import Image

    from .core.card import ModelCard

__all__ = ["Model", "Prediction", "load_dataset", "load_model"]

#: One image: a file (PNG, JPEG, DICOM, ...), its bytes, a decoded 2-D gray array of any size, a PIL image
#: or a pydicom Dataset.
ImageInput = Union[str, os.PathLike, bytes, np.ndarray, "Image", Any]


#: What the model says about one image: the record of every front end (bonexray.core.findings). Its
#: attributes: ``prob_abnormal``, ``abnormal`` (None when out of scope), ``finding`` (negative /
#: suspicious / positive; None when out of scope), ``body_part``, ``body_part_probs`` (dict in the
#: card's class order), ``path`` (None for an array or PIL image), ``truncated``, ``boxes`` (Box
#: objects with x0, y0, x1, y1, score, level; None for a model without a box head), ``in_scope``,
#: ``scope_reason``, ``confidence``; ``.record()`` gives the JSON line of ``bonexray predict``.
Prediction = ImageFinding


class Model:
    """A loaded bonexray model; build it with :func:`load_model`."""

    def __init__(self, predictor: Any, scope_check: bool = True) -> None:
        self._predictor = predictor
        self._analyser = Analyser(predictor, scope_check=scope_check)
        self.borderline_band = self._analyser.band

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

        Unreadable files raise :class:`bonexray.errors.ImageReadError` naming the file; an image whose model
        output is not a finite number raises :class:`BonexrayError` (a result left empty would read as
        "normal" in ``if p.abnormal``).
        """
        single = not isinstance(images, (list, tuple)) and not _is_folder(images)
        items = _expand([images] if single or _is_folder(images) else list(images))
        if batch_size < 1:
            raise BonexrayError(f"batch_size must be at least 1, got {batch_size}")
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            decoded = [decode(item, self.image_size, position=start + k) for k, item in enumerate(chunk)]
            found = self._analyser.interpret(decoded, self._analyser.run(decoded))
            if found.problems:
                raise BonexrayError(f"{found.problems[0].label}: {found.problems[0].reason}")
            results.extend(found.findings)
        return results[0] if single else results

    def __repr__(self) -> str:
        card = self.card
        return (f"bonexray.Model({self._predictor.path}, backbone={card.backbone!r}, image_size={card.image_size}, "
                f"body_parts={card.body_parts}, threshold={card.threshold:.3f})")


def load_model(path: str | os.PathLike | None = None, device: str = "auto", tta: str | None = None,
               scope_check: bool = True) -> Model:
    """A bonexray checkpoint (``.ckpt``), ONNX export (``.onnx``) or bundled model name (``"fracatlas"``;
    None: the default bundled model) ready to ``predict``.

    ``device``: ``auto`` (GPU when there is one), ``cpu`` or ``cuda[:N]``. ``tta``: test-time
    augmentation, ``"none"``, ``"flip"`` (each image with its mirror) or ``"d4"`` (its 8 quarter turns
    and mirrors); None: the model card's, under which its calibration was fitted. ``scope_check=False`` gives a verdict for every image (``in_scope`` None).
    """
    from .inference.predictor import Predictor

    return Model(Predictor(path, device=device, tta=tta), scope_check=scope_check)


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
