"""Hardening, round 3 (issue #32), the decoding and serving items: every transfer syntax a PACS sends, made-up
transfer syntaxes, DICOM media folders, warnings that name their file, files of several frames, the
decompression-bomb message, slow request bodies, cut-off uploads, a PACS answering HTML, the CSP of /docs and a
listener receiving objects that are no image. Every input is built here or is a real file of pydicom-data."""
from __future__ import annotations

import csv
import socket
import struct
import time
import tomllib
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bonexray.data.imageio import read_image, read_image_bytes
from bonexray.errors import BonexrayWarning, ImageReadError, NotAnImageError
from builders import radiograph_like

ROOT = Path(__file__).resolve().parents[1]


def real_file(name: str) -> Path:
    """A real file of pydicom's test data (pydicom-data, a dev dependency); the test is skipped without it."""
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(name)
    except Exception:  # noqa: BLE001 - pydicom-data absent and no network: same as not found
        found = None
    if found is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data: pydicom's real test files)")
    return Path(found)


def no_foreign_warnings(caught) -> list[str]:
    """Every warning is bonexray's one-line kind; returns their texts."""
    foreign = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, BonexrayWarning)]
    assert not foreign, foreign
    return [str(w.message) for w in caught]


def instance(sop_class: str, study: str | None = None) -> pydicom.Dataset:
    """An explicit-VR little-endian instance of ``sop_class`` in ``study`` (a new one by default), own series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientID = "PID-32"
    return ds


def cr_dataset(pixels: np.ndarray, study: str | None = None) -> pydicom.Dataset:
    """A small uncompressed CR instance (MONOCHROME2, 16-bit) around ``pixels``."""
    ds = instance("1.2.840.10008.5.1.4.1.1.1", study)
    ds.Modality, ds.BodyPartExamined = "CR", "HAND"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    return ds


def save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def pdf_dataset(study: str | None = None) -> pydicom.Dataset:
    """An Encapsulated PDF instance (no pixel data), as a DICOM media folder carries with a report."""
    ds = instance("1.2.840.10008.5.1.4.1.1.104.1", study)
    ds.Modality, ds.MIMETypeOfEncapsulatedDocument = "DOC", "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return ds


# --------------------------------------------------------------------------- 9: every transfer syntax


#: (transfer syntax, real file, uncompressed twin of the same picture or None, largest allowed difference)
SYNTAXES = [
    ("1.2.840.10008.1.2.1.99", "image_dfl.dcm", None, 0),  # deflate
    ("1.2.840.10008.1.2.5", "MR_small_RLE.dcm", "MR_small.dcm", 0),
    ("1.2.840.10008.1.2.5", "emri_small_RLE.dcm", "emri_small.dcm", 0),
    ("1.2.840.10008.1.2.4.50", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 4),  # JPEG baseline (lossy)
    ("1.2.840.10008.1.2.4.51", "JPGExtended.dcm", None, 0),  # JPEG extended, 12-bit
    ("1.2.840.10008.1.2.4.70", "JPEG-LL.dcm", None, 0),  # JPEG lossless Process 14 SV1, 16-bit
    ("1.2.840.10008.1.2.4.70", "JPGLosslessP14SV1_1s_1f_8b.dcm", None, 0),
    ("1.2.840.10008.1.2.4.70", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0),
    ("1.2.840.10008.1.2.4.80", "MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),  # JPEG-LS
    ("1.2.840.10008.1.2.4.80", "emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", 0),
    ("1.2.840.10008.1.2.4.81", "JPEGLSNearLossless_16.dcm", None, 0),
    ("1.2.840.10008.1.2.4.90", "MR_small_jp2klossless.dcm", "MR_small.dcm", 0),  # JPEG 2000 lossless
    ("1.2.840.10008.1.2.4.90", "US1_J2KR.dcm", "US1_UNCR.dcm", 0),
    ("1.2.840.10008.1.2.4.91", "MR2_J2KI.dcm", "MR2_UNCR.dcm", 40),  # JPEG 2000 (lossy)
]


@pytest.mark.parametrize("syntax,name,twin,tolerance", SYNTAXES, ids=[f"{s[1]}" for s in SYNTAXES])
def test_every_transfer_syntax_decodes_a_real_file(syntax, name, twin, tolerance):
    path = real_file(name)
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = read_image(path)
    assert not [t for t in no_foreign_warnings(caught) if "frames" not in t]  # a clean file decodes silently
    assert out.kind == "dicom" and out.pixels.ndim == 2 and out.pixels.dtype == np.uint8
    assert out.pixels.std() > 5  # a picture, not a blank
    if twin is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BonexrayWarning)
            reference = read_image(real_file(twin)).pixels
        assert reference.shape == out.pixels.shape
        assert np.abs(reference.astype(int) - out.pixels.astype(int)).max() <= tolerance


def test_12bit_jpeg_is_the_same_picture_as_its_lossless_twin():
    """JPGExtended.dcm (12-bit lossy JPEG) and JPEG-LL.dcm hold one picture: GDCM's decode must show it."""
    lossy, lossless = read_image(real_file("JPGExtended.dcm")).pixels, read_image(real_file("JPEG-LL.dcm")).pixels
    assert np.corrcoef(lossy.ravel().astype(float), lossless.ravel().astype(float))[0, 1] > 0.98


def test_12bit_jpeg_with_a_damaged_scan_header_warns_naming_the_file(capfd):
    path = real_file("JPEG-lossy.dcm")  # JPGExtended.dcm with invalid SOS parameters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = read_image(path)
    texts = no_foreign_warnings(caught)
    assert out.pixels.std() > 5
    assert texts and all(t.startswith(f"{path}: ") for t in texts) and any("GDCM" in t for t in texts)
    assert "Invalid SOS" not in capfd.readouterr().err  # GDCM's own stderr line was caught, not passed through


#: Every syntax a PACS commonly sends, and the packages (pip names) any one of which decodes it.
DECODERS = {
    "JPEG baseline": {"python-gdcm", "pylibjpeg-libjpeg", "pillow"},
    "JPEG extended 12-bit": {"python-gdcm", "pylibjpeg-libjpeg"},
    "JPEG lossless (Process 14, SV1)": {"python-gdcm", "pylibjpeg-libjpeg"},
    "JPEG-LS": {"pyjpegls", "python-gdcm", "pylibjpeg-libjpeg"},
    "JPEG 2000": {"pylibjpeg-openjpeg", "python-gdcm"},
    "RLE": {"pydicom", "pylibjpeg-rle"},
    "deflate": {"pydicom"},
}
PERMISSIVE = {"python-gdcm", "pyjpegls", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pylibjpeg", "pydicom", "pillow"}


def test_the_install_declares_a_permissively_licensed_decoder_for_every_syntax():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    for syntax, packages in DECODERS.items():
        assert names & packages & PERMISSIVE, f"the install decodes no {syntax}"
    assert "pylibjpeg-libjpeg" not in names  # GPL-3.0: not for an Apache-2.0 package


# --------------------------------------------------------------------------- 10: a made-up transfer syntax


def made_up_syntax(path: Path) -> Path:
    ds = cr_dataset(radiograph_like(3))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def test_made_up_transfer_syntax_is_an_unreadable_file_not_a_missing_decoder(tmp_path):
    from bonexray.errors import MissingDecoderError

    path = made_up_syntax(tmp_path / "odd.dcm")
    with pytest.raises(ImageReadError, match="unknown transfer syntax 1.2.3.4.5.6") as info:
        read_image(path)
    assert not isinstance(info.value, MissingDecoderError) and str(path) in str(info.value)


def test_preprocess_caches_the_good_images_past_a_made_up_transfer_syntax(tmp_path, capsys):
    from bonexray.cli import main
    from bonexray.data.preprocess import ImageCache

    base = tmp_path / "d"
    made_up_syntax(base / "odd.dcm")
    with open(base / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "body_part", "abnormal"])
        w.writerow(["odd.dcm", "hand", 0])
        for i in range(3):
            Image.fromarray(radiograph_like(i)).save(base / f"good{i}.png")
            w.writerow([f"good{i}.png", "hand", i % 2])
    rc = main(["preprocess", str(base / "manifest.csv"), "--out", str(tmp_path / "c"), "--size", "32", "--quiet",
               "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    status = ImageCache.open(tmp_path / "c").index.set_index("path")["status"]
    assert (status == "ok").sum() == 3 and status[str(base / "odd.dcm")] == "unreadable"
    assert "unknown transfer syntax 1.2.3.4.5.6" in out and "odd.dcm" in out


# --------------------------------------------------------------------------- 11: a DICOM media folder


def media_folder(base: Path) -> dict[str, Path]:
    """What a CD/USB export holds: DICOMDIR, two radiographs, a structured report, an RT plan and a PDF."""
    import shutil

    study = generate_uid()
    files = {
        "image1": save(cr_dataset(radiograph_like(1), study), base / "IMAGES" / "IM0001"),
        "image2": save(cr_dataset(radiograph_like(2), study), base / "IMAGES" / "IM0002"),
        "pdf": save(pdf_dataset(study), base / "DOCS" / "DOC0001"),
    }
    for key, name in (("dicomdir", "DICOMDIR"), ("sr", "test-SR.dcm"), ("rtplan", "rtplan.dcm")):
        target = base / ("DICOMDIR" if key == "dicomdir" else f"OTHER/{key.upper()}0001")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_file(name), target)
        files[key] = target
    return files


@pytest.mark.parametrize("key,words", [("dicomdir", "DICOMDIR"), ("sr", "SR"), ("rtplan", "RT Plan"),
                                       ("pdf", "Encapsulated PDF")])
def test_non_image_objects_are_not_images(key, words, tmp_path):
    path = media_folder(tmp_path)[key]
    with pytest.raises(NotAnImageError, match=words):
        read_image(path)


def test_predict_on_a_dicom_media_folder_skips_the_non_images_and_exits_0(tmp_path, capsys):
    import json

    from bonexray.cli import main
    from builders import make_checkpoint

    files = media_folder(tmp_path / "cd")
    model = make_checkpoint(tmp_path / "m.ckpt", image_size=64)
    rc = main(["predict", str(model), str(tmp_path / "cd"), "--device", "cpu", "--backend", "torch", "--no-scope-check"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    images = [json.loads(line) for line in out.splitlines() if '"type": "image"' in line]
    assert sorted(r["path"] for r in images) == sorted(str(files[k]) for k in ("image1", "image2"))
    for key in ("dicomdir", "sr", "rtplan", "pdf"):
        assert f"bonexray predict: {files[key]}: skipped: " in err, err
    assert "Traceback" not in err


def test_preprocess_lists_non_image_objects_as_skipped(tmp_path, capsys):
    from bonexray.cli import main
    from bonexray.data.preprocess import ImageCache

    files = media_folder(tmp_path / "cd")
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "body_part", "abnormal"])
        for k, p in files.items():
            w.writerow([str(p), "hand", 0])
    rc = main(["preprocess", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "c"), "--size", "32", "--quiet",
               "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    status = ImageCache.open(tmp_path / "c").index.set_index("path")["status"]
    assert {status[str(files[k])] for k in ("image1", "image2")} == {"ok"}
    assert {status[str(files[k])] for k in ("dicomdir", "sr", "rtplan", "pdf")} == {"skipped"}
    assert f"skipped: {files['sr']}: not an image: DICOM" in out


# --------------------------------------------------------------------------- 12: warnings name their file


def test_scope_evidence_of_a_dicom_adds_no_raw_pydicom_warning():
    from bonexray.inference.scope import source_evidence

    path = real_file("SC_rgb_jpeg.dcm")  # its header says explicit VR but is implicit: pydicom warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_image(path)
        source_evidence(path)
        source_evidence(path.read_bytes())
    texts = no_foreign_warnings(caught)
    assert len(texts) == 1 and texts[0].startswith(f"{path}: pydicom: ")  # once, from the decoder, with the name


def test_predict_prints_pydicom_warnings_once_with_the_file_name(tmp_path, capfd):
    from bonexray.cli import main
    from builders import make_checkpoint

    path = real_file("SC_rgb_jpeg.dcm")
    model = make_checkpoint(tmp_path / "m.ckpt", image_size=64)
    capfd.readouterr()
    main(["predict", str(model), str(path), "--device", "cpu", "--backend", "torch"])
    err = capfd.readouterr().err
    mentions = [ln for ln in err.splitlines() if "VR" in ln]
    assert len(mentions) == 1 and str(path) in mentions[0], err
    assert "UserWarning" not in err and "warnings.warn" not in err


# --------------------------------------------------------------------------- 13: several frames


def test_multi_frame_dicom_says_how_many_frames_and_reads_the_first():
    path = real_file("emri_small.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = read_image(path)
    texts = no_foreign_warnings(caught)
    assert out.frames == 10
    assert texts == [f"{path}: multi-frame DICOM of 10 frames; bonexray reads the first frame only"]
    first = pydicom.dcmread(path).pixel_array[0]
    assert out.pixels.shape == first.shape
    assert np.corrcoef(out.pixels.ravel().astype(float), first.ravel().astype(float))[0, 1] > 0.99


@pytest.mark.parametrize("fmt,suffix,what", [("TIFF", ".tif", "multi-page TIFF"), ("GIF", ".gif", "animated GIF")])
def test_multi_page_tiff_and_animated_gif_say_so(fmt, suffix, what, tmp_path):
    frames = [Image.fromarray(radiograph_like(i)) for i in range(3)]
    path = tmp_path / f"several{suffix}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = read_image(path)
    assert out.frames == 3
    assert no_foreign_warnings(caught) == [f"{path}: {what} of 3 frames; bonexray reads the first frame only"]
    single = tmp_path / f"one{suffix}"
    frames[0].save(single, format=fmt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(single).frames == 1
    assert not caught
    assert np.array_equal(out.pixels, read_image(single).pixels)  # the first frame is what is read


# --------------------------------------------------------------------------- 17: the decompression-bomb message


def _header_only_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_message_quotes_bonexrays_limit():
    pillow_limit = f"{2 * Image.MAX_IMAGE_PIXELS:,}"
    data = _header_only_png(20_000, 20_000)  # 400 M pixels: above Pillow's own limit, which refuses it at open
    with pytest.raises(ImageReadError) as info:
        read_image_bytes(data, "bomb.png", max_pixels=40_000_000)
    reason = info.value.reason
    assert "400,000,000 pixels" in reason and "40,000,000" in reason and "decompression bomb" in reason
    assert pillow_limit not in reason and str(2 * Image.MAX_IMAGE_PIXELS) not in reason


# --------------------------------------------------------------------------- 2, 15, 20: serve


@pytest.fixture(scope="module")
def serve_model(tmp_path_factory) -> Path:
    from builders import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("serve32") / "m.ckpt", image_size=64)


BOUNDARY = "bonexray32boundary"


def multipart(files: list[tuple[str, bytes]], closed: bool = True) -> bytes:
    parts = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    return parts + (f"--{BOUNDARY}--\r\n".encode() if closed else b"")


def _status_line(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(64).split(b"\r\n", 1)[0]
    except (socket.timeout, ConnectionError):
        return b""


def test_slow_request_bodies_do_not_lock_other_clients_out(serve_model):
    """66 connections send a predict request's headers and then a byte now and then (a slow-body attack): /healthz
    answers all along, every slow body is cut off with 408 once it falls behind, and then a normal request works."""
    import httpx

    from bonexray.web.app import create_app
    from bonexray.web.server import uvicorn_settings
    from bonexray.web.uploads import UploadLimits
    from builders import LiveServer, png_bytes

    app = create_app(serve_model, device="cpu", limits=UploadLimits(body_grace_s=2, body_min_rate=1024))
    head = (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
            f"\r\nContent-Length: 100000\r\n\r\n").encode()
    with LiveServer(app, **uvicorn_settings(header_timeout=2.0)) as live:
        slow = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(66)]
        try:
            for s in slow:
                s.sendall(head + b"-")
            time.sleep(0.5)
            for s in slow:  # a byte more: alive, but far below any useful rate
                s.sendall(b"-")
            assert httpx.get(f"{live.url}/healthz", timeout=5).status_code == 200  # while all slots are taken
            answers = [_status_line(s, 10) for s in slow]
            assert all(a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")) for a in answers), set(answers)
            assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 60  # the slots were held, then freed
            r = httpx.post(f"{live.url}/api/predict", timeout=30,
                           files=[("files", ("x.png", png_bytes(radiograph_like(0)), "image/png"))])
            assert r.status_code == 200, r.text
        finally:
            for s in slow:
                s.close()


def test_healthz_is_outside_the_request_limit(serve_model):
    from fastapi.testclient import TestClient

    from bonexray.web.app import create_app

    client = TestClient(create_app(serve_model, device="cpu", max_requests=0))
    assert client.get("/healthz").status_code == 200
    r = client.get("/api/model")
    assert r.status_code == 503 and "server busy" in r.json()["detail"]


def test_slow_body_is_answered_408_in_words(serve_model):
    import asyncio

    from bonexray.web.uploads import UploadError, UploadLimits, read_uploads

    async def trickle():
        yield f"--{BOUNDARY}\r\n".encode()
        await asyncio.sleep(3)
        yield b"x"

    limits = UploadLimits(body_grace_s=1, body_min_rate=1024)
    with pytest.raises(UploadError) as info:
        asyncio.run(read_uploads(f"multipart/form-data; boundary={BOUNDARY}", None, trickle(), limits))
    assert info.value.status == 408 and "request body too slow" in info.value.message


def test_cut_off_multipart_upload_is_called_incomplete(serve_model):
    from fastapi.testclient import TestClient

    from bonexray.web.app import create_app
    from builders import png_bytes

    client = TestClient(create_app(serve_model, device="cpu"))
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    whole = multipart([("a.png", png_bytes(radiograph_like(1)))])
    assert client.post("/api/predict", content=whole, headers=headers).status_code == 200
    for cut in (whole[: len(whole) // 2], multipart([("a.png", png_bytes(radiograph_like(1)))], closed=False)):
        r = client.post("/api/predict", content=cut, headers=headers)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert detail.startswith("incomplete upload: the body ended") and "closing multipart boundary" in detail
    assert "inside a.png" in client.post("/api/predict", content=whole[:300], headers=headers).json()["detail"]


def _csp(header: str) -> dict[str, list[str]]:
    out = {}
    for directive in filter(None, (d.strip() for d in header.split(";"))):
        name, *values = directive.split()
        out[name] = values
    return out


def test_docs_and_openapi_carry_a_csp_that_allows_exactly_their_own_assets(serve_model):
    import base64
    import hashlib
    import re

    from fastapi.testclient import TestClient

    from bonexray.web.app import create_app

    client = TestClient(create_app(serve_model, device="cpu"))
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and _csp(schema.headers["content-security-policy"])["default-src"] == ["'none'"]
    page = client.get("/docs")
    assert page.status_code == 200
    csp = _csp(page.headers["content-security-policy"])
    scripts = csp.get("script-src", csp["default-src"])
    styles = csp.get("style-src", csp["default-src"])
    assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts and "*" not in scripts
    html = page.text
    sources = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html)
    sheets = re.findall(r"<link[^>]*\bhref=\"([^\"]+\.css)\"", html)
    assert sources and sheets
    for src in sources:
        assert src.startswith("/") and not src.startswith("//") and "'self'" in scripts  # same origin
        assert client.get(src).status_code == 200  # the offline asset is served
    for href in sheets:
        assert href.startswith("/") and "'self'" in styles and client.get(href).status_code == 200
    inline = [body for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S) if "src=" not in attrs]
    assert inline  # Swagger UI is started by an inline script: it must be allowed by its hash, and only it
    for body in inline:
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in scripts
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]


# --------------------------------------------------------------------------- 14: a PACS answering HTML


def test_a_pacs_answering_html_is_quoted_not_a_json_error(tmp_path, capsys):
    from bonexray.cli import main
    from builders import HtmlPageServer

    with HtmlPageServer() as portal:
        rc = main(["pacs", "analyze", "--url", f"{portal.url}/portal", "--model", str(tmp_path / "unused.ckpt"),
                   "--date", "20240101"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "Expecting value" not in err
    for words in ("not DICOMweb", "HTTP 200", "text/html", "<!DOCTYPE html><html><head><title>Sign in"):
        assert words in lines[0], lines[0]


# --------------------------------------------------------------------------- pacs listen: objects that are no image


@pytest.mark.slow
def test_listener_receiving_non_image_sop_classes_answers_and_logs_a_skip(serve_model, capsys):
    from pynetdicom import AE
    from pydicom.uid import ImplicitVRLittleEndian

    from bonexray.inference.predictor import Predictor
    from bonexray.pacs.listen import Destination, Listener

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sr, plan = pydicom.dcmread(real_file("test-SR.dcm")), pydicom.dcmread(real_file("rtplan.dcm"))
    pdf = pdf_dataset()
    orphan = pydicom.dcmread(real_file("rtplan.dcm"))
    del orphan.StudyInstanceUID
    orphan.SOPInstanceUID = generate_uid()
    listener = Listener(Predictor(serve_model, backend="torch"), Destination("NOWHERE", "127.0.0.1", 1), port,
                        quiet_seconds=0.5).start()
    try:
        ae = AE(ae_title="MODALITY")
        for ds in (sr, plan, pdf):
            ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="BONEXRAY")
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in (sr, plan, pdf, orphan)]
        assoc.release()
        for _ in range(300):
            if listener.studies_done >= 3:
                break
            time.sleep(0.1)
        assert listener.studies_done == 3  # each study handled, the listener still up
    finally:
        listener.stop()
    assert statuses == [0x0000, 0x0000, 0x0000, 0xC210]
    out, err = capsys.readouterr()
    for ds in (sr, plan, pdf):
        assert f"instance {ds.SOPInstanceUID}: skipped: not a radiograph" in err
        assert f"study {ds.StudyInstanceUID}: no radiograph among its 1 instance(s); nothing to analyse" in out
    assert f"instance {orphan.SOPInstanceUID} from MODALITY (RT Plan Storage): no Study Instance UID; refused" in err
    assert "Traceback" not in err and "AttributeError" not in err
