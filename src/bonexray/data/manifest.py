"""Reader for a plain manifest CSV: the way to bring any other dataset.

Required columns: ``path, body_part, abnormal``; optional: ``study_id, patient_id, split``.
Relative paths are resolved against the CSV's folder. Missing study ids default to one study per
image, missing patient ids to the study id.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import DatasetError
from .records import SPLITS, Record, RecordSet

REQUIRED = ("path", "body_part", "abnormal")
_TRUE = {"1", "true", "yes", "abnormal", "positive"}
_FALSE = {"0", "false", "no", "normal", "negative"}


def read_manifest(path: str | Path) -> RecordSet:
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: manifest CSV not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise DatasetError(
                f"{csv_path}: manifest needs columns {', '.join(REQUIRED)} (missing: {', '.join(missing)})"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    base = csv_path.resolve().parent
    records: list[Record] = []
    problems: list[str] = []
    for line_no, row in enumerate(rows, start=2):
        label_text = row["abnormal"].lower()
        if label_text in _TRUE:
            label = 1
        elif label_text in _FALSE:
            label = 0
        elif label_text in ("", "-1", "unknown"):
            label = -1
        else:
            problems.append(f"{csv_path.name} line {line_no}: abnormal={row['abnormal']!r} is not 0/1; row skipped")
            continue
        file = Path(row["path"])
        if not file.is_absolute():
            file = base / file
        if not file.is_file():
            problems.append(f"listed but missing: {file}")
            continue
        split = (row.get("split") or "none").lower()
        if split in ("val", "validation"):
            split = "valid"
        if split not in SPLITS:
            problems.append(f"{csv_path.name} line {line_no}: unknown split {split!r}; using 'none'")
            split = "none"
        study = row.get("study_id") or f"image{line_no - 1:06d}"
        records.append(
            Record(
                path=str(file),
                body_part=row["body_part"].lower() or "unknown",
                abnormal=label,
                study_id=study,
                patient_id=row.get("patient_id") or study,
                split=split,
                source="manifest",
            )
        )
    if not records:
        raise DatasetError(f"{csv_path}: manifest lists no existing images" + (f" ({problems[0]})" if problems else ""))
    return RecordSet(records, "manifest", str(csv_path), problems)
