"""The one record model every dataset reader produces (torchxrayvision-style: one interface, many sources)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

SPLITS = ("train", "valid", "test", "none")

#: Columns of the record table, in order (also the leading columns of a cache's index.csv).
RECORD_COLUMNS = ("path", "body_part", "abnormal", "study_id", "patient_id", "split", "source")


@dataclass
class Record:
    """One image. ``abnormal`` is 0/1 (-1 = unknown, e.g. unlabelled inference data)."""

    path: str
    body_part: str
    abnormal: int
    study_id: str
    patient_id: str
    split: str = "none"
    source: str = ""
    extras: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        return {c: getattr(self, c) for c in RECORD_COLUMNS}


@dataclass
class RecordSet:
    """Records of one dataset plus the problems met while reading it (reported, never dropped silently)."""

    records: list[Record]
    source: str
    root: str
    problems: list[str] = field(default_factory=list)
    #: Rows of the dataset's list left out while reading it, as (file, reason): evaluate names and counts them.
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def body_parts(self) -> list[str]:
        """Sorted class list of the body-part head for this dataset."""
        return sorted({r.body_part for r in self.records})

    def subset(self, splits: Iterable[str]) -> "RecordSet":
        keep = set(splits)
        return RecordSet([r for r in self.records if r.split in keep], self.source, self.root, list(self.problems))

    def summary(self) -> dict:
        return {
            "images": len(self.records),
            "studies": len({r.study_id for r in self.records}),
            "patients": len({r.patient_id for r in self.records}),
            "by_split": dict(sorted(Counter(r.split for r in self.records).items())),
            "by_body_part": dict(sorted(Counter(r.body_part for r in self.records).items())),
            "by_label": dict(sorted(Counter(r.abnormal for r in self.records).items())),
        }
