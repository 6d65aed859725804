"""Decode any X-ray file (PNG, JPEG, TIFF, BMP, DICOM, ...) into one 2-D gray array, bone bright.

Output conventions (the contract every consumer relies on):

* ``pixels`` is 2-D and C-contiguous. It is ``uint8`` for 8-bit sources and for **all DICOM**
  (after the Modality LUT and the VOI window/LUT, the displayed range is mapped to 0..255, so
  what the model sees is what a radiologist's viewer would show). It is ``uint16`` only for 16-bit
  (or 32-bit/float) PIL sources such as 16-bit PNG, with values preserved; ``to_uint8`` maps it
  down by min-max scaling.
* Bone is bright: DICOM MONOCHROME1 is inverted. PIL images are taken as stored.
* Colour is converted with ITU-R 601 luma (PIL's "L"). Alpha is **composited on black**: a
  transparent pixel becomes background (radiograph backgrounds are dark), instead of keeping
  whatever colour the transparent pixel happened to store.
* The EXIF orientation is applied.
* Truncated JPEG/PNG files are decoded as far as the data goes and flagged ``truncated=True``.
  Pillow only offers a process-global switch for that (``ImageFile.LOAD_TRUNCATED_IMAGES``); it
  is flipped only for the retry of a file that failed as truncated, under a lock that keeps every
  other ``read_image`` decode out meanwhile, and restored afterwards. (If the application sets the
  flag itself, truncation can no longer be detected and ``truncated`` stays False.)
* A float image without a single finite pixel (all NaN/inf) is refused, not shown as black.
* Pillow's DecompressionBombWarning (images above ``Image.MAX_IMAGE_PIXELS``) is replaced by a
  ``BonexrayWarning`` naming the file; ``max_pixels`` is the hard limit, and the message of a refused
  image quotes it (not Pillow's own limit).
* A file of several frames (multi-frame DICOM, multi-page TIFF, animated GIF/PNG/WebP) gives its first
  frame, ``frames`` says how many it holds, and one ``BonexrayWarning`` names the file and the count.
* Warnings of the decoders (pydicom, GDCM) are re-issued as one ``BonexrayWarning`` line naming the file.
* DICOM transfer syntaxes: uncompressed, deflate and RLE (pydicom), JPEG baseline, extended (8 and 12
  bit) and lossless incl. Process 14 SV1 (GDCM), JPEG-LS (pyjpegls, GDCM), JPEG 2000 and HTJ2K
  (pylibjpeg-openjpeg, GDCM): all dependencies of the package.
* Every failure raises ``ImageReadError(path, reason)``; a DICOM whose pixel data needs a decoder
  that is not installed raises its subclass ``MissingDecoderError`` (a setup problem); a DICOM object
  without pixel data (DICOMDIR, SR, RT plan, encapsulated PDF) raises ``NotAnImageError`` (front
  ends list it as skipped, not as an error). A transfer syntax DICOM does not define is unreadable.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bonexray.errors import BonexrayWarning, ImageReadError, MissingDecoderError, NotAnImageError

__all__ = ["IMAGE_SUFFIXES", "DecodedImage", "is_image_file", "read_image", "read_image_bytes", "to_uint8"]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom"}
)
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO (multi-picture, from phones) is a JPEG subclass
_EXIF_ORIENTATION = 0x0112
_MAX_REASON = 200  # keep library messages short: the CLI prints the reason on one line
#: DICOM attributes a decoded DICOM file reports (:attr:`DecodedImage.tags`): study grouping and scope evidence.
DICOM_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality", "BodyPartExamined")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: 2-D grayscale ``pixels`` (uint8, or uint16 for 16-bit PIL sources)."""

    pixels: np.ndarray
    truncated: bool
    kind: str
    #: (width, height) of the full-resolution image as displayed (after EXIF orientation). A JPEG
    #: decoded at reduced scale (``draft_size``) has smaller ``pixels``; None: the pixels' own size.
    full_size: tuple[int, int] | None = None
    #: Frames (pages) in the file; only the first is in ``pixels``.
    frames: int = 1
    #: The :data:`DICOM_TAGS` a DICOM file states, from the same parse as its pixels; empty for other files.
    tags: dict[str, str] = field(default_factory=dict)
    #: Estimated IJG quality of lossy JPEG data (:func:`jpeg_quality`): a JPEG file, or a DICOM whose pixel
    #: data is 8-bit JPEG baseline / extended. None: not lossy JPEG, or no table to read it from.
    jpeg_quality: int | None = None

    @property
    def original_size(self) -> tuple[int, int]:
        h, w = self.pixels.shape[:2]
        return self.full_size if self.full_size is not None else (int(w), int(h))


# --------------------------------------------------------------------------- public helpers


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a known image suffix, or for a file carrying the DICOM magic (UID-named files).

    macOS AppleDouble files (``._name.png``) are never images despite their suffix.
    """
    p = Path(path)
    if p.name.startswith("._"):
        return False
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return True
    # DICOM files are often named by UID ("1.2.840....123") or have no suffix at all.
    try:
        with open(p, "rb") as fh:
            head = fh.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


#: Lower and upper percentile of the window that :func:`to_uint8` and window-less DICOM files use.
WINDOW_PERCENTILES = (0.5, 99.5)
_WINDOW_SAMPLE = 1_000_000  # the percentiles of a large image come from an even subsample of this many


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """(low, high) :data:`WINDOW_PERCENTILES` of finite ``values``; min-max when there are none in between."""
    f = np.asarray(values, dtype=np.float32).reshape(-1)
    if f.size > _WINDOW_SAMPLE:
        f = f[:: int(np.ceil(f.size / _WINDOW_SAMPLE))]
    f = f[np.isfinite(f)]
    if f.size == 0:
        return 0.0, 0.0
    lo = float(np.percentile(f, WINDOW_PERCENTILES[0], method="lower"))
    hi = float(np.percentile(f, WINDOW_PERCENTILES[1], method="higher"))
    if hi <= lo:  # most pixels one value: keep whatever spread the rest has
        lo, hi = float(f.min()), float(f.max())
    return lo, hi


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map an image to uint8: uint8 passes through, anything else is windowed to 0..255 between its
    :data:`WINDOW_PERCENTILES` (values outside clip).

    The image's own range rather than full range because 16-bit files often use only 10-12 bits,
    which full range scaling would turn almost black; percentiles rather than min-max so that a few
    hot or dead pixels do not squeeze the image into a handful of grey levels. Small images (under
    200 pixels) use the lower/higher order statistic, so their window is their min-max. A constant
    image falls back to full-range scaling.
    """
    a = np.asarray(pixels)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    f = a.astype(np.float32, copy=False)
    if a.dtype.kind == "f":
        f = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
    if f.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = robust_range(f)
    if hi > lo:
        out = (f - lo) * (255.0 / (hi - lo))
    elif a.dtype.kind in "ui":
        out = f * (255.0 / float(np.iinfo(a.dtype).max))  # constant: keep its absolute level
    else:
        out = np.zeros_like(f)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_image(
    path: str | os.PathLike,
    *,
    draft_size: int | None = None,
    max_pixels: int = 120_000_000,
) -> DecodedImage:
    """Decode ``path`` into a 2-D grayscale array, bone bright.

    ``draft_size``: the caller will shrink the image to about this size, so a JPEG may be decoded
    by libjpeg at 1/2, 1/4 or 1/8 scale, never below ``draft_size`` on either side. Other formats
    ignore it. ``max_pixels``: refuse images declaring more pixels (checked before decoding).
    """
    _check_draft_size(draft_size)
    p = Path(path)
    return read_image_bytes(read_file_bytes(p), p, draft_size=draft_size, max_pixels=max_pixels)


def read_image_bytes(
    data: bytes,
    name: str | os.PathLike,
    *,
    draft_size: int | None = None,
    max_pixels: int = 120_000_000,
) -> DecodedImage:
    """:func:`read_image` for a file already in memory (an upload): nothing touches the disk.

    ``name`` is only used for the suffix (DICOM without preamble) and in error messages.
    """
    _check_draft_size(draft_size)
    p = Path(name)
    if not data:
        raise ImageReadError(p, "empty file (0 bytes)")
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC:
        return _read_dicom(p, data, max_pixels, force=False)
    if p.suffix.lower() in _DICOM_SUFFIXES and not _looks_like_pil_format(data):
        return _read_dicom(p, data, max_pixels, force=True)  # old files without preamble
    return _read_pil(p, data, draft_size, max_pixels)


# --------------------------------------------------------------------------- shared internals


def _check_draft_size(draft_size: int | None) -> None:
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be a positive integer, got {draft_size!r}")


def read_file_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes in one read (sniffing, a truncated-file retry and DICOM parsing reuse them), or one
    :class:`~bonexray.errors.ImageReadError` naming it (missing, a folder, no permission, empty)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(p, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(p, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(p, "permission denied") from None
    except OSError as exc:
        raise ImageReadError(p, f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageReadError(p, "empty file (0 bytes)")
    return data


def _short(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= _MAX_REASON else msg[: _MAX_REASON - 3] + "..."


def _bomb_reason(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image size {width}x{height} = {width * height:,} pixels exceeds the limit of "
        f"{max_pixels:,} pixels (possible decompression bomb)"
    )


def _pillow_bomb_reason(exc: BaseException, max_pixels: int) -> str:
    """Pillow refused an image as a decompression bomb: say it in bonexray's terms (its ``max_pixels``)."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return f"possible decompression bomb: the image declares more pixels than the limit of {max_pixels:,}"
    n = int(found.group(1))
    if n > max_pixels:
        return f"image of {n:,} pixels exceeds the limit of {max_pixels:,} pixels (possible decompression bomb)"
    return (f"image of {n:,} pixels is within the limit of {max_pixels:,} pixels but above Pillow's own "
            f"decompression-bomb limit ({2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels), which bonexray cannot raise per file")


def _frames_warning(p: Path, n: int, what: str) -> None:
    warnings.warn(f"{p}: {what} of {n} frames; bonexray reads the first frame only", BonexrayWarning, stacklevel=3)


def _looks_like_pil_format(data: bytes) -> bool:
    """Cheap sniff so a PNG/JPEG misnamed ``.dcm`` is not forced through the DICOM parser."""
    return data.startswith((b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM"))


# --------------------------------------------------------------------------- PIL path


class _TruncationGate:
    """Readers-writer lock around Pillow's global LOAD_TRUNCATED_IMAGES flag.

    Strict decodes share the gate; a lenient retry takes it exclusively and flips the flag, so a
    strict decode in another thread never runs while the flag is on (it would silently accept a
    truncated file and report truncated=False). Waiting writers block new readers: no starvation.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def strict(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def lenient(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_GATE = _TruncationGate()


class _Truncated(Exception):
    """Internal: the strict decode hit the end of the data."""


def _read_pil(p: Path, data: bytes, draft_size: int | None, max_pixels: int) -> DecodedImage:
    try:
        return _decode_pil(p, data, draft_size, max_pixels, lenient=False)
    except _Truncated:
        pass
    # Rare path (a few files per dataset): reopen, the failed Image object is half-loaded.
    decoded = _decode_pil(p, data, draft_size, max_pixels, lenient=True)
    if decoded.pixels.size and decoded.pixels.min() == decoded.pixels.max():
        raise ImageReadError(p, "file is truncated before any pixel data could be decoded")
    return decoded


def _open_pil(p: Path, data: bytes, max_pixels: int, warn: bool = True) -> Image.Image:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        if warn and any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            # Pillow's text does not name the file; the hard limit is max_pixels (checked next).
            w, h = im.size
            warnings.warn(f"{p}: very large image ({w}x{h} = {w * h:,} pixels); decoding it takes much memory",
                          BonexrayWarning, stacklevel=2)
        return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning is only raised when the application turns warnings into errors.
        raise ImageReadError(p, _pillow_bomb_reason(exc, max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageReadError(
            p, "not an image file (not PNG, JPEG, DICOM or another format Pillow can read)"
        ) from None
    except Exception as exc:  # broken headers surface as SyntaxError, struct.error, ...
        raise ImageReadError(p, f"corrupt image header ({_short(exc)})") from None


def _decode_pil(
    p: Path, data: bytes, draft_size: int | None, max_pixels: int, *, lenient: bool
) -> DecodedImage:
    im = opened = _open_pil(p, data, max_pixels, warn=not lenient)  # the lenient retry reopens: warn once
    fmt = (im.format or "unknown").upper()
    kind = "jpeg" if fmt == "JPEG" else fmt.lower()
    width, height = im.size
    try:
        # Declared size, checked before a single pixel is decoded.
        if width <= 0 or height <= 0:
            raise ImageReadError(p, f"zero-size image ({width}x{height})")
        if width * height > max_pixels:
            raise ImageReadError(p, _bomb_reason(width, height, max_pixels))
        frames = _pil_frames(im, fmt)
        if frames > 1 and not lenient:
            _frames_warning(p, frames, {"TIFF": "multi-page TIFF", "GIF": "animated GIF"}.get(fmt, f"{kind} file"))
        quality = jpeg_quality(im)  # from the header, before draft() picks the decoder's scale
        if fmt in _JPEG_FORMATS:
            # Let libjpeg emit gray directly (skips the colour conversion) and, when the caller
            # will shrink the image anyway, decode at 1/2..1/8 scale.
            target = (draft_size, draft_size) if draft_size else None
            im.draft("L", target)
        with _GATE.lenient() if lenient else _GATE.strict():
            try:
                im.load()
            except OSError as exc:
                if not lenient and "truncated" in str(exc).lower():
                    raise _Truncated from None
                raise
        if _EXIF_SWAPS_AXES.get(_exif_orientation(im), False):
            width, height = height, width
        im = _apply_exif_orientation(im)
        if im.mode == "F" and not np.isfinite(np.asarray(im)).any():
            raise ImageReadError(p, "float image has no finite pixel value (all NaN/inf); nothing to show")
        pixels = _pil_to_gray(im)
    except (_Truncated, ImageReadError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(p, _pillow_bomb_reason(exc, max_pixels)) from None
    except MemoryError:
        raise ImageReadError(p, f"out of memory decoding a {width}x{height} image") from None
    except Exception as exc:
        raise ImageReadError(p, f"corrupt or unsupported {kind} data ({_short(exc)})") from None
    finally:
        opened.close()
    return DecodedImage(pixels=pixels, truncated=lenient, kind=kind, full_size=(int(width), int(height)),
                        frames=frames, jpeg_quality=quality)


#: Sum of the 64 entries of JPEG's Annex K luminance table (IJG quality 50).
_IJG_LUMINANCE_SUM = 3688
#: DICOM transfer syntaxes whose pixel data is lossy (DCT) JPEG: baseline (8-bit) and extended (8/12-bit).
LOSSY_JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})


def jpeg_quality(im: Image.Image) -> int | None:
    """IJG quality (1-100) of a PIL JPEG image estimated from its luminance quantization table: the
    table's sum against the Annex K reference's gives IJG's scale factor, inverted (IJG scales the
    reference by 5000 / q below quality 50 and by 200 - 2q above). None: not a JPEG or no table."""
    tables = getattr(im, "quantization", None) if (getattr(im, "format", None) or "").upper() in _JPEG_FORMATS else None
    if not tables:
        return None
    luminance = tables[min(tables)]
    scale = 100.0 * float(sum(luminance)) / _IJG_LUMINANCE_SUM
    if scale <= 0:
        return None
    return int(round((200.0 - scale) / 2 if scale <= 100 else 5000.0 / scale))


def dicom_jpeg_quality(ds: Any) -> int | None:
    """:func:`jpeg_quality` of a DICOM dataset whose first frame is a lossy JPEG stream (transfer syntax
    JPEG baseline or extended); None for any other transfer syntax, and for 12-bit streams, whose tables
    Pillow does not read (a 12-bit table is not on IJG's 8-bit scale either)."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts not in LOSSY_JPEG_SYNTAXES or "PixelData" not in ds:
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        try:
            from pydicom.encaps import get_frame

            stream = get_frame(ds.PixelData, 0, number_of_frames=frames)
        except ImportError:  # pydicom 2.x
            from pydicom.encaps import generate_pixel_data_frame

            stream = next(generate_pixel_data_frame(ds.PixelData, frames))
        with Image.open(io.BytesIO(stream)) as im:
            return jpeg_quality(im)
    except Exception:  # noqa: BLE001 - a stream Pillow cannot parse (12-bit, damaged): the decoder reports damage
        return None


def _pil_frames(im: Image.Image, fmt: str) -> int:
    """Frames (pages) of an opened image; an MPO's extra pictures (a phone's preview) are no frames."""
    if fmt == "MPO":
        return 1
    try:
        return max(1, int(getattr(im, "n_frames", 1) or 1))
    except Exception:  # counting seeks through the file: a damaged later frame leaves the first one
        return 1


#: EXIF orientations 5-8 are transposes: the displayed width is the stored height.
_EXIF_SWAPS_AXES = {5: True, 6: True, 7: True, 8: True}


def _exif_orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(_EXIF_ORIENTATION)
    except Exception:
        return None  # a broken EXIF block must not cost us the picture


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    orientation = _exif_orientation(im)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        # Only call exif_transpose when it changes something: otherwise it copies the image.
        return ImageOps.exif_transpose(im)
    return im


def _as_writable(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return _as_writable(np.asarray(im))
    if mode.startswith("I;16"):  # 16-bit PNG/TIFF, any byte order
        return _as_writable(np.asarray(im).astype(np.uint16, copy=False))
    if mode in ("I", "F"):
        return _wide_to_uint16(np.asarray(im))
    has_alpha = "A" in im.getbands() or "a" in im.getbands()
    if mode == "P" and "transparency" in im.info:
        has_alpha = True
    if has_alpha:
        rgba = im.convert("RGBA")
        gray = np.asarray(rgba.convert("L")).astype(np.uint16)
        alpha = np.asarray(rgba.getchannel("A")).astype(np.uint16)
        # Composite on black: gray * alpha / 255, rounded.
        return ((gray * alpha + 127) // 255).astype(np.uint8)
    return _as_writable(np.asarray(im.convert("L")))  # RGB, CMYK, YCbCr, P, 1, LAB, HSV


def _wide_to_uint16(a: np.ndarray) -> np.ndarray:
    """32-bit int / float PIL images: keep values that fit uint16, else min-max into it."""
    if a.dtype.kind in "iu" and a.size and a.min() >= 0 and a.max() <= 65535:
        return a.astype(np.uint16)
    f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(f.min()), float(f.max())) if f.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, np.uint16)
    return np.rint((f - lo) * (65535.0 / (hi - lo))).astype(np.uint16)


# --------------------------------------------------------------------------- DICOM path

# Which package decodes which compressed transfer syntax (all are dependencies of bonexray), for the
# "install X" hint when one is missing anyway. Real syntaxes not named here (MPEG/H.264/HEVC video,
# JPIP references, private ones) have no decoder bonexray can use: such a file is unreadable.
_DICOM_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "python-gdcm",  # JPEG baseline (Pillow also decodes it)
    "1.2.840.10008.1.2.4.51": "python-gdcm",  # JPEG extended, 8 and 12 bit
    "1.2.840.10008.1.2.4.57": "python-gdcm",  # JPEG lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "python-gdcm",  # JPEG lossless, Process 14 SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE (pydicom also has its own)
}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def _dicom_funcs() -> dict[str, Any]:
    """pydicom >= 3 keeps the pixel helpers in pydicom.pixels, 2.x in pixel_data_handlers.util."""
    try:
        from pydicom.pixels import (  # type: ignore[attr-defined]
            apply_color_lut,
            apply_modality_lut,
            apply_voi_lut,
            convert_color_space,
            pixel_array,
        )

        return {
            "modality": apply_modality_lut,
            "voi": apply_voi_lut,  # the VOI LUT when there is one (prefer_lut), else the window
            "color_lut": apply_color_lut,
            "color_space": convert_color_space,
            "first_frame": lambda ds: pixel_array(ds, index=0),
            "v3": True,
        }
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (
            apply_color_lut,
            apply_modality_lut,
            apply_voi_lut,
            convert_color_space,
        )

        def first_frame(ds: Any) -> np.ndarray:
            arr = ds.pixel_array
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                arr = arr[0]
            return arr

        return {
            "modality": apply_modality_lut,
            # The VOI LUT when there is one (prefer_lut), else the window.
            "voi": lambda arr, ds, index=0: apply_voi_lut(arr, ds, index, prefer_lut=True),
            "color_lut": apply_color_lut,
            "color_space": convert_color_space,
            "first_frame": first_frame,
            "v3": False,
        }


def _read_dicom(p: Path, data: bytes, max_pixels: int, *, force: bool) -> DecodedImage:
    """:func:`_read_dicom_file`, with pydicom's warnings (odd tags, values outside their VR) re-issued as one
    line naming the file: without the name a warning in a folder of thousands tells nothing."""
    from ..errors import BonexrayWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return _read_dicom_file(p, data, max_pixels, force=force)
    finally:  # after the block: re-issued warnings must reach the caller, not the record
        seen: set[str] = set()
        for w in caught:
            text = " ".join(str(w.message).split())
            if text in seen:
                continue
            seen.add(text)
            if issubclass(w.category, BonexrayWarning):
                warnings.warn(w.message, w.category, stacklevel=2)
            else:  # GDCM's lines come through the decoder plugin already labelled
                who = "" if text.startswith("GDCM: ") else "pydicom: "
                warnings.warn(f"{p}: {who}{text}", BonexrayWarning, stacklevel=2)


def _read_dicom_file(p: Path, data: bytes, max_pixels: int, *, force: bool) -> DecodedImage:
    try:
        import pydicom
    except ImportError:  # a declared dependency, but say so clearly if it is gone
        raise MissingDecoderError(p, "DICOM file, but pydicom is not installed (pip install pydicom)")
    funcs = _dicom_funcs()
    if funcs["v3"]:
        from .jpeg12_gdcm import register

        register()  # 12-bit JPEG Extended through GDCM
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except Exception as exc:
        raise ImageReadError(p, f"not a readable DICOM file ({_short(exc)})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotAnImageError(p, _non_image_reason(ds))
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        raise ImageReadError(p, "DICOM file lacks a valid Rows/Columns size") from None
    if rows <= 0 or cols <= 0:
        raise ImageReadError(p, f"zero-size DICOM image ({cols}x{rows})")
    if rows * cols > max_pixels:
        raise ImageReadError(p, _bomb_reason(cols, rows, max_pixels))
    if not funcs["v3"] and rows * cols * frames > max_pixels:  # 2.x decodes every frame
        raise ImageReadError(
            p, f"{frames} frames of {cols}x{rows} exceed the limit of {max_pixels:,} pixels"
        )
    _ensure_transfer_syntax(ds)
    ts = ds.file_meta.TransferSyntaxUID
    if getattr(ts, "type", "Transfer Syntax") != "Transfer Syntax":
        raise ImageReadError(p, f"unknown transfer syntax {ts} (no DICOM transfer syntax has this UID: a damaged "
                                "or non-standard file); its pixel data cannot be decoded")
    if frames > 1:
        _frames_warning(p, frames, "multi-frame DICOM")

    try:
        arr = funcs["first_frame"](ds)
    except MemoryError:
        raise ImageReadError(p, f"out of memory decoding a {cols}x{rows} DICOM image") from None
    except Exception as exc:
        reason, missing = _dicom_decode_reason(ds, exc)
        raise (MissingDecoderError if missing else ImageReadError)(p, reason) from None
    try:
        pixels = _dicom_to_gray(ds, np.asarray(arr), funcs)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(p, f"cannot map DICOM pixel values to gray ({_short(exc)})") from None
    return DecodedImage(pixels=pixels, truncated=False, kind="dicom", frames=frames, tags=dicom_tags(ds),
                        jpeg_quality=dicom_jpeg_quality(ds))


def dicom_tags(ds: Any) -> dict[str, str]:
    """The :data:`DICOM_TAGS` a parsed dataset states (stripped, non-empty values only)."""
    out = {}
    for tag in DICOM_TAGS:
        value = str(ds.get(tag, "") or "").strip()
        if value:
            out[tag] = value
    return out


def _non_image_reason(ds: Any) -> str:
    """What a DICOM object without pixel data is, in words (its SOP class), for the "skipped" line."""
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if sop == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (the index of a DICOM media folder), not an image"
    from pydicom.uid import UID

    name = UID(sop).name if sop else "object of unknown SOP class"
    if name == sop:
        name = f"object of SOP class {sop}"
    return f"not an image: DICOM {name} (no pixel data)"


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files without a meta header (read with force=True) are native: tell the decoder which."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit = getattr(ds, "original_encoding", (None, None))[0]
    if implicit is None:
        implicit = getattr(ds, "is_implicit_VR", True)
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _dicom_decode_reason(ds: Any, exc: Exception) -> tuple[str, bool]:
    """(reason, True when the decoder is missing rather than the data being bad)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(ts, "name", None) or str(ts or "unknown transfer syntax")
    msg = str(exc).lower()
    # pydicom 3: "... all plugins are missing dependencies"; 2.x: "... missing required
    # dependencies", "'pylibjpeg-libjpeg' plugin is not installed", NotImplementedError("... no
    # pixel data handlers available"). A decoder that is present but fails means corrupt data.
    markers = ("missing dependencies", "missing required dependencies", "not installed", "no pixel data decoders")
    missing = any(k in msg for k in markers)
    if missing or isinstance(exc, NotImplementedError):
        hint = _DICOM_DECODER_HINTS.get(str(ts))
        if hint is None:  # video, JPIP, private: nothing bonexray can install decodes it
            return f"{ts_name} pixel data: bonexray decodes no such transfer syntax (still images only)", False
        return f"no decoder installed for {ts_name} pixel data (pip install {hint})", True
    return f"corrupt or unsupported DICOM pixel data, {ts_name} ({_short(exc)})", False


def _dicom_to_gray(ds: Any, arr: np.ndarray, funcs: dict[str, Any]) -> np.ndarray:
    """pydicom's Modality LUT -> VOI LUT / window (or min-max) -> MONOCHROME1 inversion -> uint8."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = funcs["color_lut"](arr, ds)
        return _rgb_to_uint8(rgb, 255 if rgb.dtype == np.uint8 else 65535)
    if arr.ndim == 3:  # RGB / YBR_*: samples in the last axis
        # pydicom 3 already returns RGB for YBR_FULL(_422); 2.x returns the stored YBR.
        if photometric.startswith("YBR_FULL") and not funcs["v3"]:
            arr = funcs["color_space"](arr, photometric, "RGB")
        bits = int(ds.get("BitsStored", 8) or 8)
        return _rgb_to_uint8(arr, 2**bits - 1)
    if arr.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {arr.shape}")

    values = funcs["modality"](arr, ds)
    unit = _voi_to_unit(ds, values, funcs)
    if photometric == "MONOCHROME1":  # low values are white: invert so bone is bright
        unit = 1.0 - unit
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _rgb_to_uint8(rgb: np.ndarray, full_scale: int) -> np.ndarray:
    f = rgb[..., :3].astype(np.float32)
    luma = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114  # same weights as PIL "L"
    return np.clip(np.rint(luma * (255.0 / max(full_scale, 1))), 0, 255).astype(np.uint8)


def _voi_to_unit(ds: Any, values: np.ndarray, funcs: dict[str, Any]) -> np.ndarray:
    """The display transform as float32 in [0, 1]: pydicom's VOI LUT, else its window, else min-max.

    pydicom maps into the stored (or rescaled) value range; the transform's own black and white
    (the LUT's smallest and largest entry; the window's output for -inf and +inf) become 0 and 1. A
    window that pydicom rejects (width below 1, unknown VOI LUT Function) is ignored: min-max.
    """
    if ds.get("VOILUTSequence"):
        out = np.asarray(funcs["voi"](values, ds, 0), dtype=np.float32)
        lo, hi = _voi_lut_range(ds, funcs, out)
        return np.clip((out - lo) / (hi - lo), 0.0, 1.0) if hi > lo else _minmax(out)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return _minmax(values)
    try:
        out = np.asarray(funcs["voi"](values, ds, 0), dtype=np.float64)
        black, white = np.asarray(funcs["voi"](np.array([-np.inf, np.inf]), ds, 0), dtype=np.float64)
    except (ValueError, TypeError, IndexError):
        return _minmax(values)
    if not np.isfinite([black, white]).all() or black == white:
        return _minmax(values)
    return np.clip((out - black) / (white - black), 0.0, 1.0).astype(np.float32)


def _voi_lut_range(ds: Any, funcs: dict[str, Any], out: np.ndarray) -> tuple[float, float]:
    """Output range of the VOI LUT itself (its smallest and largest entry), not of this image.

    LUT descriptors often claim 16 bits while entries use 12, so the declared depth is no good.
    """
    try:
        item = ds.VOILUTSequence[0]
        n_entries, first, _bits = (int(v) for v in item.LUTDescriptor)
        n_entries = n_entries or 65536  # 0 means 2**16 entries
        probe = np.arange(first, first + n_entries, dtype=np.int64)
        table = np.asarray(funcs["voi"](probe, ds, 0), dtype=np.float64)
        return float(table.min()), float(table.max())
    except Exception:
        return float(out.min()), float(out.max())


def _minmax(x: np.ndarray) -> np.ndarray:
    """A DICOM without a usable window: its :func:`robust_range` to [0, 1] (a hot pixel does not set white)."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = robust_range(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
