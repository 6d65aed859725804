"""Reader for Stanford's MURA-v1.1 exactly as released.

Layout: ``MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyN_{positive,negative}/imageN.png`` with
``{train,valid}_image_paths.csv`` (one path per line, no header) and ``{train,valid}_labeled_studies.csv``
(``study_dir/,label``, no header). CSV paths start with ``MURA-v1.1/``; the folder may live anywhere,
so paths are re-rooted on the folder we were given.

Every anomaly (a malformed row, with its CSV and line; a missing or unreadable CSV; listed but
missing files; unlisted files) is collected in ``RecordSet.problems``, never raised. Without
``<split>_image_paths.csv`` the split folder is scanned; without ``<split>_labeled_studies.csv`` the
label comes from the ``studyN_positive|negative`` folder name (shared copies of MURA often lack the CSVs).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from ..errors import DatasetError
from .imageio import is_image_file
from .records import Record, RecordSet

MURA_BODY_PARTS = ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")
_STUDY_RE = re.compile(r"^(?:.*/)?(train|valid)/XR_([A-Z]+)/(patient\d+)/(study\d+)_(positive|negative)/?$")


def _has_study_folders(split_dir: Path) -> bool:
    return split_dir.is_dir() and any(d.is_dir() and d.name.startswith("XR_") for d in split_dir.iterdir())


def is_mura_root(root: Path) -> bool:
    """MURA's CSVs, or (shared copies often lack them) ``train/`` or ``valid/`` holding ``XR_<PART>`` folders."""
    if (root / "train_image_paths.csv").is_file() or (root / "valid_image_paths.csv").is_file():
        return True
    return _has_study_folders(root / "train") or _has_study_folders(root / "valid")


def find_mura_root(path: Path) -> Path | None:
    """Accept the MURA-v1.1 folder itself or a folder that contains it."""
    for cand in (path, path / "MURA-v1.1"):
        if cand.is_dir() and is_mura_root(cand):
            return cand
    return None


def _rel(csv_path: str) -> str | None:
    """Strip the leading ``MURA-v1.1/`` (or whatever the release folder was called); None if no split part."""
    parts = csv_path.strip().replace("\\", "/").split("/")
    for i, p in enumerate(parts):
        if p in ("train", "valid"):
            return "/".join(parts[i:])
    return None


def _read_csv_rows(path: Path, problems: list[str]) -> list[tuple[int, list[str]]] | None:
    """(line number, row) for every non-empty row; None (and a problem) when the file cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader if row and row[0].strip()]
    except UnicodeDecodeError as e:
        problems.append(f"{path.name}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); file ignored")
    except csv.Error as e:
        problems.append(f"{path.name}: not a readable CSV ({e}); file ignored")
    except OSError as e:
        problems.append(f"{path.name}: cannot read ({e.strerror or e}); file ignored")
    return None


def _scan_split(root: Path, split: str) -> list[tuple[str, str]]:
    """(where, relative path) of every image under ``root/split`` when its image list is missing."""
    return [(f"{split}/ (no image list)", f.relative_to(root).as_posix())
            for f in sorted((root / split).rglob("*")) if f.is_file() and is_image_file(f)]


def _study_labels(lab_csv: Path, img_csv: Path, split_dir: Path, split: str,
                  problems: list[str]) -> dict[str, int] | None:
    """Study folder -> label from ``<split>_labeled_studies.csv``; None when that file is missing or unreadable
    (labels then come from the study folder names)."""
    lab_rows = _read_csv_rows(lab_csv, problems) if lab_csv.is_file() else None
    if not lab_csv.is_file() and (img_csv.is_file() or split_dir.is_dir()):
        problems.append(f"{lab_csv.name} missing: {split} labels taken from the study folder names")
    labels: dict[str, int] = {}
    for line, row in lab_rows or []:
        rel = _rel(row[0])
        if len(row) < 2 or row[1].strip() not in ("0", "1") or rel is None:
            problems.append(f"{lab_csv.name} line {line}: malformed row {row!r} (want study_dir/,0|1); row skipped")
            continue
        labels[rel.rstrip("/")] = int(row[1])
    return labels if lab_rows is not None else None


def _split_entries(root: Path, split: str, img_csv: Path, img_rows: list[tuple[int, list[str]]] | None,
                   problems: list[str]) -> list[tuple[str, str]] | None:
    """(where, listed path) of the split's images: from its image list, else by scanning its folder; None when
    there is neither."""
    if img_rows is not None:
        return [(f"{img_csv.name} line {line}", row[0]) for line, row in img_rows]
    if (root / split).is_dir():
        if not img_csv.is_file():
            problems.append(f"{img_csv.name} missing: {split} images found by scanning {split}/")
        return _scan_split(root, split)
    if not img_csv.is_file():
        problems.append(f"{img_csv.name} and {split}/ missing: no {split} images")
    return None


def _entry_record(root: Path, split: str, where: str, raw: str, listed: set[str], labels: dict[str, int] | None,
                  lab_csv_name: str, problems: list[str]) -> Record | None:
    """The record of one listed image (added to ``listed``); None (the problem noted) when it is skipped."""
    rel = _rel(raw)
    study_dir = rel.rsplit("/", 1)[0] if rel else ""
    m = _STUDY_RE.match(study_dir)
    if rel is None or not m:
        problems.append(f"{where}: path does not follow MURA's layout "
                        f"({split}/XR_<PART>/patientN/studyN_positive|negative/image): {raw!r}; skipped")
        return None
    if rel in listed:
        problems.append(f"{where}: {rel} listed again; skipped")
        return None
    listed.add(rel)
    _, part, patient, study, pos = m.groups()
    file = root / rel
    if not file.is_file():
        problems.append(f"listed but missing: {file}")
        return None
    label = (labels or {}).get(study_dir)
    if label is None:
        label = int(pos == "positive")
        if labels is not None:
            problems.append(f"study not in {lab_csv_name}, label from folder name: {study_dir}")
    return Record(
        path=str(file),
        body_part=part.lower(),
        abnormal=label,
        study_id=f"{split}/{part.lower()}/{patient}/{study}",
        patient_id=patient,
        split=split,
        source="mura",
        extras={"study_dir": study_dir},
    )


def _report_unlisted(root: Path, split_dir: Path, listed: set[str], img_csv_name: str, problems: list[str]) -> None:
    """Note the images present on disk but not listed (they are not used, as in the official protocol)."""
    for f in sorted(split_dir.rglob("*")):
        if f.is_file() and is_image_file(f) and not f.name.startswith("._"):
            rel = f.relative_to(root).as_posix()
            if rel not in listed:
                problems.append(f"present but not listed in {img_csv_name}: {f}")


def read_mura(path: str | Path) -> RecordSet:
    root = find_mura_root(Path(path))
    if root is None:
        raise DatasetError(f"{path}: not a MURA-v1.1 folder (no train_image_paths.csv / valid_image_paths.csv, "
                           "no train/XR_*/ or valid/XR_*/ folders)")
    records: list[Record] = []
    problems: list[str] = []
    for split in ("train", "valid"):
        img_csv, lab_csv = root / f"{split}_image_paths.csv", root / f"{split}_labeled_studies.csv"
        split_dir = root / split
        labels = _study_labels(lab_csv, img_csv, split_dir, split, problems)
        img_rows = _read_csv_rows(img_csv, problems) if img_csv.is_file() else None
        entries = _split_entries(root, split, img_csv, img_rows, problems)
        if entries is None:
            continue
        listed: set[str] = set()
        for where, raw in entries:
            record = _entry_record(root, split, where, raw, listed, labels, lab_csv.name, problems)
            if record is not None:
                records.append(record)
        if img_rows is not None and split_dir.is_dir():
            _report_unlisted(root, split_dir, listed, img_csv.name, problems)
    if not records:
        raise DatasetError(f"{root}: MURA folder has no readable image entries" + (f" ({problems[0]})" if problems else ""))
    return RecordSet(records, "mura", str(root), problems)
