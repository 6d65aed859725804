"""The decoding inputs of the third adversarial pass (issue #32), one line per input: what bonexray says.

Run: ``python bench/adversarial_decode.py`` (needs pydicom-data for the real transfer-syntax files; missing files
are reported as such). Each line is ``OK`` (the expected outcome) or ``BAD``, then the input and the outcome; the
exit status is 1 when any line is BAD. Nothing is timed: this checks answers, not speed.
"""
from __future__ import annotations

import asyncio
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bonexray.data.imageio import read_image, read_image_bytes  # noqa: E402
from bonexray.errors import BonexrayWarning, ImageReadError, MissingDecoderError, NotAnImageError  # noqa: E402

SYNTAX_FILES = ["image_dfl.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "JPEG-lossy.dcm",
                "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm",
                "JPEGLSNearLossless_16.dcm", "MR_small_jp2klossless.dcm", "MR2_J2KI.dcm", "RG1_J2KR.dcm"]
NON_IMAGES = ["DICOMDIR", "test-SR.dcm", "rtplan.dcm"]

bad = 0


def line(ok: bool, what: str, outcome: str) -> None:
    global bad
    bad += not ok
    print(f"{'OK ' if ok else 'BAD'}  {what}: {outcome}")


def attempt(fn):
    """(result, error, warnings) of fn(), warnings as texts; only bonexray's one-line kind is accepted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = fn(), None
        except Exception as exc:  # noqa: BLE001 - reported below
            result, error = None, exc
    foreign = [w for w in caught if not issubclass(w.category, BonexrayWarning)]
    return result, error, [str(w.message) for w in caught], foreign


def testdata(name: str) -> Path | None:
    try:
        from pydicom.data import get_testdata_file

        found = get_testdata_file(name)
        return Path(found) if found else None
    except Exception:  # noqa: BLE001
        return None


def main() -> int:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    for name in SYNTAX_FILES:  # 9: every transfer syntax a PACS commonly sends
        path = testdata(name)
        if path is None:
            line(False, name, "not installed (pip install pydicom-data)")
            continue
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        out, err, said, foreign = attempt(lambda: read_image(path))
        ok = err is None and out.pixels.std() > 5 and not foreign and all(s.startswith(str(path)) for s in said)
        line(ok, f"{name} ({ts.name})", f"decoded {out.pixels.shape}" + (f"; warned: {said[0][len(str(path)) + 2:]}"
                                                                         if said else "") if err is None else repr(err))
    for name in NON_IMAGES:  # 11
        path = testdata(name)
        if path is None:
            line(False, name, "not installed (pip install pydicom-data)")
            continue
        _, err, _, foreign = attempt(lambda: read_image(path))
        line(isinstance(err, NotAnImageError) and not foreign, name, f"skipped: {getattr(err, 'reason', err)}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = testdata("MR_small.dcm")
        if src is not None:  # 10: a made-up transfer syntax
            ds = pydicom.dcmread(src)
            ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
            ds.save_as(tmp / "odd.dcm", implicit_vr=False, little_endian=True)
            _, err, _, _ = attempt(lambda: read_image(tmp / "odd.dcm"))
            line(isinstance(err, ImageReadError) and not isinstance(err, MissingDecoderError)
                 and "unknown transfer syntax" in err.reason, "TransferSyntaxUID 1.2.3.4.5.6", f"unreadable: {err.reason}")
        mf = testdata("emri_small.dcm")  # 13: several frames
        if mf is not None:
            out, err, said, _ = attempt(lambda: read_image(mf))
            line(err is None and out.frames == 10 and len(said) == 1, "emri_small.dcm (10 frames)", said[0] if said else "silent")
        frames = [Image.fromarray(np.full((32, 32), 40 * i, np.uint8)) for i in range(1, 4)]
        for fmt, suffix in (("TIFF", ".tif"), ("GIF", ".gif")):
            path = tmp / f"three{suffix}"
            frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
            out, err, said, _ = attempt(lambda: read_image(path))
            line(err is None and out.frames == 3 and len(said) == 1, path.name, said[0] if said else "silent")
        sr = testdata("SC_rgb_jpeg.dcm")  # 12: warnings of the header read by the scope gate
        if sr is not None:
            from bonexray.inference.scope import source_evidence

            _, _, said, foreign = attempt(lambda: (read_image(sr), source_evidence(sr)))
            line(not foreign and len(said) == 1, "SC_rgb_jpeg.dcm decoded + scope evidence",
                 f"{len(said)} warning(s) naming the file, {len(foreign)} raw")
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    _, err, _, _ = attempt(lambda: read_image_bytes(bomb, "bomb.png", max_pixels=40_000_000))  # 17
    line(isinstance(err, ImageReadError) and "40,000,000" in err.reason and "178,956,970" not in err.reason,
         "20000x20000 PNG header, max_pixels 40M", getattr(err, "reason", repr(err)))

    from bonexray.web.uploads import UploadError, UploadLimits, read_uploads

    boundary = "b32"

    async def body(parts):
        for p in parts:
            yield p

    def upload(parts, limits=UploadLimits()):
        return asyncio.run(read_uploads(f"multipart/form-data; boundary={boundary}", None, body(parts), limits))

    head = f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n".encode()
    _, err, _, _ = attempt(lambda: upload([head + b"\x89PNG half of a file"]))  # 15
    line(isinstance(err, UploadError) and err.status == 400 and "incomplete upload" in err.message,
         "multipart cut off before its closing boundary", f"{getattr(err, 'status', '')} {getattr(err, 'message', err)}")

    async def trickle():
        yield head
        await asyncio.sleep(2.5)
        yield b"x"

    _, err, _, _ = attempt(lambda: asyncio.run(read_uploads(f"multipart/form-data; boundary={boundary}", None, trickle(),
                                                            UploadLimits(body_grace_s=1, body_min_rate=1024))))  # 2
    line(isinstance(err, UploadError) and err.status == 408, "request body that stops coming (grace 1 s)",
         f"{getattr(err, 'status', '')} {getattr(err, 'message', err)}")
    print(f"{'clean' if not bad else f'{bad} BAD line(s)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
