"""One image -> verdict pipeline for every front end: ``decode -> run -> interpret -> aggregate``.

* :func:`decode` reads a source once (a file path, its bytes, a 2-D array, a PIL image or a pydicom
  ``Dataset``) into a :class:`Decoded`: the model's letterbox tile, the letterbox geometry (tile <->
  original pixels), the decoded gray pixels (scope statistics), truncation, the scope evidence
  (colourfulness, DICOM Modality) and the DICOM tags that group studies. A file is read from disk
  once and a DICOM file parsed once: the evidence and the tags come from the same bytes and the same
  parse as the pixels (data/imageio.py ``DecodedImage.tags``), or from the given ``Dataset``.
* :meth:`Analyser.run` gives the model's outputs for a batch of decoded images (boxes decoded at the
  card's suspicious box threshold, so both box levels are seen).
* :meth:`Analyser.interpret` applies the NaN policy, the scope gate, the box mapping to original
  pixels and the verdict (:mod:`bonexray.core.findings`) and returns one
  :class:`~bonexray.core.findings.ImageFinding` per finite image and one :class:`Problem` per other.
* :meth:`Analyser.aggregate` groups findings into :class:`~bonexray.core.findings.StudyFinding`\\ s.

Study grouping (:func:`study_keys`): an image whose DICOM states a StudyInstanceUID belongs to that
study, always, so a study never mixes two StudyInstanceUIDs; other images go to the caller's
fallback (``predict --study``: their folder; ``serve``: each file alone, or all together with
``grouping=one``; PACS: the study asked for).
"""
from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .core.findings import (ImageFinding, ReadingPolicy, StudyFinding, aggregate, finite_rows, nonfinite_reason,
                            read_image)
from .data.imageio import DICOM_TAGS, dicom_tags  # noqa: F401 (DICOM_TAGS re-exported)
from .errors import BonexrayError

MAX_PIXELS = 120_000_000


@dataclass(frozen=True)
class Decoded:
    """One decoded image, ready for the model and for the scope gate."""

    label: str  # how messages name it: the path, the upload's name, "image 3 (ndarray)"
    path: str | None  # what its record names (None for an array or PIL image)
    tile: np.ndarray | None  # uint8 (S, S): what the model sees
    truncated: bool
    geometry: Any  # data/preprocess.py Letterbox: tile <-> original pixels
    pixels: np.ndarray | None = None  # the decoded gray image (scope statistics)
    evidence: Any = None  # inference/scope.py SourceEvidence
    tags: dict[str, str] = field(default_factory=dict)  # DICOM_TAGS present in the file

    @property
    def study_uid(self) -> str | None:
        return self.tags.get("StudyInstanceUID")


@dataclass(frozen=True)
class Problem:
    """An input that got no finding, and why (one line)."""

    label: str
    reason: str


# --------------------------------------------------------------------------- decode


def decode(source: Any, size: int, *, name: str | os.PathLike | None = None, max_pixels: int = MAX_PIXELS,
           position: int = 0) -> Decoded:
    """Decode one source; unreadable files raise :class:`~bonexray.errors.ImageReadError` naming them.

    ``name``: how bytes or a ``Dataset`` are named (an upload's file name); ``position``: how an array
    or PIL image is named in messages.
    """
    if isinstance(source, (str, os.PathLike)):
        from .data.imageio import read_file_bytes

        path = Path(source)
        return _decode_bytes(read_file_bytes(path), path, size, max_pixels, label=os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = os.fspath(name) if name is not None else f"image {position} (bytes)"
        decoded = _decode_bytes(bytes(source), Path(label), size, max_pixels, label=label)
        return decoded if name is not None else replace(decoded, path=None)
    if _is_dataset(source):
        return _decode_dataset(source, size, name, max_pixels)
    return _decode_array(source, size, position)


def _is_dataset(x: Any) -> bool:
    module = sys.modules.get("pydicom.dataset")  # a Dataset exists only where pydicom was imported
    return module is not None and isinstance(x, module.Dataset)


def _decode_bytes(data: bytes, path: Path, size: int, max_pixels: int, *, label: str,
                  tags: dict[str, str] | None = None) -> Decoded:
    from .data.preprocess import read_bytes_for_model
    from .inference.scope import SourceEvidence, source_evidence

    m = read_bytes_for_model(data, os.fspath(path), size, max_pixels=max_pixels)
    is_dicom = m.decoded is not None and m.decoded.kind == "dicom"
    if tags is None:
        tags = dict(m.decoded.tags) if is_dicom else {}
    if is_dicom:
        evidence = SourceEvidence(modality=(tags.get("Modality") or "").upper() or None,
                                  jpeg_quality=m.decoded.jpeg_quality)
    else:
        evidence = source_evidence(data)
    return Decoded(label, label, m.tile, m.truncated, m.geometry, m.decoded.pixels if m.decoded else None,
                   evidence, tags)


def _decode_dataset(ds: Any, size: int, name: str | os.PathLike | None, max_pixels: int) -> Decoded:
    """A parsed Dataset (DICOMweb, C-STORE): tags from it; pixels through the byte decoder (Part-10 bytes)."""
    label = os.fspath(name) if name is not None else str(ds.get("SOPInstanceUID", "dataset"))
    return _decode_bytes(part10_bytes(ds), Path(f"{label}.dcm"), size, max_pixels, label=label, tags=dicom_tags(ds))


def part10_bytes(ds: Any) -> bytes:
    """A dataset as the bytes of a DICOM file, for the byte-level decode path."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _decode_array(item: Any, size: int, position: int) -> Decoded:
    from .data.preprocess import Letterbox, letterbox
    from .inference.scope import SourceEvidence, source_evidence

    label = f"image {position} ({type(item).__name__})"
    is_pil = hasattr(item, "convert") and hasattr(item, "mode")
    gray = np.asarray(item.convert("L")) if is_pil else gray_array(item)
    evidence = source_evidence(item) if is_pil else SourceEvidence()
    return Decoded(label, None, letterbox(gray, size), False, Letterbox(size, gray.shape[1], gray.shape[0]), gray,
                   evidence)


def gray_array(item: Any) -> np.ndarray:
    """A 2-D finite real array as given, or one clear error saying what is wrong with it."""
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


# --------------------------------------------------------------------------- grouping


def study_keys(decoded: Sequence[Decoded], fallback: Sequence[str | None]) -> list[str | None]:
    """Each image's study: its DICOM StudyInstanceUID where it states one (when a study is wanted at all,
    ``fallback`` not None), else ``fallback``."""
    return [None if fb is None else (d.study_uid or fb) for d, fb in zip(decoded, fallback, strict=True)]


# --------------------------------------------------------------------------- run, interpret, aggregate


@dataclass
class Interpretation:
    """What :meth:`Analyser.interpret` found: findings (input order) with the indices of their inputs."""

    findings: list[ImageFinding]
    kept: list[int]
    problems: list[Problem]


class Analyser:
    """The model, its scope gate and its reading policy, shared by every front end."""

    def __init__(self, predictor, scope_check: bool = True, model_label: object | None = None) -> None:
        from .inference.scope import ScopeGate, borderline_band

        self.predictor = predictor
        self.gate = ScopeGate(predictor.card, enabled=scope_check)
        self.band, self.band_source = borderline_band(predictor.card)
        self.policy = ReadingPolicy.from_card(predictor.card, self.band)
        self.model_label = predictor.path if model_label is None else model_label

    @property
    def box_settings(self):
        """The card's box settings at the suspicious threshold (None without a box head)."""
        settings = self.predictor.box_settings
        if settings is None or self.policy.box_suspicious is None:
            return settings
        return replace(settings, threshold=min(settings.threshold, self.policy.box_suspicious))

    def run(self, decoded: Sequence[Decoded]):
        """The model's outputs (inference/predictor.py BatchPrediction) for a batch of decoded images."""
        return self.predictor.predict_batch(np.stack([d.tile for d in decoded]), box_settings=self.box_settings)

    def interpret(self, decoded: Sequence[Decoded], pred, studies: Sequence[str | None] | None = None,
                  scope_reasons: Sequence[str | None] | None = None) -> Interpretation:
        """Findings for the finite rows of ``pred`` (one per ``decoded``); a Problem for each other row.

        ``scope_reasons``: the gate's decision for each of ``decoded``, already taken where the images
        were read (inference across processes: :meth:`~bonexray.inference.scope.ScopeGate.file_reasons`
        and ``embedding_reasons`` on each rank); None: the gate decides here."""
        studies = list(studies) if studies is not None else [None] * len(decoded)
        finite = finite_rows(pred.prob, pred.parts)
        problems = [Problem(d.label, nonfinite_reason(self.model_label)) for d, ok in zip(decoded, finite, strict=True)
                    if not ok]
        kept = [int(i) for i in np.flatnonzero(finite)]
        if scope_reasons is not None:
            reasons = [scope_reasons[i] for i in kept]
        else:
            embedding = None if pred.embedding is None else np.asarray(pred.embedding)[kept]
            reasons = self.gate.reasons([decoded[i].pixels for i in kept], [decoded[i].truncated for i in kept],
                                        [decoded[i].evidence for i in kept], embedding)
        findings = [self._finding(decoded[i], pred, i, why, studies[i]) for i, why in zip(kept, reasons, strict=True)]
        return Interpretation(findings, kept, problems)

    def _finding(self, d: Decoded, pred, i: int, why: str | None, study: str | None) -> ImageFinding:
        boxes = None
        if pred.boxes is not None and pred.boxes[i] is not None:
            b = np.asarray(pred.boxes[i], dtype=np.float64).reshape(-1, 5)
            boxes = np.concatenate([d.geometry.to_original(b[:, :4]), b[:, 4:5]], 1)
        return read_image(self.policy, path=d.path, prob=float(pred.prob[i]), part_probs=pred.parts[i],
                          truncated=d.truncated, boxes=boxes, scope_reason=why, scope_checked=self.gate.enabled,
                          study=study, study_uid=d.study_uid)

    def aggregate(self, findings: Sequence[ImageFinding]) -> list[StudyFinding]:
        """One study per distinct ``study`` of the findings (order of first appearance)."""
        groups: dict[str, list[ImageFinding]] = {}
        for f in findings:
            if f.study is not None:
                groups.setdefault(f.study, []).append(f)
        return [aggregate(self.policy, name, members) for name, members in groups.items()]
