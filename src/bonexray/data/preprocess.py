"""Decode once, letterbox to a square, and keep every pixel in one memory-mapped uint8 file.

The cache is what training and evaluation read: decoding a 2000 px JPEG or DICOM costs far more than
a training step on a 224 px image, so it happens once per dataset and size.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_write_text
from ..errors import BonexrayError, DatasetError
from .imageio import read_image, read_image_bytes, to_uint8
from .records import RECORD_COLUMNS, Record, RecordSet

#: Bump when decoding/resizing changes, so old caches are rebuilt instead of silently reused.
PREPROCESS_VERSION = 1
STATUSES = ("ok", "truncated", "unreadable")


def letterbox(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize so the long side is ``size`` (aspect kept) and pad with black to ``size x size``."""
    if gray.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D grayscale array, got shape {gray.shape}")
    img = Image.fromarray(to_uint8(gray))
    h, w = gray.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        # reducing_gap: fast box pre-shrink, then an antialiased bilinear pass; quality ~ LANCZOS.
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.asarray(img)
    return out


def letterbox_boxes(boxes_xywh, image_wh: tuple[int, int], size: int) -> np.ndarray:
    """Map boxes [x, y, w, h] in the pixels of a (w, h) image to [x0, y0, x1, y1] in its ``letterbox`` tile."""
    w, h = image_wh
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    sx, sy = nw / w, nh / h
    out = np.stack([left + b[:, 0] * sx, top + b[:, 1] * sy, left + (b[:, 0] + b[:, 2]) * sx, top + (b[:, 1] + b[:, 3]) * sy], 1)
    return np.clip(out, 0, size).astype(np.float32)


def load_for_model(path: str | os.PathLike, size: int) -> tuple[np.ndarray, bool]:
    """The single decode path used by the cache, predict and serve: (uint8 size x size, truncated)."""
    decoded = read_image(path, draft_size=size)
    return letterbox(decoded.pixels, size), decoded.truncated


def load_bytes_for_model(data: bytes, name: str, size: int, max_pixels: int = 120_000_000) -> tuple[np.ndarray, bool]:
    """:func:`load_for_model` for a file held in memory (serve's uploads); ``name`` labels errors."""
    decoded = read_image_bytes(data, name, draft_size=size, max_pixels=max_pixels)
    return letterbox(decoded.pixels, size), decoded.truncated


def _decode_one(args: tuple[str, int]) -> tuple[np.ndarray | None, str, str]:
    path, size = args
    try:
        arr, truncated = load_for_model(path, size)
        return arr, ("truncated" if truncated else "ok"), ("data ends early; decoded what was there" if truncated else "")
    except BonexrayError as e:
        return None, "unreadable", getattr(e, "reason", str(e))
    except Exception as e:  # noqa: BLE001 - a worker must report, never kill the whole run
        return None, "unreadable", f"{type(e).__name__}: {e}"


def fingerprint(records: Iterable[Record], size: int) -> str:
    """Identity of the inputs: paths, labels, file sizes and mtimes, the size, the decoder version.

    Splits are not part of it: they are assigned later (per run, per seed) and do not change pixels.
    """
    h = hashlib.sha256(f"v{PREPROCESS_VERSION}|{size}".encode())
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{r.path}|{r.body_part}|{r.abnormal}|{r.study_id}|{r.patient_id}|{stamp}\n".encode())
    return h.hexdigest()[:32]


@dataclass
class ImageCache:
    """A finished cache: ``images`` (N, S, S) uint8 memmap and ``index`` (one row per image)."""

    root: Path
    images: np.ndarray
    index: pd.DataFrame
    size: int
    meta: dict

    @classmethod
    def open(cls, root: str | Path) -> "ImageCache":
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"{root}: not a finished bonexray cache (no meta.json); run `bonexray preprocess`")
        meta = json.loads(meta_path.read_text())
        if not meta.get("complete"):
            raise DatasetError(f"{root}: cache is incomplete; run `bonexray preprocess` again")
        n, size = int(meta["n"]), int(meta["size"])
        index = pd.read_csv(root / "index.csv", dtype={"study_id": str, "patient_id": str, "reason": str}, keep_default_na=False)
        images = np.memmap(root / "images.u8", dtype=np.uint8, mode="r", shape=(n, size, size)) if n else np.zeros((0, size, size), np.uint8)
        return cls(root, images, index, size, meta)

    def summary(self) -> dict:
        idx = self.index
        return {
            "images": len(idx),
            "size": self.size,
            "by_status": dict(Counter(idx["status"])),
            "by_body_part": dict(sorted(Counter(idx["body_part"]).items())),
            "by_label": {str(k): v for k, v in sorted(Counter(idx["abnormal"]).items())},
        }


def cache_is_current(out: Path, fp: str) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete")) and meta.get("fingerprint") == fp


def build_cache(
    recordset: RecordSet,
    out: str | Path,
    size: int = 320,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> tuple[ImageCache, bool]:
    """Build (or reuse) the cache of ``recordset`` at ``size``. Returns (cache, reused)."""
    if size < 16:
        raise DatasetError(f"--size {size} is too small (minimum 16)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = recordset.records
    fp = fingerprint(records, size)
    if not force and cache_is_current(out, fp):
        return ImageCache.open(out), True

    # Invalidate first: a crash from here on must not leave an old meta.json pointing at new data.
    (out / "meta.json").unlink(missing_ok=True)
    n = len(records)
    tmp_images = out / ".images.u8.partial"
    mm = np.memmap(tmp_images, dtype=np.uint8, mode="w+", shape=(max(n, 1), size, size))
    statuses, reasons = [""] * n, [""] * n
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(r.path, size) for r in records]
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=f"preprocess {size}px", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1:
            results = map(_decode_one, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_decode_one, jobs, chunksize=16)
        for i, (arr, status, reason) in enumerate(results):
            if arr is not None:
                mm[i] = arr
            statuses[i], reasons[i] = status, reason
            bar.update(1)
        if pool:
            pool.shutdown()
    finally:
        bar.close()
    mm.flush()
    del mm

    rows = []
    for i, (r, st, why) in enumerate(zip(records, statuses, reasons)):
        row = {"row": i, **r.as_row(), "status": st, "reason": why}
        rows.append(row)
    index = pd.DataFrame(rows, columns=["row", *RECORD_COLUMNS, "status", "reason"])
    tmp_index = out / ".index.csv.partial"
    index.to_csv(tmp_index, index=False)
    os.replace(tmp_images, out / "images.u8")
    os.replace(tmp_index, out / "index.csv")
    (out / "problems.txt").write_text("".join(p + "\n" for p in recordset.problems))
    meta = {
        "complete": True,
        "n": n,
        "size": size,
        "fingerprint": fp,
        "source": recordset.source,
        "data": recordset.root,
        "bonexray_version": __version__,
        "preprocess_version": PREPROCESS_VERSION,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))  # written last: marks completion
    return ImageCache.open(out), False


def default_cache_dir(data_root: str, size: int) -> Path:
    """Per-user cache location keyed by the dataset path and image size."""
    base = os.environ.get("BONEXRAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bonexray"
    )
    key = hashlib.sha256(str(Path(data_root).resolve()).encode()).hexdigest()[:12]
    return Path(base) / "preprocessed" / f"{Path(data_root).name}-{key}-{size}px"
