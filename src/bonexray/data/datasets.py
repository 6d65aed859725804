"""``load_dataset(path)``: one entry point that recognises every supported source."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .fracatlas import find_fracatlas_root, read_fracatlas
from .manifest import read_manifest
from .mura import find_mura_root, read_mura
from .records import RecordSet

SOURCES = ("mura", "fracatlas", "manifest")


def detect_source(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "manifest"
        raise DatasetError(f"{p}: a dataset is a folder (MURA-v1.1, FracAtlas) or a manifest .csv")
    if find_mura_root(p):
        return "mura"
    if find_fracatlas_root(p):
        return "fracatlas"
    raise DatasetError(
        f"{p}: unknown dataset layout. Expected MURA-v1.1 (train_image_paths.csv ...), "
        "FracAtlas (dataset.csv + images/), or a manifest CSV with columns path,body_part,abnormal"
    )


def load_dataset(path: str | Path, source: str | None = None) -> RecordSet:
    source = source or detect_source(path)
    readers = {"mura": read_mura, "fracatlas": read_fracatlas, "manifest": read_manifest}
    if source not in readers:
        raise DatasetError(f"unknown dataset source {source!r}; choose from {', '.join(SOURCES)}")
    return readers[source](path)
