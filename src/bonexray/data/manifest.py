"""Reader for a plain manifest CSV: the way to bring any other dataset.

Required columns: ``path, body_part, abnormal``; optional: ``study_id, patient_id, split``.
Comma-separated; a ``;``- or tab-separated file is refused with that hint.
The label (``abnormal``, case-insensitive) is one of ``1, 1.0, true, yes, abnormal, positive`` or
``0, 0.0, false, no, normal, negative`` (:func:`parse_label`); any other value (``2``, ``-1``,
``0.5``, ``nan``, ``unknown``, blank) drops the row, and so does a listed file that does not exist:
each dropped row is kept in ``RecordSet.dropped`` with its reason (and in ``problems``).
Relative paths are resolved against the CSV's folder; paths outside it are accepted with a note. Missing study ids default to one study per
image, missing patient ids to the study id. The CSV must be UTF-8. A path listed twice is merged
into one record when both rows say the same (reported as a problem); rows that disagree (label,
body part, study, patient or split) are an error naming the path and both lines, since one image
would otherwise count twice or sit in two splits.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import DatasetError
from .records import SPLITS, Record, RecordSet

REQUIRED = ("path", "body_part", "abnormal")
#: The accepted spellings of the label, compared lower-case.
ABNORMAL_SPELLINGS = ("1", "1.0", "true", "yes", "abnormal", "positive")
NORMAL_SPELLINGS = ("0", "0.0", "false", "no", "normal", "negative")


def parse_label(text: str | None) -> tuple[int | None, str]:
    """(1 or 0, "") for an accepted spelling of the label, else (None, the reason the row is dropped)."""
    value = (text or "").strip().lower()
    if value in ABNORMAL_SPELLINGS:
        return 1, ""
    if value in NORMAL_SPELLINGS:
        return 0, ""
    if not value:
        return None, "no label (abnormal is blank)"
    return None, (f"label abnormal={text.strip()!r} is none of {'/'.join(NORMAL_SPELLINGS)} (normal) or "
                  f"{'/'.join(ABNORMAL_SPELLINGS)} (abnormal)")


def _delimiter_hint(header: list[str]) -> str:
    """A hint when the one column read holds the required names split by another delimiter."""
    joined = ",".join(header)
    for name, sep in (("semicolon", ";"), ("tab", "\t")):
        if sep in joined and all(c in [p.strip() for p in joined.split(sep)] for c in REQUIRED):
            return f"; the header is {name}-separated ({sep!r}): save the manifest with commas between columns"
    return ""


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The manifest's rows (names and values stripped), after checking that it has the required columns."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in cols]
            if missing:
                raise DatasetError(
                    f"{csv_path}: manifest needs columns {', '.join(REQUIRED)} (missing: {', '.join(missing)})"
                    + _delimiter_hint(cols)
                )
            return [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except UnicodeDecodeError as err:
        raise DatasetError(f"{csv_path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                           "save the manifest as UTF-8") from err
    except csv.Error as err:
        raise DatasetError(f"{csv_path}: not a readable CSV ({err})") from err


def _row_split(row: dict[str, str], where: str, problems: list[str]) -> str:
    """The row's split, ``val``/``validation`` read as ``valid``; an unknown one is noted and becomes ``none``."""
    split = (row.get("split") or "none").lower()
    if split in ("val", "validation"):
        split = "valid"
    if split not in SPLITS:
        problems.append(f"{where}: unknown split {split!r}; using 'none'")
        split = "none"
    return split


def _row_record(row: dict[str, str], file: Path, label: int, line_no: int, where: str, problems: list[str]) -> Record:
    """The record of one kept row; missing study ids default to one study per image, patient ids to the study."""
    split = _row_split(row, where, problems)
    study = row.get("study_id") or f"image{line_no - 1:06d}"
    return Record(
        path=str(file),
        body_part=row["body_part"].lower() or "unknown",
        abnormal=label,
        study_id=study,
        patient_id=row.get("patient_id") or study,
        split=split,
        source="manifest",
    )


def _is_repeat(key: str, record: Record, row: dict[str, str], line_no: int,
               first_line: dict[str, tuple[int, Record]], csv_path: Path, problems: list[str]) -> bool:
    """Whether the file was listed on an earlier line (then merged, the problem noted); raises when the two rows
    disagree, since one image would otherwise count twice or sit in two splits."""
    if key not in first_line:
        return False
    earlier_line, earlier = first_line[key]
    fields = ["abnormal", "body_part", "split"] + [c for c in ("study_id", "patient_id") if row.get(c)]
    differ = [c for c in fields if getattr(record, c) != getattr(earlier, c)]
    if differ:
        raise DatasetError(
            f"{csv_path}: {row['path']} is listed on lines {earlier_line} and {line_no} with different "
            + ", ".join(f"{c} ({getattr(earlier, c)!r} vs {getattr(record, c)!r})" for c in differ)
            + "; list each image once"
        )
    problems.append(f"{csv_path.name} line {line_no}: {row['path']} repeats line {earlier_line}; merged")
    return True


def read_manifest(path: str | Path) -> RecordSet:
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: manifest CSV not found")
    rows = _read_rows(csv_path)
    base = csv_path.resolve().parent
    records: list[Record] = []
    problems: list[str] = []
    dropped: list[tuple[str, str]] = []
    first_line: dict[str, tuple[int, Record]] = {}  # resolved path -> (line, record)
    outside: list[str] = []
    for line_no, row in enumerate(rows, start=2):
        where = f"{csv_path.name} line {line_no}"
        file = Path(row["path"])
        if not file.is_absolute():
            file = base / file
        label, why = parse_label(row["abnormal"])
        if label is None:
            dropped.append((str(file), f"{where}: {why}"))
            problems.append(f"{where}: {why}; row skipped")
            continue
        if not file.is_file():
            dropped.append((str(file), f"{where}: listed but missing"))
            problems.append(f"listed but missing: {file}")
            continue
        record = _row_record(row, file, label, line_no, where, problems)
        key = os.path.realpath(file)
        if _is_repeat(key, record, row, line_no, first_line, csv_path, problems):
            continue
        first_line[key] = (line_no, record)
        records.append(record)
        if not Path(os.path.normpath(file)).is_relative_to(base):
            outside.append(row["path"])
    if outside:  # allowed (shared image stores), but said: a stray "../" would otherwise go unnoticed
        problems.append(f"{csv_path.name}: {len(outside)} path(s) lie outside the manifest's folder {base} "
                        f"(first: {outside[0]})")
    if not records:
        raise DatasetError(f"{csv_path}: manifest lists no existing images" + (f" ({problems[0]})" if problems else ""))
    return RecordSet(records, "manifest", str(csv_path), problems, dropped)
