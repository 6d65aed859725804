"""A study's analysis -> DICOM results, built and validated by highdicom: one Comprehensive SR
(TID 1500 measurement report) and one secondary capture per image, each in a new series of the
source study (patient and study attributes copied from the source, nothing else of it altered).

UIDs are name-based UUIDs (``2.25.<uuid>``, PS3.5 B.2) derived from the study, the model's weights SHA-256 and the
set of analysed source instances, so a rerun of the same model on the same study makes the same
instances: a PACS keeps one copy, and :func:`result_uids` tells a front end what to look for before
storing anything (idempotency by study and model version).

Image records may carry ``boxes`` ([{x0, y0, x1, y1, score}] in the source image's pixels) and
``in_scope`` / ``scope_reason`` (False: the image is not something the model can judge; its
``abnormal`` and ``body_part`` are None). Boxes become closed 5-point POLYLINE SCOORDs on the
referenced image; an out-of-scope image is reported as "cannot assess" with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import BonexrayError
from .analysis import MANUFACTURER, AnalysedImage, StudyAnalysis
from .codes import (ABNORMAL, BOX_SCORE, CANNOT_ASSESS, COMMENT, FINDING, FRACTURE, NORMAL, PROB_ABNORMAL, UNITLESS,
                    XR_PROCEDURE, body_part_code)

NOT_FOR_DIAGNOSIS = ("NOT FOR DIAGNOSTIC USE: research software, not a medical device; every result must be "
                     "checked by a qualified reader.")
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


@dataclass(frozen=True)
class ModelIdentity:
    """What the results say about the model, and the key of idempotency (``sha``)."""

    name: str  # e.g. "bonexray efficientnet_lite0"
    version: str  # bonexray version that wrote the model
    sha: str  # SHA-256 of the weights (from the model card), else of the model file
    threshold: float

    @classmethod
    def from_predictor(cls, predictor) -> "ModelIdentity":
        card = predictor.card
        sha = getattr(card, "weights_sha256", None)
        if not sha:
            from ..core.hashing import file_sha256

            sha = file_sha256(predictor.path)
        return cls(f"bonexray {card.backbone}", str(card.version), str(sha), float(predictor.threshold))

    @property
    def marker(self) -> str:
        """Written into every result's SeriesDescription; says which model made it."""
        return f"bonexray {self.version} model {self.sha[:12]}"

    @property
    def algorithm_version(self) -> str:
        return f"{self.version} weights-sha256 {self.sha[:16]}"


@dataclass(frozen=True)
class ResultUIDs:
    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instances: dict[str, str]  # source SOP Instance UID -> its secondary capture's


def _uid(*parts: str) -> str:
    """A name-based UUID (RFC 4122 version 5) as a ``2.25.`` UID (PS3.5 B.2): the same parts, the same UID."""
    import uuid

    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(31).join(['bonexray-pacs', *parts])).int}"


def result_uids(study_uid: str, model: ModelIdentity, source_sop_uids: list[str]) -> ResultUIDs:
    """The UIDs of the results of ``model`` on these source images of this study (deterministic)."""
    sources = sorted(source_sop_uids)
    key = [study_uid, model.sha, *sources]
    return ResultUIDs(sr_series=_uid("sr-series", *key), sr_instance=_uid("sr", *key),
                      sc_series=_uid("sc-series", *key),
                      sc_instances={s: _uid("sc", *key, s) for s in sources})


# --------------------------------------------------------------------------- structured report


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def _verdict_items(rec, tracking, algorithm, source_images, hd, codes_mod) -> Any:
    """One TID 1501 group: the verdict (or "cannot assess" and why) of an image or of the study (``rec``: its
    core/findings.py ImageFinding or StudyFinding, read through their record mapping)."""
    in_scope = rec.get("in_scope") is not False
    site = body_part_code(rec.get("body_part")) if in_scope else None
    if in_scope and isinstance(rec.get("abnormal"), bool):
        evaluations = [hd.sr.QualitativeEvaluation(FINDING, ABNORMAL if rec["abnormal"] else NORMAL)]
        measurements = ([hd.sr.Measurement(PROB_ABNORMAL, float(rec["prob_abnormal"]), UNITLESS, algorithm_id=algorithm)]
                        if _finite(rec.get("prob_abnormal")) else [])
    else:
        evaluations, measurements = [hd.sr.QualitativeEvaluation(FINDING, CANNOT_ASSESS)], []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, algorithm_id=algorithm, source_images=source_images,
        finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
        measurements=measurements or None, qualitative_evaluations=evaluations)
    notes = []
    if in_scope and rec.get("finding"):  # the three-state reading (core/decision.py) beside the binary verdict
        notes.append(f"finding: {rec['finding']}")
    if not in_scope:
        notes.append(f"cannot assess: {rec.get('scope_reason') or 'outside what the model was trained on'}")
    elif site is None and rec.get("body_part"):
        notes.append(f"body part: {rec['body_part']} (no single anatomic region code)")
    if rec.get("truncated"):
        notes.append("the source image's pixel data ended early; what was there was read")
    for text in notes:
        # TID 1501's container takes content items; a comment says what no code does.
        group[0].ContentSequence.append(hd.sr.TextContentItem(COMMENT, text, relationship_type="CONTAINS"))
    return group


def build_sr(analysis: StudyAnalysis, model: ModelIdentity, uids: ResultUIDs):
    """The Comprehensive SR (TID 1500) of one analysed study; raises BonexrayError if highdicom refuses it."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not analysis.images or analysis.study_record is None:
        raise BonexrayError(f"study {analysis.study_uid}: no analysed image, nothing to report")
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.algorithm_version, parameters=[f"threshold={model.threshold:.6g}"])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device", model.sha), name=model.name, manufacturer_name=MANUFACTURER))
    groups = []
    for n, img in enumerate(analysis.images, 1):
        ds, rec = img.dataset, img.record
        src = hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
        tracking = hd.sr.TrackingIdentifier(uid=_uid("track", uids.sr_instance, ds.SOPInstanceUID),
                                            identifier=f"image {n}")
        groups.append(_verdict_items(rec, tracking, algorithm, [src], hd, codes))
        site = body_part_code(rec.get("body_part")) if rec.get("in_scope") is not False else None
        for k, box in enumerate(rec.get("boxes") or [], 1):
            x0, y0, x1, y1 = (float(box[c]) for c in ("x0", "y0", "x1", "y1"))
            polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
            region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline,
                                       source_image=hd.sr.SourceImageForRegion.from_source_image(ds))
            score = [hd.sr.Measurement(BOX_SCORE, float(box["score"]), UNITLESS)] if _finite(box.get("score")) else None
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_uid("box", uids.sr_instance, ds.SOPInstanceUID, str(k)), identifier=f"image {n} box {k}"),
                referenced_region=region, finding_type=FRACTURE, algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(site)] if site is not None else None, measurements=score))
    study_src = [hd.sr.SourceImageForMeasurementGroup(i.dataset.SOPClassUID, i.dataset.SOPInstanceUID)
                 for i in analysis.images]
    groups.insert(0, _verdict_items(analysis.study_record,
                                    hd.sr.TrackingIdentifier(uid=_uid("track-study", uids.sr_instance),
                                                             identifier="study"),
                                    algorithm, study_src, hd, codes))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=XR_PROCEDURE, imaging_measurements=groups)
    report[0].ContentSequence.append(hd.sr.TextContentItem(COMMENT, NOT_FOR_DIAGNOSIS, relationship_type="CONTAINS"))
    try:
        return hd.sr.ComprehensiveSR(
            evidence=[i.dataset for i in analysis.images], content=report[0],
            series_instance_uid=uids.sr_series, series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids.sr_instance, instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=model.name, software_versions=__version__,
            series_description=f"{model.marker} SR - NOT FOR DIAGNOSTIC USE", content_qualification="RESEARCH",
            is_complete=True, is_final=False, is_verified=False)
    except (ValueError, TypeError, AttributeError) as err:
        raise BonexrayError(f"study {analysis.study_uid}: cannot build the SR ({err})") from None


# --------------------------------------------------------------------------- secondary capture


def verdict_text(rec: dict[str, Any], threshold: float) -> str:
    """The line burnt into a secondary capture."""
    if rec.get("in_scope") is False:
        return f"CANNOT ASSESS: {rec.get('scope_reason') or 'outside what the model was trained on'}"
    verdict = "ABNORMAL" if rec.get("abnormal") else "normal"
    part = rec.get("body_part") or "?"
    return f"{verdict}  p={float(rec['prob_abnormal']):.2f} (threshold {threshold:.2f})  {part}"


def render_capture(pixels: np.ndarray, rec: dict[str, Any], model: ModelIdentity) -> np.ndarray:
    """RGB uint8 (H, W, 3): the decoded radiograph with boxes and a verdict banner drawn on it."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")
    w, h = img.size
    draw = ImageDraw.Draw(img)
    line = max(2, round(min(w, h) / 250))
    font_px = max(10, round(w / 45))
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    if rec.get("in_scope") is not False:
        for box in rec.get("boxes") or []:
            xy = [float(box["x0"]), float(box["y0"]), float(box["x1"]), float(box["y1"])]
            draw.rectangle(xy, outline=(255, 40, 40), width=line)
            if _finite(box.get("score")):
                draw.text((xy[0], max(0.0, xy[1] - font_px - line)), f"{float(box['score']):.2f}",
                          fill=(255, 40, 40), font=font)
    lines = [f"bonexray: {verdict_text(rec, model.threshold)}", "NOT FOR DIAGNOSTIC USE"]
    pad = max(2, font_px // 3)
    banner = (font_px + pad) * len(lines) + pad
    draw.rectangle([0, 0, w, min(h, banner)], fill=(0, 0, 0))
    for i, text in enumerate(lines):
        draw.text((pad, pad + i * (font_px + pad)), text, fill=(255, 255, 0) if i else (255, 255, 255), font=font)
    return np.asarray(img, dtype=np.uint8)


def _orientation(ds) -> tuple[str, str] | None:
    """The source's Patient Orientation when highdicom can take it (one letter per axis), else None."""
    from highdicom.enum import PatientOrientationValuesBiped

    value = ds.get("PatientOrientation")
    if not value or len(value) != 2:
        return None
    try:
        return tuple(PatientOrientationValuesBiped(str(v)).value for v in value)  # type: ignore[return-value]
    except ValueError:
        return None


def build_capture(img: AnalysedImage, model: ModelIdentity, uids: ResultUIDs, instance_number: int):
    """The secondary capture of one analysed image (highdicom SCImage, RGB, marks burnt in)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    src = img.dataset
    rgb = render_capture(img.pixels, img.record, model)
    orientation = _orientation(src)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=uids.sc_series, series_number=SC_SERIES_NUMBER,
            sop_instance_uid=uids.sc_instances[str(src.SOPInstanceUID)], instance_number=instance_number,
            manufacturer=MANUFACTURER, patient_orientation=orientation or ("A", "F"),
            transfer_syntax_uid="1.2.840.10008.1.2.1", manufacturer_model_name=model.name,
            software_versions=__version__, series_description=f"{model.marker} SC - NOT FOR DIAGNOSTIC USE",
            content_qualification="RESEARCH")
    except (ValueError, TypeError, AttributeError) as err:
        raise BonexrayError(f"{src.SOPInstanceUID}: cannot build the secondary capture ({err})") from None
    if orientation is None:
        sc.PatientOrientation = None  # Type 2: empty when the source does not say (highdicom needs a value to build)
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    sc.SourceImageSequence = Sequence([ref])
    sc.DerivationDescription = "bonexray verdict and boxes burnt into the radiograph as displayed (VOI applied)"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{verdict_text(img.record, model.threshold)}. {NOT_FOR_DIAGNOSIS}"[:10240]
    return sc


def build_results(analysis: StudyAnalysis, model: ModelIdentity, uids: ResultUIDs | None = None) -> list:
    """Every result of one study, secondary captures first and the SR last (a PACS that has the SR
    has the rest). Built whole before anything is sent: a failure here stores nothing.

    ``uids``: from :func:`result_uids` over every radiograph the study holds (default: those the
    analysis met, unreadable ones included), so a damaged instance does not change them between runs.
    """
    if uids is None:
        uids = result_uids(analysis.study_uid, model, analysis.radiograph_uids)
    captures = [build_capture(img, model, uids, n) for n, img in enumerate(analysis.images, 1)]
    return [*captures, build_sr(analysis, model, uids)]
