"""One study's DICOM instances -> the records of ``bonexray predict --study`` for its radiographs.

Whatever front end delivered the instances (WADO-RS or C-STORE), they go through the same steps:
instances that are not radiographs (SR, PDF, CT, bonexray's own results) are skipped and named;
each radiograph goes through :mod:`bonexray.pipeline` (the decode path of training, predict and
serve: Modality LUT, VOI LUT/window, MONOCHROME1 inverted; the scope gate with the instance's own
Modality; the verdict of every front end). A file that cannot be decoded, or whose model output is
not finite, is one problem line; the rest of the study is analysed.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.findings import ImageFinding, StudyFinding
from ..data.imageio import to_uint8
from ..errors import BonexrayError, ImageReadError
from ..pipeline import Analyser, Decoded, decode, part10_bytes

__all__ = ["AnalysedImage", "Instance", "StudyAnalysis", "analyse_study", "part10_bytes", "skip_reason"]

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
    record: ImageFinding  # what bonexray says about it (the SR's and the capture's input)


@dataclass
class StudyAnalysis:
    study_uid: str
    images: list[AnalysedImage] = field(default_factory=list)
    study_record: StudyFinding | None = None
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


def analyse_study(predictor, study_uid: str, instances: Iterable[Instance],
                  analyser: Analyser | None = None) -> StudyAnalysis:
    """Decode and predict every radiograph of one study; see the module docstring."""
    analyser = analyser or Analyser(predictor)
    out = StudyAnalysis(study_uid)
    decoded: list[tuple[Instance, Decoded]] = []
    for inst in instances:
        why = skip_reason(inst.dataset)
        if why is not None:
            out.skipped.append((inst.name, why))
            continue
        out.radiograph_uids.append(str(inst.dataset.get("SOPInstanceUID", inst.name)))
        try:
            source = inst.data if inst.data is not None else inst.dataset
            decoded.append((inst, decode(source, predictor.image_size, name=inst.name)))
        except ImageReadError as err:
            out.problems.append((inst.name, err.reason))
        except BonexrayError as err:
            out.problems.append((inst.name, str(err)))
        except Exception as err:  # noqa: BLE001 - one damaged instance must not stop the study
            out.problems.append((inst.name, f"cannot decode ({type(err).__name__}: {err})"))
    if not decoded:
        return out
    images = [d for _, d in decoded]
    result = analyser.interpret(images, analyser.run(images), [study_uid] * len(images))
    out.problems += [(p.label, p.reason) for p in result.problems]
    if not result.findings:
        return out
    out.images = [AnalysedImage(decoded[i][0].dataset, to_uint8(decoded[i][1].pixels), f)
                  for i, f in zip(result.kept, result.findings, strict=True)]
    out.study_record = analyser.aggregate(result.findings)[0]
    return out
