"""Images the model must refuse, built offline, for fitting the scope gate's in-scope head (outlier
exposure) and for measuring it: synthetic gradients, noise and shapes, rendered text and forms, CT /
MR / US / NM slices from pydicom's bundled test files (more with ``pip install pydicom-data``) as gray
pixels, gray-converted photographs (scikit-image's samples, when it is installed), radiographs turned
by a quarter or half turn or flipped upside down (:func:`turned`), and files a user
gives (``bonexray calibrate-scope --other-regions`` / ``--non-radiographs``).

Every builder returns ``(name, png_bytes)`` pairs, so the images go through the front ends' own path
(bytes -> decoder -> tile). ``variant`` seeds the randomness: the bench fits on one variant and
measures on another, and keeps whole sources apart (see bench/scope.py).
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np

#: pydicom test files by modality (those absent on this machine are skipped).
DICOM_SLICES = {"CT": ("CT_small.dcm", "693_UNCR.dcm", "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm",
                       "bad_sequence.dcm"),
                "MR": ("MR_small.dcm", "MR2_UNCR.dcm", "examples_overlay.dcm", "emri_small_jpeg_ls_lossless.dcm"),
                "US": ("US1_UNCI.dcm", "examples_palette.dcm", "OBXXXX1A_rle.dcm", "examples_rgb_color.dcm"),
                "NM": ("JPEG2000_UNC.dcm", "JPEG-LL.dcm")}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
          "clock", "coins", "moon", "brick", "grass", "gravel", "horse", "cell", "page", "text", "cat",
          "shepp_logan_phantom", "binary_blobs", "colorwheel", "logo")


#: Turns a radiograph gets by mistake (a film hung sideways or upside down, rows stored bottom-up).
#: A left-right mirror is not among them: it is what the other side's view looks like.
TURNS = ("rot90", "rot180", "rot270", "flip-ud")


def turned(gray: np.ndarray, turn: str) -> np.ndarray:
    """``gray`` turned by one of :data:`TURNS` (rot90: a quarter turn counter-clockwise)."""
    ops = {"rot90": lambda a: np.rot90(a, 1), "rot180": lambda a: np.rot90(a, 2), "rot270": lambda a: np.rot90(a, 3),
           "flip-ud": lambda a: a[::-1]}
    if turn not in ops:
        raise ValueError(f"turn {turn!r}: use one of {', '.join(TURNS)}")
    return np.ascontiguousarray(ops[turn](np.asarray(gray)))


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


def to_gray(a: np.ndarray) -> np.ndarray:
    from PIL import Image

    a = np.asarray(a)
    if a.dtype != np.uint8:
        from ..data.imageio import to_uint8

        a = to_uint8(a)
    if a.ndim == 3:
        return np.asarray(Image.fromarray(a[..., :3]).convert("L"))
    return a


def augment(gray: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` variants of one gray image: random crop (50-100% of each side), flips, quarter turns, gamma."""
    out = []
    h, w = gray.shape
    for _ in range(n):
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        a = gray[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = np.rot90(a, int(rng.integers(0, 4)))
        g = rng.uniform(0.6, 1.6)
        a = (255.0 * (a / 255.0) ** g).astype(np.uint8)
        out.append(np.ascontiguousarray(a))
    return out


def synthetic(n: int, variant: int = 0) -> list[tuple[str, bytes]]:
    """Gradients, smooth blobs, noise, squares and circles, stripes: ``n`` images of 256-512 px."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1000 + variant)
    out = []
    for i in range(n):
        h, w = int(rng.integers(256, 512)), int(rng.integers(256, 512))
        kind = i % 5
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        if kind == 0:  # linear or radial gradient
            ang = rng.uniform(0, np.pi)
            g = np.cos(ang) * xx + np.sin(ang) * yy if rng.random() < 0.7 else np.hypot(yy - rng.random(), xx - rng.random())
        elif kind == 1:  # smooth blobs: low-resolution noise, upsampled
            small = rng.random((int(rng.integers(3, 12)), int(rng.integers(3, 12))))
            g = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC),
                           np.float64)
        elif kind == 2:  # noise
            g = rng.normal(128, rng.uniform(10, 60), (h, w))
        elif kind == 3:  # squares and circles
            im = Image.new("L", (w, h), int(rng.integers(0, 256)))
            d = ImageDraw.Draw(im)
            for _ in range(int(rng.integers(2, 12))):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                s = int(rng.integers(10, max(11, w // 2)))
                box = [x0, y0, x0 + s, y0 + s]
                (d.rectangle if rng.random() < 0.5 else d.ellipse)(box, fill=int(rng.integers(0, 256)))
            g = np.asarray(im, np.float64)
        else:  # stripes / checkerboard
            period = rng.uniform(0.02, 0.2)
            g = np.sin(xx / period) * (np.sin(yy / period) if rng.random() < 0.5 else 1.0)
        g = np.asarray(g, np.float64)
        g = 255 * (g - g.min()) / (np.ptp(g) + 1e-9)
        out.append((f"synthetic-{variant}-{i}.png", png(np.clip(g, 0, 255).astype(np.uint8))))
    return out


def rendered_text(n: int, variant: int = 0) -> list[tuple[str, bytes]]:
    """Pages of text, forms with lines and boxes, dark or light: ``n`` images."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(2000 + variant)
    words = ("report patient study radiology findings impression normal fracture the of and date name signed "
             "page table total invoice number 2024 12 0.5 mg dose left right view see above").split()
    out = []
    for i in range(n):
        w, h = int(rng.integers(300, 520)), int(rng.integers(300, 620))
        dark = rng.random() < 0.3
        im = Image.new("L", (w, h), 20 if dark else int(rng.integers(200, 256)))
        d = ImageDraw.Draw(im)
        size = int(rng.integers(9, 28))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one size
            font = ImageFont.load_default()
        ink = 235 if dark else int(rng.integers(0, 80))
        y = int(rng.integers(4, 30))
        while y < h - size:
            line = " ".join(rng.choice(words, int(rng.integers(3, 12))))
            d.text((int(rng.integers(4, 40)), y), line, fill=ink, font=font)
            if rng.random() < 0.15:  # a form's rule or box
                d.rectangle([8, y + size + 2, w - 8, y + size + 3 + int(rng.integers(0, 30))], outline=ink)
            y += int(size * rng.uniform(1.2, 2.0))
        out.append((f"text-{variant}-{i}.png", png(np.asarray(im))))
    return out


def with_variants(stem: str, gray: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """``gray`` and ``n - 1`` augmented copies of it (:func:`augment`), as PNGs named ``STEM-J.png``."""
    return [(f"{stem}-{j}.png", png(a)) for j, a in enumerate([gray] + augment(gray, n - 1, rng))]


def dicom_slices(modalities: Iterable[str] = tuple(DICOM_SLICES), per_file: int = 4,
                 variant: int = 0) -> list[tuple[str, bytes]]:
    """Gray pixels (PNG, no DICOM tags) of pydicom's CT / MR / US / NM test images, ``per_file`` crops each."""
    from ..data.imageio import read_image_bytes

    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    rng = np.random.default_rng(3000 + variant)
    out = []
    for m in modalities:
        for name in DICOM_SLICES.get(m, ()):
            try:
                path = get_testdata_file(name)
                if path is None:
                    continue
                g = to_gray(read_image_bytes(Path(path).read_bytes(), name).pixels)
            except Exception:  # noqa: BLE001 - a file this machine cannot decode is left out
                continue
            if min(g.shape) < 64:  # upsample tiny test slices so they pass the size check like real ones
                from PIL import Image

                g = np.asarray(Image.fromarray(g).resize((g.shape[1] * 4, g.shape[0] * 4), Image.Resampling.BICUBIC))
            out += with_variants(f"{m}-{name}-{variant}", g, per_file, rng)
    return out


def _sample(data, name: str) -> np.ndarray:
    """scikit-image's sample ``name``; its one random sample (binary_blobs) seeded, so a fit can be repeated."""
    make = getattr(data, name)
    if name != "binary_blobs":
        return make()
    try:
        return make(rng=0)
    except TypeError:  # scikit-image before 0.21 names it seed
        return make(seed=0)


def photos(names: Iterable[str] = PHOTOS, per_photo: int = 4, variant: int = 0) -> list[tuple[str, bytes]]:
    """Gray-converted photographs from scikit-image's bundled samples (none if it is not installed)."""
    try:
        from skimage import data
    except ImportError:
        return []
    rng = np.random.default_rng(4000 + variant)
    out = []
    for name in names:
        try:
            g = to_gray(_sample(data, name))
        except Exception:  # noqa: BLE001 - a sample that needs a download is left out
            continue
        out += with_variants(f"photo-{name}-{variant}", g, per_photo, rng)
    return out


def files(paths: Iterable[str | Path]) -> list[tuple[str, bytes]]:
    """Image files (and the image files in folders) as (name, bytes)."""
    from ..data.imageio import is_image_file

    out = []
    for p in paths:
        p = Path(p)
        chosen = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q)) if p.is_dir() else [p]
        out += [(str(q), q.read_bytes()) for q in chosen]
    return out
