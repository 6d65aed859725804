"""What a DICOM file says about its body region, mapped to a model's body-part classes: one stated table.

:data:`TERM_CLASSES` maps DICOM body-part words to the classes of the models bonexray trains
(FracAtlas: hand, hip, leg, mixed, shoulder; MURA: elbow, finger, forearm, hand, humerus, shoulder,
wrist). Keys are BodyPartExamined defined terms (DICOM PS3.16 CID 4031 "Common Anatomic Regions",
as they appear in (0018,0015): upper case, no spaces) and the plain words that Protocol Name,
Study Description and Series Description use for them (THORAX, CXR, PELVIS, ...). A term mapped to an
empty set names a region that is none of these models' classes (chest, skull, spine, abdomen,
teeth, ...). FracAtlas's classes are broad regions, so a limb part between two of them (elbow,
forearm, humerus, femur) maps to both neighbours: evidence, never proof; the pixels still decide.

:func:`dicom_region` reads the tags; :func:`region_outside_classes` is the one rule the scope gate
applies: at least one recognised term, and none of the recognised terms maps to one of the model's
classes. Missing, empty or unrecognised tags say nothing (the pixels alone decide). ViewPosition
(AP, PA, LAT, ...) names a projection, not a region: it is recorded, never decisive.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_HAND = frozenset({"hand", "finger", "wrist"})
_UPPER = frozenset({"hand", "shoulder", "elbow", "forearm", "humerus", "wrist", "finger", "mixed"})
_LOWER = frozenset({"leg", "hip", "mixed"})
_LIMB = _UPPER | _LOWER
_NONE: frozenset[str] = frozenset()

#: DICOM body-part term or description word -> the model classes it can be (empty: none of them).
TERM_CLASSES: Mapping[str, frozenset[str]] = {
    # hand and wrist
    "HAND": _HAND, "FINGER": frozenset({"hand", "finger"}), "THUMB": frozenset({"hand", "finger"}),
    "WRIST": frozenset({"hand", "wrist"}), "CARPUS": frozenset({"hand", "wrist"}),
    "SCAPHOID": frozenset({"hand", "wrist"}),
    # between hand and shoulder
    "FOREARM": frozenset({"hand", "forearm"}), "RADIUS": frozenset({"hand", "forearm"}),
    "ULNA": frozenset({"hand", "forearm"}), "ELBOW": frozenset({"hand", "shoulder", "elbow"}),
    "HUMERUS": frozenset({"shoulder", "humerus"}), "ARM": _UPPER, "UPPERARM": frozenset({"shoulder", "humerus"}),
    "UPRARM": frozenset({"shoulder", "humerus"}), "UPPEREXTREMITY": _UPPER, "UPPEREXTREMITIES": _UPPER,
    # shoulder girdle
    "SHOULDER": frozenset({"shoulder"}), "CLAVICLE": frozenset({"shoulder"}), "SCAPULA": frozenset({"shoulder"}),
    "ACJOINT": frozenset({"shoulder"}),
    # hip and pelvis
    "HIP": frozenset({"hip"}), "PELVIS": frozenset({"hip"}), "FEMUR": frozenset({"hip", "leg"}),
    "THIGH": frozenset({"hip", "leg"}),
    # leg, knee, ankle, foot
    "LEG": frozenset({"leg"}), "LOWERLEG": frozenset({"leg"}), "KNEE": frozenset({"leg"}),
    "PATELLA": frozenset({"leg"}), "TIBIA": frozenset({"leg"}), "FIBULA": frozenset({"leg"}),
    "ANKLE": frozenset({"leg"}), "FOOT": frozenset({"leg"}), "TOE": frozenset({"leg"}),
    "HEEL": frozenset({"leg"}), "CALCANEUS": frozenset({"leg"}), "LOWEREXTREMITY": _LOWER,
    "LOWEREXTREMITIES": _LOWER,
    # whole limbs
    "EXTREMITY": _LIMB, "EXTREMITIES": _LIMB, "LIMB": _LIMB,
    # regions that are none of the classes
    "CHEST": _NONE, "THORAX": _NONE, "CXR": _NONE, "LUNG": _NONE, "LUNGS": _NONE, "RIB": _NONE, "RIBS": _NONE,
    "STERNUM": _NONE, "HEART": _NONE, "BREAST": _NONE, "MAMMO": _NONE, "SKULL": _NONE, "HEAD": _NONE,
    "BRAIN": _NONE, "FACE": _NONE, "ORBIT": _NONE, "SINUS": _NONE, "SINUSES": _NONE, "NOSE": _NONE,
    "NASAL": _NONE, "ZYGOMA": _NONE, "MANDIBLE": _NONE, "MAXILLA": _NONE, "JAW": _NONE, "TMJ": _NONE,
    "TEETH": _NONE, "TOOTH": _NONE, "DENTAL": _NONE, "NECK": _NONE, "HEADNECK": _NONE, "SPINE": _NONE,
    "CSPINE": _NONE, "TSPINE": _NONE, "LSPINE": _NONE, "SSPINE": _NONE, "CTSPINE": _NONE, "TLSPINE": _NONE,
    "LSSPINE": _NONE, "WHOLESPINE": _NONE, "SACRUM": _NONE, "COCCYX": _NONE, "SIJOINT": _NONE,
    "ABDOMEN": _NONE, "ABDOMENPELVIS": _NONE, "CHESTABDOMEN": _NONE, "CHESTABDPELVIS": _NONE,
    "KIDNEY": _NONE, "BLADDER": _NONE, "COLON": _NONE, "STOMACH": _NONE, "ESOPHAGUS": _NONE,
    "WHOLEBODY": _NONE,
}

#: The tags read, in order; BodyPartExamined is a defined term, the others free text.
REGION_TAGS = ("BodyPartExamined", "ProtocolName", "StudyDescription", "SeriesDescription")

_WORD = re.compile(r"[A-Z]+")
# Two-word forms in free text, joined before lookup ("UPPER EXTREMITY" -> UPPEREXTREMITY).
_JOIN = re.compile(r"\b(UPPER|LOWER|WHOLE|C|T|L|AC|SI|CHEST|ABDOMEN|HEAD)[ _\-]+"
                   r"(EXTREMITY|EXTREMITIES|ARM|LEG|BODY|SPINE|JOINT|ABDOMEN|PELVIS|NECK)\b")


@dataclass(frozen=True)
class DicomRegion:
    """The recognised body-part terms of a file (tag -> terms), the classes they map to, the view."""

    terms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    view: str | None = None

    @property
    def recognised(self) -> tuple[str, ...]:
        return tuple(t for ts in self.terms.values() for t in ts)

    def classes(self) -> frozenset[str]:
        """Every model class some recognised term can be."""
        out: set[str] = set()
        for t in self.recognised:
            out |= TERM_CLASSES[t]
        return frozenset(out)

    def describe(self) -> str:
        return "; ".join(f"{tag} {' '.join(ts)}" for tag, ts in self.terms.items())


def terms_in(text: str | None) -> tuple[str, ...]:
    """The table's terms in one tag value (upper-cased; two-word forms joined; unknown words dropped)."""
    if not text:
        return ()
    s = _JOIN.sub(lambda m: m.group(1) + m.group(2), str(text).upper())
    seen: list[str] = []
    for w in _WORD.findall(s):
        if w in TERM_CLASSES and w not in seen:
            seen.append(w)
    return tuple(seen)


def dicom_region(tags: Mapping[str, object] | object) -> DicomRegion:
    """Recognised region terms of a pydicom Dataset (or a dict of tag keyword -> value)."""
    get = tags.get if hasattr(tags, "get") else (lambda k, d=None: getattr(tags, k, d))
    found: dict[str, tuple[str, ...]] = {}
    for tag in REGION_TAGS:
        value = get(tag, None)
        ts = terms_in(None if value is None else str(value))
        if ts:
            found[tag] = ts
    view = get("ViewPosition", None)
    view = str(view).strip().upper() or None if view is not None else None
    return DicomRegion(found, view)


def region_outside_classes(region: DicomRegion | None, classes: Iterable[str]) -> bool:
    """True when the file names its region and none of the named regions is one of ``classes``."""
    if region is None or not region.recognised:
        return False
    return not (region.classes() & {c.lower() for c in classes})
