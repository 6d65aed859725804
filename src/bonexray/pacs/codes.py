"""The coded concepts bonexray's DICOM results use (SNOMED CT, DICOM, LOINC, UCUM and two local codes).

Sources: pydicom's concept dictionary generated from PS3.16 (CID 222/242 normality, CID 4031 anatomic
regions, TID 4019 algorithm identification) and the notes in docs/ARCHITECTURE.md's pacs/ row.
Codes in the private scheme ``99BONEXRAY`` stand for what no standard code says (the model's
probability, "cannot assess").
"""
from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

LOCAL_SCHEME = "99BONEXRAY"

NORMAL = CodedConcept("17621005", "SCT", "Normal")
ABNORMAL = CodedConcept("263654008", "SCT", "Abnormal")
FINDING = CodedConcept("121071", "DCM", "Finding")
FRACTURE = CodedConcept("72704001", "SCT", "Fracture")  # the morphologic abnormality; not in a CID
ANATOMIC_REGION = CodedConcept("363698007", "SCT", "Finding Site")
COMMENT = CodedConcept("121106", "DCM", "Comment")
XR_PROCEDURE = CodedConcept("43468-8", "LN", "XR unspecified body region")  # CID 100
UNITLESS = codes.UCUM.NoUnits  # UCUM "1"

PROB_ABNORMAL = CodedConcept("PROB-ABNORMAL", LOCAL_SCHEME, "Probability of abnormality")
BOX_SCORE = CodedConcept("BOX-SCORE", LOCAL_SCHEME, "Fracture box score")
CANNOT_ASSESS = CodedConcept("NOT-ASSESSED", LOCAL_SCHEME, "Cannot assess")

#: bonexray's body-part class names -> CID 4031 anatomic region (SNOMED CT). ``mixed`` (several
#: regions in one image) has no single code: the SR says it in text instead.
BODY_PART_CODES: dict[str, CodedConcept] = {
    "hand": CodedConcept("85562004", "SCT", "Hand"),
    "hip": CodedConcept("29836001", "SCT", "Hip"),
    "leg": CodedConcept("30021000", "SCT", "Lower leg"),
    "shoulder": CodedConcept("16982005", "SCT", "Shoulder"),
    "elbow": CodedConcept("16953009", "SCT", "Elbow joint"),  # CID 4031 has no plain "elbow"
    "wrist": CodedConcept("74670003", "SCT", "Wrist joint"),  # nor a plain "wrist"
    "forearm": CodedConcept("14975008", "SCT", "Forearm"),
    "humerus": CodedConcept("85050009", "SCT", "Humerus"),
    "finger": CodedConcept("7569003", "SCT", "Finger"),
}


def body_part_code(name: str | None) -> CodedConcept | None:
    """The anatomic region code of a body-part class (MURA's ``XR_WRIST`` style too), or None."""
    if not name:
        return None
    key = str(name).strip().lower()
    key = key[3:] if key.startswith("xr_") else key
    return BODY_PART_CODES.get(key)
