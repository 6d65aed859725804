"""Output of ``bonexray predict``: strict JSON lines, or one CSV table with a ``type`` column."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import Any, TextIO

from ..errors import BonexrayError


#: A spreadsheet reads a cell starting with one of these as a formula (CSV injection; OWASP).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (a file named ``=HYPERLINK(...).png``) gets a
    leading ``'``, which spreadsheets show as text; numbers and other text pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class Writer:
    """JSON lines or one CSV table (with a ``type`` column) on ``stream``, flushed per batch."""

    def __init__(self, fmt: str, body_parts: Sequence[str], stream: TextIO, with_cam: bool = False) -> None:
        if fmt not in ("json", "csv"):
            raise BonexrayError(f"unknown output format {fmt!r} (json or csv)")
        self.fmt = fmt
        self.stream = stream
        self.columns = ["type", "path", "study", "n_images", "prob_abnormal", "abnormal", "body_part",
                        *[f"prob_{b}" for b in body_parts], "truncated", "boxes", "confidence", "in_scope", "scope_reason",
                        "n_out_of_scope", "finding", "n_assessed", "n_positive", "n_suspicious", "n_negative", "body_parts",
                        "mixed_body_parts"] + (["cam"] if with_cam else [])
        self._csv = None
        if fmt == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
            self._csv.writeheader()

    def write(self, rec: dict[str, Any]) -> None:
        if self._csv is None:
            self.stream.write(json.dumps(rec, allow_nan=False) + "\n")  # strict JSON: never a bare NaN
        else:
            self._csv.writerow({k: _csv_value(v) for k, v in rec.items()})

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass


def _csv_value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, list):  # boxes, body_parts: one JSON cell, e.g. [{"x0": 12.0, ..., "score": 0.81}]
        return json.dumps(v, allow_nan=False)
    return "" if v is None else csv_safe(v)
