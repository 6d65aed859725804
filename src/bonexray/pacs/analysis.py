"""One study's DICOM instances -> the records of ``bonexray predict --study`` for its radiographs.

Whatever front end delivered the instances (WADO-RS or C-STORE), they go through the same steps:
instances that are not radiographs (SR, PDF, CT, bonexray's own results) are skipped and named;
each radiograph is decoded by :func:`bonexray.data.preprocess.read_bytes_for_model` (the decode
path of training, predict and serve: Modality LUT, VOI LUT/window, MONOCHROME1 inverted), predicted
by :meth:`Predictor.predict_arrays` and turned into records by
:func:`bonexray.inference.results.records_from_outputs`. A file that cannot be decoded, or whose
model output is not finite, is one problem line; the rest of the study is analysed.
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BonexrayError, ImageReadError

#: Radiograph storage classes bonexray reads: CR, and DX for presentation and for processing.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",
}
MANUFACTURER = "bonexray"  # written into every result; instances carrying it are never re-analysed


@dataclass
class Instance:
    """One DICOM instance of a study as delivered: a parsed dataset and, when at hand, its Part-10 bytes."""

    name: str  # how messages name it
    dataset: Any  # pydicom Dataset
    data: bytes | None = None


@dataclass
class AnalysedImage:
    dataset: Any  # the source instance (its header is what results reference and copy)
    pixels: np.ndarray  # decoded, full resolution, uint8, bone bright (what the secondary capture shows)
    record: dict[str, Any]  # bonexray predict's image record


@dataclass
class StudyAnalysis:
    study_uid: str
    images: list[AnalysedImage] = field(default_factory=list)
    study_record: dict[str, Any] | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (instance, reason): unreadable radiographs
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (instance, why): not radiographs
    radiograph_uids: list[str] = field(default_factory=list)  # every radiograph met, readable or not


def skip_reason(ds: Any) -> str | None:
    """Why this instance is not a radiograph bonexray reads, or None when it is one."""
    if str(ds.get("Manufacturer", "")).strip() == MANUFACTURER:
        return "a bonexray result, not a source image"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        try:
            from pydicom.uid import UID

            what = UID(sop_class).name if sop_class else "no SOP Class UID"
        except Exception:  # noqa: BLE001 - a malformed UID is still named as it is
            what = sop_class
        modality = ds.get("Modality", "?")
        return f"not a radiograph ({modality}, {what})"
    return None


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


def analyse_study(predictor, study_uid: str, instances: Iterable[Instance]) -> StudyAnalysis:
    """Decode and predict every radiograph of one study; see the module docstring."""
    from ..data.preprocess import read_bytes_for_model
    from ..inference.results import box_records, finite_rows, nonfinite_reason, original_boxes, records_from_outputs
    from ..inference.scope import ScopeGate, SourceEvidence, borderline_band

    out = StudyAnalysis(study_uid)
    size = predictor.image_size
    kept: list[tuple[Instance, np.ndarray, bool]] = []
    evidence: list[SourceEvidence] = []
    geometry = []
    tiles: list[np.ndarray] = []
    for inst in instances:
        why = skip_reason(inst.dataset)
        if why is not None:
            out.skipped.append((inst.name, why))
            continue
        out.radiograph_uids.append(str(inst.dataset.get("SOPInstanceUID", inst.name)))
        try:
            data = inst.data if inst.data is not None else part10_bytes(inst.dataset)
            m = read_bytes_for_model(data, f"{inst.name}.dcm", size)
        except ImageReadError as err:
            out.problems.append((inst.name, err.reason))
            continue
        except BonexrayError as err:
            out.problems.append((inst.name, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - one damaged instance must not stop the study
            out.problems.append((inst.name, f"cannot decode ({type(err).__name__}: {err})"))
            continue
        kept.append((inst, m.decoded.pixels, m.truncated))
        evidence.append(SourceEvidence(modality=str(inst.dataset.get("Modality", "")).strip().upper() or None))
        tiles.append(m.tile)
        geometry.append(m.geometry)
    if not kept:
        return out
    pred = predictor.predict_batch(np.stack(tiles))
    probs, parts = pred.prob, pred.parts
    finite = finite_rows(probs, parts)  # the one NaN policy (inference/results.py): no verdict, same words
    for (inst, _, _), ok in zip(kept, finite):
        if not ok:
            out.problems.append((inst.name, nonfinite_reason(predictor.path)))
    keep = np.flatnonzero(finite)
    if len(keep) == 0:
        return out
    gate = ScopeGate(predictor.card)
    reasons = gate.reasons([kept[i][1] for i in keep], [kept[i][2] for i in keep], [evidence[i] for i in keep],
                           None if pred.embedding is None else pred.embedding[keep])
    kept = [kept[i] for i in keep]
    boxes = None if pred.boxes is None else [box_records(original_boxes(pred.boxes[i], geometry[i])) for i in keep]
    images, study = records_from_outputs(
        [inst.name for inst, _, _ in kept], probs[keep], parts[keep], [t for _, _, t in kept], study_uid,
        predictor.body_parts, predictor.threshold, boxes=boxes, scope_reasons=reasons,
        band=borderline_band(predictor.card)[0])
    out.images = [AnalysedImage(inst.dataset, pixels, rec) for (inst, pixels, _), rec in zip(kept, images)]
    out.study_record = study
    return out
