"""Reader for the FracAtlas release layout (Abedeen et al., Sci Data 2023).

``dataset.csv`` + ``images/{Fractured,Non_fractured}/IMGnnnnnnn.jpg``. FracAtlas has no patient or
study ids. Views of one examination have consecutive ids and share the body-part flags, but not
always the others (one view may be marked multiscan, or show the fracture while the next does not).
So runs of consecutive ids with identical body-part flags become the *exam groups* (study and
patient ids) that splits keep together: a heuristic, not real study ids. Merging two examinations
into one group is safe; splitting one would leak it across train and test.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import DatasetError
from .records import Record, RecordSet

FRACATLAS_PARTS = ("hand", "leg", "hip", "shoulder")
_FLAG_COLUMNS = ("hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan", "fractured")
#: The flags that define an exam group: what one examination's views always share.
EXAM_GROUP_FLAGS = ("hand", "leg", "hip", "shoulder", "mixed")
_REQUIRED = ("image_id",) + _FLAG_COLUMNS
_FOLDERS = {"Fractured": 1, "Non_fractured": 0}


def find_fracatlas_root(path: Path) -> Path | None:
    for cand in (path, path / "FracAtlas"):
        if (cand / "dataset.csv").is_file() and (cand / "images").is_dir():
            return cand
    return None


def fracatlas_body_part(flags: dict[str, int]) -> str:
    parts = [p for p in FRACATLAS_PARTS if flags[p]]
    if flags.get("mixed") or len(parts) > 1:
        return "mixed"
    if not parts:
        return "unknown"
    return parts[0]


def _outline(segmentation) -> list[float] | None:
    """The first polygon of a COCO segmentation as a flat [x, y, ...] list; None for RLE or none."""
    if isinstance(segmentation, list) and segmentation and isinstance(segmentation[0], list):
        poly = [float(v) for v in segmentation[0]]
        if len(poly) >= 6 and len(poly) % 2 == 0:
            return poly
    return None


def read_fracatlas_boxes(root: Path, problems: list[str]) -> dict[str, dict] | None:
    """Fracture boxes from ``Annotations/COCO JSON/*.json``: file name -> {"size": (w, h), "boxes": [[x, y, w, h], ...],
    "polygons": [[x0, y0, x1, y1, ...] or None, ...]} (each box's outline, when the annotation has one,
    so that augmentation can rotate the outline rather than the box).

    Boxes are in the pixels of the image as the annotators saw it (EXIF orientation applied), which is
    also how bonexray decodes it. Returns None when the release's annotations are not there.
    """
    files = sorted((root / "Annotations" / "COCO JSON").glob("*.json"))
    if not files:
        return None
    out: dict[str, dict] = {}
    for file in files:
        try:
            coco = json.loads(file.read_text())
            images = {im["id"]: im for im in coco["images"]}
            for im in images.values():
                out.setdefault(im["file_name"], {"size": (int(im["width"]), int(im["height"])), "boxes": [], "polygons": []})
            for ann in coco["annotations"]:
                im = images.get(ann["image_id"])
                x, y, w, h = (float(v) for v in ann["bbox"])
                if im is None or w <= 0 or h <= 0:
                    problems.append(f"{file.name}: annotation {ann.get('id')} has no image or an empty box; ignored")
                    continue
                out[im["file_name"]]["boxes"].append([x, y, w, h])
                out[im["file_name"]]["polygons"].append(_outline(ann.get("segmentation")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{file}: unreadable COCO annotations ({type(e).__name__}: {e}); boxes not used")
            return None
    return out


def _read_dataset_csv(root: Path) -> tuple[Path, list[dict[str, str]]]:
    """``dataset.csv`` (its path and rows), after checking that it has every column the reader needs."""
    csv_path = root / "dataset.csv"
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {', '.join(missing)}")
        rows = list(reader)
    return csv_path, rows


def _images_on_disk(root: Path) -> dict[str, tuple[Path, int]]:
    """Where each image actually is on disk, with its folder's label (the release's own fracture label)."""
    on_disk: dict[str, tuple[Path, int]] = {}
    for folder, label in _FOLDERS.items():
        d = root / "images" / folder
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file():
                    on_disk[p.name] = (p, label)
    return on_disk


def _row_flags(row: dict[str, str], image_id: str, where: str, problems: list[str]) -> dict[str, int] | None:
    """The row's flags, each 0 or 1; None (the problem noted) when the row is to be skipped."""
    try:
        flags = {c: int(row[c]) for c in _FLAG_COLUMNS}
    except (TypeError, ValueError):
        problems.append(f"{where}: non-integer flag in {image_id}")
        return None
    odd = [f"{c}={v}" for c, v in flags.items() if v not in (0, 1)]
    if odd:
        problems.append(f"{where}: {image_id}: flag {', '.join(odd)} is not 0 or 1; row skipped")
        return None
    return flags


def _is_repeat(image_id: str, flags: dict[str, int], line_no: int, listed: dict[str, tuple[int, dict[str, int]]],
               csv_path: Path, problems: list[str]) -> bool:
    """Whether the image was listed on an earlier line (then merged, the problem noted); raises when the two
    rows' flags differ. One image counted twice would weigh double and could sit in two splits."""
    if image_id not in listed:
        return False
    first, first_flags = listed[image_id]
    if first_flags != flags:
        differ = ", ".join(f"{c} ({first_flags[c]} vs {flags[c]})" for c in flags if flags[c] != first_flags[c])
        raise DatasetError(f"{csv_path}: {image_id} is listed on lines {first} and {line_no} with different "
                           f"{differ}; list each image once")
    problems.append(f"{csv_path.name} line {line_no}: {image_id} repeats line {first}; merged")
    return True


def _localization(ann: dict | None, fractured: int) -> dict:
    """Where a fracture is, when known: boxes for annotated fractures, nowhere for images without a
    fracture; fractured images the annotators skipped stay unknown."""
    if ann and ann["boxes"] and fractured:
        return dict(boxes=ann["boxes"], polygons=ann["polygons"], annotated_size=ann["size"], localized=True)
    return dict(localized=not fractured)


def _fracatlas_record(image_id: str, flags: dict[str, int], stored: tuple[Path, int], group: int,
                      boxes: dict[str, dict] | None, problems: list[str]) -> Record:
    """The record of one listed image found on disk (``stored``: its file and its folder's label)."""
    file, folder_label = stored
    fractured = flags["fractured"]
    if folder_label != fractured:
        problems.append(
            f"{image_id}: fractured={fractured} in dataset.csv but stored in images/"
            f"{'Fractured' if folder_label else 'Non_fractured'}; the folder wins"
        )
        fractured = folder_label
    body_part = fracatlas_body_part(flags)
    if body_part == "unknown":
        problems.append(f"{image_id}: no body-part flag set")
    extras = {"image_id": image_id, "fractured": fractured, "hardware": flags["hardware"]}
    if boxes is not None:
        extras.update(_localization(boxes.get(image_id), fractured))
    return Record(
        path=str(file),
        body_part=body_part,
        abnormal=int(bool(fractured or flags["hardware"])),
        study_id=f"fracatlas-exam{group:05d}",
        patient_id=f"fracatlas-exam{group:05d}",
        split="none",
        source="fracatlas",
        extras=extras,
    )


def read_fracatlas(path: str | Path) -> RecordSet:
    root = find_fracatlas_root(Path(path))
    if root is None:
        raise DatasetError(f"{path}: not a FracAtlas folder (needs dataset.csv and images/)")
    csv_path, rows = _read_dataset_csv(root)
    on_disk = _images_on_disk(root)

    records: list[Record] = []
    problems: list[str] = []
    boxes = read_fracatlas_boxes(root, problems)
    listed: dict[str, tuple[int, dict[str, int]]] = {}  # image id -> (line, flags) of its first row
    group = 0
    prev_key: tuple | None = None
    for line_no, row in enumerate(rows, start=2):
        image_id = row["image_id"].strip()
        flags = _row_flags(row, image_id, f"{csv_path.name} line {line_no}", problems)
        if flags is None or _is_repeat(image_id, flags, line_no, listed, csv_path, problems):
            continue
        listed[image_id] = (line_no, flags)
        # Runs break only where the body-part flags change: an id gap may be an image left out of
        # this subset, and merging two examinations into one group is safe while splitting one leaks.
        key = tuple(flags[c] for c in EXAM_GROUP_FLAGS)
        if key != prev_key:
            group += 1
            prev_key = key
        if image_id not in on_disk:
            problems.append(f"listed but missing: {root / 'images' / '*' / image_id}")
            continue
        records.append(_fracatlas_record(image_id, flags, on_disk[image_id], group, boxes, problems))
    for name, (p, _) in sorted(on_disk.items()):
        if name not in listed:
            problems.append(f"present but not listed in dataset.csv: {p}")
    if not records:
        raise DatasetError(f"{root}: FracAtlas folder has no images")
    return RecordSet(records, "fracatlas", str(root), problems)
