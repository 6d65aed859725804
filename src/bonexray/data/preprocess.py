"""Decode once, letterbox to a square, and keep every pixel in one memory-mapped uint8 file.

The cache is what training and evaluation read: decoding a 2000 px JPEG or DICOM costs far more than
a training step on a 224 px image, so it happens once per dataset and size.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image

from .._version import __version__
from ..atomic import atomic_write_text
from ..errors import BonexrayError, BonexrayWarning, DatasetError, ImageReadError, MissingDecoderError, NotAnImageError
from .imageio import DecodedImage, read_image, read_image_bytes, to_uint8
from .records import RECORD_COLUMNS, Record, RecordSet

if TYPE_CHECKING:  # pandas and tqdm load where a cache is opened or built, not for one image
    import pandas as pd

#: Bump when decoding/resizing changes, so old caches are rebuilt instead of silently reused.
PREPROCESS_VERSION = 2
#: "skipped": a readable file that is no image (a DICOM SR, DICOMDIR, PDF); "unreadable": a damaged image.
STATUSES = ("ok", "truncated", "unreadable", "skipped")


@dataclass(frozen=True)
class Letterbox:
    """Where a ``width`` x ``height`` image lands in its ``size`` x ``size`` letterbox tile (aspect kept,
    centred, black padding), and the way back: boxes the model finds in the tile are reported in the
    original image's pixels. ``full_size``: the full-resolution (width, height) when the pixels
    letterboxed were a reduced decode (JPEG draft); None: the same as width x height."""

    size: int
    width: int
    height: int
    full_size: tuple[int, int] | None = None

    @property
    def content(self) -> tuple[int, int, int, int]:
        """(left, top, new_w, new_h): the image's rectangle inside the tile."""
        scale = self.size / max(self.height, self.width)
        nh, nw = max(1, round(self.height * scale)), max(1, round(self.width * scale))
        return (self.size - nw) // 2, (self.size - nh) // 2, nw, nh

    @property
    def original_size(self) -> tuple[int, int]:
        return self.full_size if self.full_size is not None else (self.width, self.height)

    def to_tile(self, boxes_xyxy) -> np.ndarray:
        """Boxes [x0, y0, x1, y1] in the original image's pixels -> tile pixels (clipped to the tile)."""
        left, top, nw, nh = self.content
        ow, oh = self.original_size
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        out = np.stack([left + b[:, 0] * nw / ow, top + b[:, 1] * nh / oh, left + b[:, 2] * nw / ow, top + b[:, 3] * nh / oh], 1)
        return np.clip(out, 0, self.size).astype(np.float32)

    def to_original(self, boxes_xyxy) -> np.ndarray:
        """Boxes [x0, y0, x1, y1] in tile pixels -> the original image's pixels (clipped to the image)."""
        left, top, nw, nh = self.content
        ow, oh = self.original_size
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        x = (b[:, [0, 2]] - left) * ow / nw
        y = (b[:, [1, 3]] - top) * oh / nh
        return np.stack([np.clip(x[:, 0], 0, ow), np.clip(y[:, 0], 0, oh), np.clip(x[:, 1], 0, ow), np.clip(y[:, 1], 0, oh)], 1)


@dataclass
class ModelInput:
    """One decoded image ready for the network: the uint8 tile, whether the file was truncated, and
    the letterbox geometry that maps tile coordinates back to the original image."""

    tile: np.ndarray
    truncated: bool
    geometry: Letterbox
    #: The decoded image the tile was made from (front ends that draw on it: pacs' secondary captures).
    decoded: DecodedImage | None = None


def letterbox(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize so the long side is ``size`` (aspect kept) and pad with black to ``size x size``."""
    if gray.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D grayscale array, got shape {gray.shape}")
    img = Image.fromarray(to_uint8(gray))
    h, w = gray.shape
    left, top, nw, nh = Letterbox(size, w, h).content
    if (nh, nw) != (h, w):
        # reducing_gap: fast box pre-shrink, then an antialiased bilinear pass; quality ~ LANCZOS.
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + nh, left : left + nw] = np.asarray(img)
    return out


def letterbox_boxes(boxes_xywh, image_wh: tuple[int, int], size: int) -> np.ndarray:
    """Map boxes [x, y, w, h] in the pixels of a (w, h) image to [x0, y0, x1, y1] in its ``letterbox`` tile."""
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return Letterbox(size, int(image_wh[0]), int(image_wh[1])).to_tile(np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1))


def _model_input(decoded, size: int) -> ModelInput:
    h, w = decoded.pixels.shape[:2]
    return ModelInput(letterbox(decoded.pixels, size), decoded.truncated, Letterbox(size, int(w), int(h), decoded.original_size),
                      decoded)


def read_for_model(path: str | os.PathLike, size: int) -> ModelInput:
    """The single decode path used by the cache, predict and serve, with the letterbox geometry."""
    return _model_input(read_image(path, draft_size=size), size)


def read_bytes_for_model(data: bytes, name: str, size: int, max_pixels: int = 120_000_000) -> ModelInput:
    """:func:`read_for_model` for a file held in memory (serve's uploads); ``name`` labels errors."""
    return _model_input(read_image_bytes(data, name, draft_size=size, max_pixels=max_pixels), size)


def load_for_model(path: str | os.PathLike, size: int) -> tuple[np.ndarray, bool]:
    """:func:`read_for_model` without the geometry: (uint8 size x size, truncated)."""
    m = read_for_model(path, size)
    return m.tile, m.truncated


def load_bytes_for_model(data: bytes, name: str, size: int, max_pixels: int = 120_000_000) -> tuple[np.ndarray, bool]:
    """:func:`read_bytes_for_model` without the geometry."""
    m = read_bytes_for_model(data, name, size, max_pixels)
    return m.tile, m.truncated


def _decode_one(args: tuple[str, int]) -> tuple[np.ndarray | None, str, str]:
    """Worker: (pixels, status, reason). A bad image (a damaged file, a made-up transfer syntax) becomes
    "unreadable" and a DICOM object that is no image "skipped": the build goes on with the others. A missing
    decoder ("missing_decoder") and any other exception ("error") are sent to the parent, which stops."""
    path, size = args
    try:
        arr, truncated = load_for_model(path, size)
        return arr, ("truncated" if truncated else "ok"), ("data ends early; decoded what was there" if truncated else "")
    except MissingDecoderError as e:
        return None, "missing_decoder", e.reason
    except NotAnImageError as e:
        return None, "skipped", e.reason
    except ImageReadError as e:
        return None, "unreadable", e.reason
    except Exception as e:  # noqa: BLE001 - exceptions may not pickle; the parent raises it with the file name
        where = traceback.extract_tb(e.__traceback__)[-1]
        return None, "error", f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"


def _raise_for_worker_failure(path: str, status: str, reason: str) -> None:
    if status == "missing_decoder":
        raise DatasetError(f"{path}: {reason}. This is a setup problem, not a bad image: install the decoder and run "
                           "again (nothing was cached)")
    if status == "error":
        raise BonexrayError(f"{path}: preprocessing failed with an unexpected error, not an image problem ({reason}); "
                            "nothing was cached. Please report it")


def _worker_init() -> None:
    """Pool worker start-up: leave Ctrl-C to the parent, and die with the parent.

    Without this, workers outlive a parent killed with SIGKILL (parent PID 1) and keep decoding.
    Linux: the kernel sends SIGTERM when the thread that started the pool dies (PR_SET_PDEATHSIG);
    elsewhere a thread polls the parent PID.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cancels the pool on Ctrl-C
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            pr_set_pdeathsig = 1
            if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) == 0:
                if os.getppid() != parent or parent == 1:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


#: Per-process memo of content digests: (path, size, mtime, ctime, inode) -> digest, so prepare_data and
#: setup of one run read every file once.
_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """BLAKE2b of a file's bytes (streamed), or ``missing``: what the cache fingerprint knows of a file.

    By content, not size + mtime: a file replaced by another with the same size and mtime (``cp -p``) must
    not reuse stale pixels.
    """
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    key = (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    found = _DIGESTS.get(key)
    if found is None:
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError:
            return "unreadable"
        found = _DIGESTS[key] = h.hexdigest()
    return found


def fingerprint(records: Iterable[Record], size: int) -> str:
    """Identity of the inputs: paths, labels, the bytes of every file (:func:`file_digest`), the size and
    the decoder version.

    Splits are not part of it: they are assigned later (per run, per seed) and do not change pixels.
    """
    from concurrent.futures import ThreadPoolExecutor

    records = list(records)
    # hashlib releases the GIL on large buffers: a few threads keep the disk busy.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        digests = list(pool.map(file_digest, [r.path for r in records]))
    h = hashlib.sha256(f"v{PREPROCESS_VERSION}|content|{size}".encode())
    for r, digest in zip(records, digests):
        h.update(f"{r.path}|{r.body_part}|{r.abnormal}|{r.study_id}|{r.patient_id}|{digest}\n".encode())
    return h.hexdigest()[:32]


def _damaged(root: Path, why: str) -> DatasetError:
    err = DatasetError(f"{root}: damaged cache ({why}); run `bonexray preprocess --force` or delete the folder "
                       "to rebuild it")
    err.damage = why  # build_cache rebuilds instead, and says why
    return err


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
        """Open a finished cache; a damaged one (sizes, rows or index hash disagree with meta.json) is refused."""
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"{root}: not a finished bonexray cache (no meta.json); run `bonexray preprocess`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            n, size = int(meta["n"]), int(meta["size"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _damaged(root, f"meta.json is unreadable: {err}") from err
        if not meta.get("complete"):
            raise DatasetError(f"{root}: cache is incomplete; run `bonexray preprocess` again")
        try:
            raw = (root / "index.csv").read_bytes()
        except OSError as err:
            raise _damaged(root, f"cannot read index.csv: {err.strerror or err}") from err
        if meta.get("index_sha256") not in (None, hashlib.sha256(raw).hexdigest()):
            raise _damaged(root, "index.csv does not match the SHA-256 recorded in meta.json")
        import pandas as pd

        try:
            index = pd.read_csv(io.BytesIO(raw), dtype={"study_id": str, "patient_id": str, "reason": str},
                                keep_default_na=False)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
            raise _damaged(root, f"index.csv is not a readable table: {err}") from err
        if len(index) != n or "row" not in index or not np.array_equal(index["row"].to_numpy(), np.arange(n)):
            raise _damaged(root, f"index.csv has {len(index)} rows; meta.json says {n} images")
        images_path = root / "images.u8"
        expected = n * size * size
        actual = images_path.stat().st_size if images_path.is_file() else None
        if n and actual != expected:
            raise _damaged(root, f"images.u8 has {'no file' if actual is None else f'{actual:,} bytes'}; "
                                 f"meta.json says {n} images of {size}x{size} = {expected:,} bytes")
        images = np.memmap(images_path, dtype=np.uint8, mode="r", shape=(n, size, size)) if n else np.zeros((0, size, size), np.uint8)
        return cls(root, images, index, size, meta)

    def read_rows(self, rows) -> np.ndarray:
        """Tiles of ``rows`` (uint8 (k, S, S)) read with positioned reads, not through the memmap: pages
        read through a mapping stay in this process's resident set, so a pass over the whole cache
        (evaluate) would hold all of it (bench/scale.py). The reads still go through the page cache."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.size, self.size), np.uint8)
        tile = self.size * self.size
        fd = os.open(self.root / "images.u8", os.O_RDONLY)
        try:
            for j, row in enumerate(rows):
                if not 0 <= row < len(self.images):
                    raise IndexError(f"row {row} is outside the cache's {len(self.images)} rows")
                view = memoryview(out[j]).cast("B")
                got = os.preadv(fd, [view], int(row) * tile)
                if got != tile:
                    raise _damaged(self.root, f"images.u8 ends inside row {row}")
        finally:
            os.close(fd)
        return out

    def summary(self) -> dict:
        idx = self.index
        return {
            "images": len(idx),
            "size": self.size,
            "by_status": dict(Counter(idx["status"])),
            "by_body_part": dict(sorted(Counter(idx["body_part"]).items())),
            "by_label": {str(k): v for k, v in sorted(Counter(idx["abnormal"]).items())},
        }


def check_cache_folder(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                       flag: str = "--cache") -> Path:
    """The output guard for a cache folder, before any work: new, empty, or a cache (:func:`is_cache_folder`);
    another folder only with ``overwrite``; never one whose cache files would replace one of ``inputs``."""
    from ..output_folder import claim_folder

    return claim_folder(path, "preprocess", CACHE_FILES, overwrite=overwrite, inputs=inputs, legacy=is_cache_folder,
                        flag=flag, write_marker=False,
                        hint=None if flag == "--out" else f"choose a new or empty {flag}, or a bonexray cache")


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
    overwrite: bool = False,
    flag: str = "--cache",
) -> tuple[ImageCache, bool]:
    """Build (or reuse) the cache of ``recordset`` at ``size``. Returns (cache, reused).

    ``out`` passes the output guard first (bonexray/output_folder.py): a new or empty folder, or a cache
    (:func:`is_cache_folder`); any other folder only with ``overwrite`` (``preprocess --overwrite``; train's
    and evaluate's ``--cache`` never write into a foreign folder), and never over an image it reads."""
    if size < 16:
        raise DatasetError(f"--size {size} is too small (minimum 16)")
    out = check_cache_folder(out, [r.path for r in recordset.records], overwrite=overwrite, flag=flag)
    records = recordset.records
    fp = fingerprint(records, size)
    with cache_lock(out) as created:
        return _build_or_reuse(recordset, out, size, fp, workers, progress, force, created)


LOCK_NAME = ".bonexray.lock"
#: What a cache folder holds: the output guard checks these names.
CACHE_FILES = ("meta.json", "index.csv", "images.u8", "problems.txt", LOCK_NAME)


def is_cache_folder(folder: Path) -> bool:
    """A cache built before the output marker existed (or by train/evaluate): its meta.json has a fingerprint;
    or one another run is building now (it holds the cache's lock file, and waits its turn on it)."""
    if (folder / LOCK_NAME).is_file():
        return True
    try:
        return "fingerprint" in json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


@contextlib.contextmanager
def cache_lock(out: Path):
    """Hold the cache folder's lock (``fcntl.flock`` on ``.bonexray.lock``) for the whole build-or-reuse.

    Two runs into one folder (two ``train`` runs of one dataset share the default cache) would otherwise
    write one index over the other's pixels. The second run says it waits, then reuses what the first
    built. Yields whether this call created the folder. The lock dies with the process (no stale lock).
    """
    import fcntl

    created = False
    while True:
        if not out.exists():
            out.mkdir(parents=True, exist_ok=True)
            created = True
        lock_path = out / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"bonexray: {out}: another run is building this cache; waiting for it to finish",
                      file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the folder may have been removed (a failed first build) while we waited: start again
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        created = False
    try:
        yield created
    finally:
        os.close(fd)  # releases the lock


def _build_or_reuse(recordset: RecordSet, out: Path, size: int, fp: str, workers: int | None, progress: bool,
                    force: bool, created: bool) -> tuple[ImageCache, bool]:
    records = recordset.records
    if not force and cache_is_current(out, fp):
        try:
            return ImageCache.open(out), True
        except DatasetError as err:  # inputs unchanged but the files are damaged: build it again
            if not hasattr(err, "damage"):
                raise
            warnings.warn(f"{out}: damaged cache ({err.damage}); rebuilding it", BonexrayWarning, stacklevel=4)

    # Invalidate first: a crash from here on must not leave an old meta.json pointing at new data.
    (out / "meta.json").unlink(missing_ok=True)
    n = len(records)
    run_tag = f"{os.getpid()}-{secrets.token_hex(4)}"  # per-run names: nothing another process writes or removes
    tmp_images = out / f".images.u8.{run_tag}.partial"
    t0 = time.perf_counter()
    statuses, reasons = _decode_into(tmp_images, records, size, workers, progress, out, created)
    tmp_index = out / f".index.csv.{run_tag}.partial"
    index_sha256 = _write_index(records, statuses, reasons, tmp_index)
    os.replace(tmp_images, out / "images.u8")
    os.replace(tmp_index, out / "index.csv")
    (out / "problems.txt").write_text("".join(p + "\n" for p in recordset.problems))
    meta = {
        "complete": True,
        "n": n,
        "size": size,
        "fingerprint": fp,
        "index_sha256": index_sha256,  # reuse checks index.csv against it (and images.u8 against n, size)
        "source": recordset.source,
        "data": recordset.root,
        "bonexray_version": __version__,
        "preprocess_version": PREPROCESS_VERSION,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))  # written last: marks completion
    return ImageCache.open(out), False


def _decode_into(tmp_images: Path, records: list[Record], size: int, workers: int | None, progress: bool, out: Path,
                 created: bool) -> tuple[list[str], list[str]]:
    """Decode every record into its row of ``tmp_images``; returns (statuses, reasons). On any error (Ctrl-C
    included) the partial file is removed, and ``out`` too when this build created it."""
    n = len(records)
    statuses, reasons = [""] * n, [""] * n
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(r.path, size) for r in records]
    try:
        # Plain positioned writes, not a writable memmap: every page written through a mapping stays
        # in this process's resident set until it is unmapped, so peak RSS grew with the dataset
        # (by the whole cache: 4 GB for MURA at 320 px; bench/scale.py). Unwritten rows read as zeros.
        with open(tmp_images, "wb") as tiles:
            tiles.truncate(max(n, 1) * size * size)
            from tqdm.auto import tqdm

            with tqdm(total=n, desc=f"preprocess {size}px", unit="img", disable=not progress, dynamic_ncols=True) as bar:
                if workers <= 1:
                    _store_results(map(_decode_one, jobs), records, tiles, statuses, reasons, bar)
                else:
                    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
                        try:
                            _store_results(pool.map(_decode_one, jobs, chunksize=16), records, tiles, statuses,
                                           reasons, bar)
                        except BaseException:
                            pool.shutdown(wait=True, cancel_futures=True)  # no queued work runs on after an error
                            raise
            os.fsync(tiles.fileno())  # on disk before meta.json says the cache is complete (as msync did)
    except BaseException:
        tmp_images.unlink(missing_ok=True)  # nothing half-written stays behind
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return statuses, reasons


def _write_index(records: list[Record], statuses: list[str], reasons: list[str], path: Path) -> str:
    """Write the index (one row per record, with its decode status and reason) to ``path``; returns its SHA-256."""
    rows = []
    for i, (r, st, why) in enumerate(zip(records, statuses, reasons)):
        row = {"row": i, **r.as_row(), "status": st, "reason": why}
        rows.append(row)
    import pandas as pd

    index = pd.DataFrame(rows, columns=["row", *RECORD_COLUMNS, "status", "reason"])
    index.to_csv(path, index=False)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store_results(results, records, tiles, statuses, reasons, bar) -> None:
    for i, (arr, status, reason) in enumerate(results):
        _raise_for_worker_failure(records[i].path, status, reason)
        if arr is not None:
            tile = np.ascontiguousarray(arr, dtype=np.uint8)
            os.pwrite(tiles.fileno(), tile.data, i * tile.nbytes)
        statuses[i], reasons[i] = status, reason
        bar.update(1)


def default_cache_dir(data_root: str, size: int) -> Path:
    """Per-user cache location keyed by the dataset path and image size."""
    base = os.environ.get("BONEXRAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bonexray"
    )
    key = hashlib.sha256(str(Path(data_root).resolve()).encode()).hexdigest()[:12]
    return Path(base) / "preprocessed" / f"{Path(data_root).name}-{key}-{size}px"
