"""Reader for Stanford's MURA-v1.1 exactly as released.

Layout: ``MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyN_{positive,negative}/imageN.png`` with
``{train,valid}_image_paths.csv`` (one path per line, no header) and ``{train,valid}_labeled_studies.csv``
(``study_dir/,label``, no header). CSV paths start with ``MURA-v1.1/``; the folder may live anywhere,
so paths are re-rooted on the folder we were given.
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


def is_mura_root(root: Path) -> bool:
    return (root / "train_image_paths.csv").is_file() or (root / "valid_image_paths.csv").is_file()


def find_mura_root(path: Path) -> Path | None:
    """Accept the MURA-v1.1 folder itself or a folder that contains it."""
    for cand in (path, path / "MURA-v1.1"):
        if cand.is_dir() and is_mura_root(cand):
            return cand
    return None


def _rel(csv_path: str) -> str:
    """Strip the leading ``MURA-v1.1/`` (or whatever the release folder was called) from a CSV path."""
    parts = csv_path.strip().replace("\\", "/").split("/")
    for i, p in enumerate(parts):
        if p in ("train", "valid"):
            return "/".join(parts[i:])
    raise DatasetError(f"unexpected MURA path {csv_path!r}: no train/ or valid/ component")


def _read_csv_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="") as f:
            return [row for row in csv.reader(f) if row and row[0].strip()]
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from e


def read_mura(path: str | Path) -> RecordSet:
    root = find_mura_root(Path(path))
    if root is None:
        raise DatasetError(f"{path}: not a MURA-v1.1 folder (no train_image_paths.csv / valid_image_paths.csv)")
    records: list[Record] = []
    problems: list[str] = []
    for split in ("train", "valid"):
        img_csv, lab_csv = root / f"{split}_image_paths.csv", root / f"{split}_labeled_studies.csv"
        if not img_csv.is_file():
            problems.append(f"{img_csv.name} missing: no {split} images")
            continue
        labels: dict[str, int] = {}
        if lab_csv.is_file():
            for row in _read_csv_rows(lab_csv):
                if len(row) < 2 or row[1].strip() not in ("0", "1"):
                    problems.append(f"{lab_csv.name}: bad row {row!r}")
                    continue
                labels[_rel(row[0]).rstrip("/")] = int(row[1])
        else:
            problems.append(f"{lab_csv.name} missing: labels taken from study folder names")
        listed: set[str] = set()
        for row in _read_csv_rows(img_csv):
            rel = _rel(row[0])
            listed.add(rel)
            study_dir = rel.rsplit("/", 1)[0]
            m = _STUDY_RE.match(study_dir)
            if not m:
                problems.append(f"{img_csv.name}: path does not follow MURA's layout: {row[0]}")
                continue
            _, part, patient, study, pos = m.groups()
            file = root / rel
            if not file.is_file():
                problems.append(f"listed but missing: {file}")
                continue
            label = labels.get(study_dir)
            if label is None:
                label = int(pos == "positive")
                if lab_csv.is_file():
                    problems.append(f"study not in {lab_csv.name}, label from folder name: {study_dir}")
            records.append(
                Record(
                    path=str(file),
                    body_part=part.lower(),
                    abnormal=label,
                    study_id=f"{split}/{part.lower()}/{patient}/{study}",
                    patient_id=patient,
                    split=split,
                    source="mura",
                    extras={"study_dir": study_dir},
                )
            )
        # Present on disk but not listed: report (they are not used, as in the official protocol).
        split_dir = root / split
        if split_dir.is_dir():
            for f in sorted(split_dir.rglob("*")):
                if f.is_file() and is_image_file(f) and not f.name.startswith("._"):
                    rel = f.relative_to(root).as_posix()
                    if rel not in listed:
                        problems.append(f"present but not listed in {img_csv.name}: {f}")
    if not records:
        raise DatasetError(f"{root}: MURA folder has no readable image entries" + (f" ({problems[0]})" if problems else ""))
    return RecordSet(records, "mura", str(root), problems)
