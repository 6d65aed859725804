"""Tests for bonexray.data.imageio: synthetic edge cases in tmp_path, plus the real shared data."""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from bonexray.data.imageio import (
    IMAGE_SUFFIXES,
    DecodedImage,
    is_image_file,
    read_image,
    read_image_bytes,
    to_uint8,
)
from bonexray.errors import BonexrayWarning, ImageReadError, MissingDecoderError
from builders import jpeg_bytes, lossy_jpeg_dicom, png_bytes, radiograph_like
from conftest import SHARED_DATA, requires_shared_data

DICOM_DIR = SHARED_DATA / "dicom"
FRACATLAS_IMAGES = SHARED_DATA / "FracAtlas" / "images"
KNOWN_TRUNCATED = FRACATLAS_IMAGES / "Non_fractured" / "IMG0004028.jpg"  # 20 bytes missing


# --------------------------------------------------------------------------- builders


def _gradient(h: int = 60, w: int = 80) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)


def _noisy(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Textured content so JPEG files are large enough to cut meaningfully."""
    rng = np.random.default_rng(seed)
    return np.clip(_gradient(h, w).astype(int) + rng.integers(-30, 30, (h, w)), 0, 255).astype(
        np.uint8
    )


def _save(im: Image.Image, path: Path, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF
    )


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny, valid-looking PNG that declares a huge size (the decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def _dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    frames: int = 1,
    meta: bool = True,
    **elements,
) -> Path:
    """Write a small uncompressed DICOM (CR) file; ``elements`` are extra attributes."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    colour = pixels.ndim == (4 if frames > 1 else 3)
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        _dcmwrite(path, ds, enforce=True)
    else:  # old ACR-NEMA style: no preamble, no "DICM", no meta header
        _dcmwrite(path, ds, enforce=False)
    return path


def _dcmwrite(path: Path, ds: Dataset, *, enforce: bool) -> None:
    if int(pydicom.__version__.split(".")[0]) >= 3:
        if not enforce:
            ds.set_original_encoding(True, True)  # implicit VR little endian
        pydicom.dcmwrite(path, ds, enforce_file_format=enforce)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, not enforce
        pydicom.dcmwrite(path, ds, write_like_original=not enforce)


# --------------------------------------------------------------------------- is_image_file


def test_image_suffixes_are_lower_case_with_dot() -> None:
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom"}


def test_is_image_file(tmp_path: Path) -> None:
    assert is_image_file(tmp_path / "a.PNG")  # by suffix alone, case-insensitive
    assert is_image_file(tmp_path / "b.jpeg")
    assert not is_image_file(tmp_path / "notes.txt")
    assert not is_image_file(tmp_path / "._a.png")  # macOS AppleDouble companion file
    assert not is_image_file(tmp_path / "missing")  # no suffix, cannot sniff
    uid_named = _dicom(tmp_path / "1.2.840.113619.2.55", np.zeros((4, 4), np.uint16))
    no_suffix = _dicom(tmp_path / "IM0001", np.zeros((4, 4), np.uint16))
    assert is_image_file(uid_named) and is_image_file(no_suffix)
    (tmp_path / "README").write_text("hello")
    assert not is_image_file(tmp_path / "README")


# --------------------------------------------------------------------------- PIL formats


def test_8bit_png_values_preserved(tmp_path: Path) -> None:
    arr = _gradient()
    out = read_image(_save(Image.fromarray(arr), tmp_path / "g.png"))
    assert isinstance(out, DecodedImage)
    assert out.kind == "png" and out.truncated is False
    assert out.pixels.dtype == np.uint8 and out.pixels.flags.writeable
    np.testing.assert_array_equal(out.pixels, arr)


def test_16bit_png_kept_as_uint16_and_scaled_by_to_uint8(tmp_path: Path) -> None:
    arr = (_gradient().astype(np.uint16) * 16 + 100)  # 12-bit-ish data in a 16-bit container
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")  # really a 16-bit PNG
    out = read_image(path)
    assert out.pixels.dtype == np.uint16
    np.testing.assert_array_equal(out.pixels, arr)
    u8 = to_uint8(out.pixels)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    # monotonic: scaling keeps the order of intensities
    order = np.argsort(arr.ravel(), kind="stable")
    assert np.all(np.diff(u8.ravel()[order].astype(int)) >= 0)


def test_rgb_becomes_luma(tmp_path: Path) -> None:
    rgb = np.stack([_gradient(), 255 - _gradient(), np.full((60, 80), 40, np.uint8)], -1)
    im = Image.fromarray(rgb)
    out = read_image(_save(im, tmp_path / "rgb.png"))
    assert out.pixels.shape == (60, 80) and out.pixels.dtype == np.uint8
    np.testing.assert_array_equal(out.pixels, np.asarray(im.convert("L")))


def test_rgba_and_la_are_composited_on_black(tmp_path: Path) -> None:
    gray = np.full((10, 20), 200, np.uint8)
    alpha = np.zeros((10, 20), np.uint8)
    alpha[:, 10:] = 255
    alpha[:, 5:10] = 128
    la = Image.fromarray(np.stack([gray, alpha], -1), mode="LA")
    rgba = Image.fromarray(np.stack([gray, gray, gray, alpha], -1), mode="RGBA")
    for name, im in (("la.png", la), ("rgba.png", rgba)):
        px = read_image(_save(im, tmp_path / name)).pixels
        assert px.shape == (10, 20)
        assert np.all(px[:, :5] == 0)  # fully transparent -> black background
        assert np.all(px[:, 10:] == 200)  # opaque -> unchanged
        assert np.all(px[:, 5:10] == 100)  # half transparent -> half intensity


def test_palette_and_bilevel(tmp_path: Path) -> None:
    arr = _gradient()
    p_img = Image.fromarray(arr).convert("P")
    out = read_image(_save(p_img, tmp_path / "p.png"))
    np.testing.assert_array_equal(out.pixels, np.asarray(p_img.convert("L")))
    p_img.info["transparency"] = 0  # palette entry 0 transparent -> composited to black
    out_t = read_image(_save(p_img, tmp_path / "pt.png", transparency=0))
    assert out_t.pixels.shape == arr.shape and out_t.pixels.dtype == np.uint8
    bilevel = Image.fromarray(arr > 128)
    out_1 = read_image(_save(bilevel, tmp_path / "one.png"))
    assert set(np.unique(out_1.pixels)) <= {0, 255}


def test_cmyk_jpeg_and_tiff_and_bmp(tmp_path: Path) -> None:
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    for name, kind in (("c.jpg", "jpeg"), ("c.tif", "tiff")):
        out = read_image(_save(cmyk, tmp_path / name))
        assert out.kind == kind and out.pixels.shape == (60, 80) and out.pixels.ndim == 2
    out = read_image(_save(Image.fromarray(_gradient()), tmp_path / "g.bmp"))
    assert out.kind == "bmp"
    np.testing.assert_array_equal(out.pixels, _gradient())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(tmp_path: Path, orientation: int) -> None:
    im = Image.fromarray(_gradient(30, 50))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(im, tmp_path / f"o{orientation}.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    out = read_image(path).pixels
    np.testing.assert_array_equal(out, expected)
    assert out.shape == ((50, 30) if orientation >= 5 else (30, 50))


# --------------------------------------------------------------------------- truncation, draft


def _jpeg_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_jpeg_decodes_and_is_flagged(tmp_path: Path, keep: float) -> None:
    arr = _noisy(240, 320)
    data = _jpeg_bytes(arr)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    out = read_image(path)
    assert out.truncated is True and out.kind == "jpeg"
    assert out.pixels.shape == (240, 320) and out.pixels.dtype == np.uint8
    # the top rows, which were present, decode to (about) the picture
    assert np.abs(out.pixels[:40].astype(int) - arr[:40]).mean() < 10
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the global flag was restored


def test_few_bytes_missing_like_fracatlas(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg_bytes(_noisy(100, 120))[:-20])
    out = read_image(path, draft_size=32)
    assert out.truncated is True and min(out.pixels.shape) >= 32


def test_complete_jpeg_is_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg_bytes(_noisy(100, 120)))
    assert read_image(path).truncated is False


def test_truncated_png_decodes_and_is_flagged(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noisy(100, 120)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    out = read_image(path)
    assert out.truncated is True and out.pixels.shape == (100, 120)


def test_jpeg_cut_before_any_pixel_data_is_an_error(tmp_path: Path) -> None:
    data = _jpeg_bytes(_noisy(100, 120))
    sos = data.index(b"\xff\xda")  # start of scan: entropy-coded data begins after it
    path = tmp_path / "header_only.jpg"
    for cut in (sos, sos + 4):  # before / inside the scan header: not one pixel to show
        path.write_bytes(data[:cut])
        with pytest.raises(ImageReadError, match="header_only.jpg"):
            read_image(path)


def test_concurrent_reads_flag_truncation_correctly(tmp_path: Path) -> None:
    """The lenient retry flips a Pillow global: strict reads in other threads must not see it."""
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    data = _jpeg_bytes(_noisy(200, 200))
    good.write_bytes(data)
    cut.write_bytes(data[:-10])
    paths = [good, cut] * 60
    with ThreadPoolExecutor(max_workers=8) as pool:
        flags = list(pool.map(lambda p: read_image(p).truncated, paths))
    assert flags == [p == cut for p in paths]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_draft_decodes_jpeg_at_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg_bytes(_noisy(1200, 1600)))
    full = read_image(path)
    small = read_image(path, draft_size=200)
    assert full.pixels.shape == (1200, 1600)
    assert small.pixels.shape[0] < 1200 and small.pixels.shape[1] < 1600
    assert min(small.pixels.shape) >= 200
    assert small.pixels.shape == (300, 400)  # libjpeg scale 1/4: the largest keeping >= 200
    assert read_image(path, draft_size=5000).pixels.shape == (1200, 1600)  # never upscaled
    # RGB JPEGs come out as one gray channel too
    rgb = np.repeat(_noisy(300, 400)[..., None], 3, -1)
    (tmp_path / "rgb.jpg").write_bytes(_jpeg_bytes(rgb))
    assert read_image(tmp_path / "rgb.jpg", draft_size=100).pixels.shape == (150, 200)


def test_draft_ignored_for_png(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_noisy(400, 400)), tmp_path / "p.png")
    assert read_image(path, draft_size=50).pixels.shape == (400, 400)


# --------------------------------------------------------------------------- failures


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert "x.png" in str(info.value) and "not an image" in info.value.reason


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "empty.jpg")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path / "dir.png")


def test_corrupt_jpeg_body(tmp_path: Path) -> None:
    data = bytearray(_jpeg_bytes(_noisy(100, 120)))
    sos = data.index(b"\xff\xda")
    data[sos + 20 : -2] = b"\xff\x00\xff\xd0" * ((len(data) - sos - 22) // 4) + b"\x00" * (
        (len(data) - sos - 22) % 4
    )
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(bytes(data))
    try:
        out = read_image(path)  # libjpeg may recover from garbage; then it must still be sane
    except ImageReadError as exc:
        assert "corrupt.jpg" in str(exc)
    else:
        assert out.pixels.shape == (100, 120)


def test_declared_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageReadError, match="bomb") as info:
        read_image(path)
    assert "pixels" in info.value.reason


@pytest.mark.filterwarnings("ignore::bonexray.errors.BonexrayWarning")
def test_max_pixels_limit_names_the_size(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "big.png", 12_000, 10_001)  # just over the default
    with pytest.raises(ImageReadError, match="12000x10001") as info:
        read_image(path)
    assert "120,000,000" in info.value.reason
    small = _save(Image.fromarray(_gradient()), tmp_path / "small.png")
    with pytest.raises(ImageReadError, match="80x60"):
        read_image(small, max_pixels=1000)


def test_pil_bomb_warning_is_replaced_by_one_naming_the_file(tmp_path: Path) -> None:
    from bonexray.errors import BonexrayWarning

    path = _png_header_only(tmp_path / "warn.png", 12_000, 9_000)  # > PIL's warning threshold, < max_pixels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError):  # header only: no pixel data to decode
            read_image(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    ours = [str(w.message) for w in caught if issubclass(w.category, BonexrayWarning)]
    assert len(ours) == 1 and str(path) in ours[0] and "12000x9000" in ours[0]


def test_all_nan_float_image_is_refused_not_black(tmp_path: Path) -> None:
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(path)
    with pytest.raises(ImageReadError, match="no finite pixel"):
        read_image(path)
    partly = tmp_path / "partly.tif"
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    a[0, 0] = np.nan
    Image.fromarray(a, mode="F").save(partly)
    assert read_image(partly).pixels.max() > 0


def test_bad_draft_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_image(tmp_path / "x.jpg", draft_size=0)


# --------------------------------------------------------------------------- to_uint8


def test_to_uint8() -> None:
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert to_uint8(a) is a
    b = np.array([[1000, 2000], [3000, 1000]], np.uint16)
    np.testing.assert_array_equal(to_uint8(b), [[0, 128], [255, 0]])
    const = np.full((2, 2), 65535, np.uint16)
    np.testing.assert_array_equal(to_uint8(const), np.full((2, 2), 255))
    assert to_uint8(np.zeros((3, 3), np.uint16)).max() == 0


# --------------------------------------------------------------------------- DICOM, synthetic


def test_dicom_window_maps_to_uint8(tmp_path: Path) -> None:
    arr = np.array([[0, 100, 150, 200], [300, 1000, 4095, 175]], np.uint16)
    path = _dicom(tmp_path / "w.dcm", arr, WindowCenter=200, WindowWidth=101)
    out = read_image(path)
    assert out.kind == "dicom" and out.truncated is False and out.pixels.dtype == np.uint8
    # LINEAR window 200/101 spans 149.5..249.5: below -> 0, above -> 255, centre -> mid grey
    np.testing.assert_array_equal(out.pixels[0, :2], [0, 0])
    np.testing.assert_array_equal(out.pixels[1, :3], [255, 255, 255])
    assert 126 <= out.pixels[0, 3] <= 129 and out.pixels[0, 2] < out.pixels[1, 3] < 128


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    arr = np.array([[0, 1023], [512, 256]], np.uint16)
    m2 = read_image(_dicom(tmp_path / "m2.dcm", arr, bits_stored=10)).pixels
    m1 = read_image(_dicom(tmp_path / "m1.dcm", arr, bits_stored=10, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1.pixels.astype(int), 255 - m2.astype(int))
    assert m1.pixels[0, 0] == 255  # lowest stored value = most attenuation = bright


def test_dicom_rescale_applies_before_window(tmp_path: Path) -> None:
    arr = np.array([[0, 10, 20, 30]], np.uint16)
    # stored 10 * 2 - 100 = -80 ... window centred on -60 with width 41 -> stored 20 is the centre
    path = _dicom(
        tmp_path / "r.dcm", arr, RescaleSlope=2, RescaleIntercept=-100,
        WindowCenter=-60, WindowWidth=41,
    )
    px = read_image(path).pixels
    assert px[0, 0] == 0 and px[0, 3] == 255 and 120 <= px[0, 2] <= 135


def test_dicom_without_window_is_min_max(tmp_path: Path) -> None:
    arr = np.array([[100, 200], [300, 300]], np.uint16)
    px = read_image(_dicom(tmp_path / "n.dcm", arr)).pixels
    np.testing.assert_array_equal(px, [[0, 128], [255, 255]])


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    item = Dataset()
    # 4 entries starting at stored value 0, declared 12-bit output; a decreasing LUT that
    # uses 0..4000 of it (its own range, not the declared depth, defines black and white)
    item.add_new(0x00283002, "US", [4, 0, 12])  # LUT Descriptor
    item.add_new(0x00283006, "US", [4000, 3000, 1000, 0])  # LUT Data
    arr = np.array([[0, 1, 2, 3]], np.uint16)
    px = read_image(_dicom(tmp_path / "lut.dcm", arr, VOILUTSequence=[item])).pixels
    np.testing.assert_array_equal(px, [[255, 191, 64, 0]])


def test_dicom_multiframe_takes_first_frame(tmp_path: Path) -> None:
    frames = np.stack([np.array([[0, 4095], [0, 4095]]), np.full((2, 2), 7)]).astype(np.uint16)
    path = _dicom(tmp_path / "mf.dcm", frames, frames=2)
    with pytest.warns(BonexrayWarning, match=r"mf\.dcm: multi-frame DICOM of 2 frames; bonexray reads the first"):
        out = read_image(path)
    np.testing.assert_array_equal(out.pixels, [[0, 255], [0, 255]])
    assert out.frames == 2


def test_dicom_rgb_to_gray(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 255, 255)
    rgb[0, 1] = (255, 0, 0)
    px = read_image(_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)).pixels
    assert px.shape == (2, 3) and px.dtype == np.uint8
    assert px[0, 0] == 255 and px[0, 1] == 76 and px[1, 0] == 0


def test_dicom_without_preamble_read_by_suffix(tmp_path: Path) -> None:
    arr = np.array([[0, 50], [100, 100]], np.uint16)
    path = _dicom(tmp_path / "raw.dcm", arr, meta=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(path).pixels, [[0, 128], [255, 255]])


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "sr.dcm"
    _dcmwrite(path, ds, enforce=True)
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(path)


def test_dicom_garbage_with_dcm_suffix(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_text("definitely not DICOM " * 20)
    with pytest.raises(ImageReadError, match="junk.dcm"):
        read_image(path)


def test_dicom_bomb_refused(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "b.dcm", np.zeros((40, 50), np.uint16))
    with pytest.raises(ImageReadError, match="50x40"):
        read_image(path, max_pixels=100)


def test_dicom_unsupported_compression_names_package(tmp_path: Path, monkeypatch) -> None:
    from pydicom.encaps import encapsulate

    # Every JPEG-LS decoder is a dependency: hide them as pydicom sees a missing one (its dependency not met).
    pixels = pytest.importorskip("pydicom.pixels.decoders")
    decoder = pixels.JPEGLSLosslessDecoder
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pyjpegls": ("numpy", "pyjpegls")})

    ds = pydicom.dcmread(_dicom(tmp_path / "plain.dcm", np.zeros((4, 4), np.uint16)))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 30])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "jls.dcm"
    _dcmwrite(path, ds, enforce=True)
    with pytest.raises(MissingDecoderError, match="pip install") as info:  # a setup problem, not a bad image
        read_image(path)
    assert "JPEG-LS" in info.value.reason


def test_lossy_jpeg_quality_is_read_from_jpeg_files_and_from_lossy_jpeg_dicom() -> None:
    from pydicom.data import get_testdata_file

    gray = radiograph_like(3, 120, 100)
    for q in (20, 49, 90):
        assert read_image_bytes(jpeg_bytes(gray, q), "x.jpg").jpeg_quality == q
        decoded = read_image_bytes(lossy_jpeg_dicom(gray, q), "x.dcm")
        assert (decoded.kind, decoded.jpeg_quality) == ("dicom", q)
    assert read_image_bytes(png_bytes(gray), "x.png").jpeg_quality is None
    assert read_image_bytes(Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).read_bytes(), "rgb.dcm").jpeg_quality == 90
    # Lossless and JPEG 2000 pixel data carry no IJG table; a 12-bit lossy stream is not on its scale.
    for name in ("MR_small.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BonexrayWarning)
            assert read_image_bytes(Path(get_testdata_file(name)).read_bytes(), name).jpeg_quality is None, name


# --------------------------------------------------------------------------- real data


@requires_shared_data
def test_real_dicom_uncompressed_and_j2k_agree() -> None:
    unc = read_image(DICOM_DIR / "RG3_UNCR.dcm")
    j2k = read_image(DICOM_DIR / "RG3_J2KR.dcm")
    for out in (unc, j2k):
        assert out.kind == "dicom" and out.pixels.shape == (1760, 1760)
        assert out.pixels.dtype == np.uint8
    assert np.abs(unc.pixels.astype(int) - j2k.pixels.astype(int)).max() <= 1


@requires_shared_data
def test_real_dicom_monochrome1_bone_is_bright() -> None:
    px = read_image(DICOM_DIR / "RG3_UNCR.dcm").pixels.astype(float)
    # Regions picked by looking at the image: the tibia's cortex in mid-shaft, and the air
    # between the collimator edge and the calf, left of the leg. (The collimated margins are
    # white, as on film, so "brighter than the border" would be wrong here.)
    tibia = px[500:700, 800:860]
    air = px[500:700, 490:590]
    assert tibia.mean() > 150 and air.mean() < 50
    assert tibia.min() > air.max() + 100


@requires_shared_data
def test_real_truncated_fracatlas_jpeg() -> None:
    with pytest.raises(OSError, match="truncated"):  # it really is truncated for a strict load
        with Image.open(KNOWN_TRUNCATED) as im:
            im.load()
    with Image.open(KNOWN_TRUNCATED) as im:
        width, height = im.size
    out = read_image(KNOWN_TRUNCATED)
    assert out.truncated is True and out.kind == "jpeg"
    assert out.pixels.shape == (height, width) and out.pixels.dtype == np.uint8
    assert out.pixels.std() > 10  # a real picture, not a blank


@requires_shared_data
def test_real_fracatlas_has_53_truncated_jpegs() -> None:
    """The shared data README says 53 FracAtlas JPEGs are truncated; all others decode cleanly."""
    files = sorted(FRACATLAS_IMAGES.rglob("*.jpg"))
    assert len(files) > 3000
    truncated = [f for f in files if read_image(f, draft_size=64).truncated]
    assert len(truncated) == 53
    assert KNOWN_TRUNCATED in truncated


@requires_shared_data
def test_pydicom_warnings_name_the_file(tmp_path, monkeypatch):
    import warnings

    import pydicom

    from bonexray.data.imageio import read_image
    from bonexray.errors import BonexrayWarning

    real = pydicom.dcmread

    def noisy(*a, **k):
        warnings.warn("Invalid value for VR UI: '1.2.abc'", UserWarning)
        return real(*a, **k)

    monkeypatch.setattr(pydicom, "dcmread", noisy)
    dicom = SHARED_DATA / "dicom" / "RG3_UNCR.dcm"
    with pytest.warns(BonexrayWarning, match=f"{dicom}: pydicom: Invalid value for VR UI"):
        read_image(dicom)
