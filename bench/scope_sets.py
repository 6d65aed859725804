"""The image sets of bench/scope.py: what the gate is fitted on and what it is measured on, kept apart.

Fit: synthetic images and rendered text (variant 0), CT and MR slices, the first half of the photo
samples, the odd-numbered chest films of ../shared/data/ood-radiographs, and inverted and turned
(90/180/270 degrees, upside down) train-split FracAtlas images. Measured (never fitted on): synthetic
images and text of another seed (variant 1), US and NM slices (modalities the gate never saw), the
other half of the photos, the even-numbered chest films, the pydicom-data chest CR (RG1, as gray
pixels and as its DICOM file); bench/scope.py adds turned test-split images.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from bonexray.inference import outliers  # noqa: E402

CHEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ood-radiographs"
HALF = len(outliers.PHOTOS) // 2
#: Inverted train images in the fit sets (small: the embedding runs on a shared 2-core machine).
N_INVERTED = 40
#: Turned train images in the fit sets, cycling through outliers.TURNS.
N_ROTATED = 160


def chest_films(fit: bool) -> list[tuple[str, bytes]]:
    files = sorted(CHEST.glob("*.png")) if CHEST.is_dir() else []
    return [(str(f), f.read_bytes()) for i, f in enumerate(files) if (i % 2 == 1) == fit]


def _gray(name: str, data: bytes) -> np.ndarray:
    from bonexray.data.imageio import read_image_bytes, to_uint8

    return outliers.to_gray(to_uint8(read_image_bytes(data, name).pixels))


def inverted(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return [(f"inverted-{Path(name).name}.png", outliers.png(255 - _gray(name, data))) for name, data in items]


def turned(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Each item turned by the next of outliers.TURNS in turn."""
    out = []
    for i, (name, data) in enumerate(items):
        t = outliers.TURNS[i % len(outliers.TURNS)]
        out.append((f"{t}-{Path(name).name}.png", outliers.png(outliers.turned(_gray(name, data), t))))
    return out


def fit_sets(train_items) -> dict[str, list]:
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train_items), min(N_INVERTED, len(train_items)), replace=False)
    turn = rng.choice(len(train_items), min(N_ROTATED, len(train_items)), replace=False)  # may share images with pick
    return {"synthetic": outliers.synthetic(120, 0), "rendered text": outliers.rendered_text(30, 0),
            "CT/MR slices": outliers.dicom_slices(("CT", "MR"), 1, 0),
            "photos (gray)": outliers.photos(outliers.PHOTOS[:HALF], 1, 0),
            "chest films": chest_films(True), "inverted radiographs": inverted([train_items[i] for i in pick]),
            "turned radiographs": turned([train_items[i] for i in turn])}


def chest_cr() -> list[tuple[str, bytes]]:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    p = get_testdata_file("RG1_UNCR.dcm")
    return [] if p is None else [("RG1_UNCR.dcm", Path(p).read_bytes())]


def eval_sets() -> dict[str, list]:
    from bonexray.data.imageio import read_image_bytes, to_uint8

    cr = chest_cr()
    cr_pixels = [("RG1_UNCR-pixels.png", outliers.png(outliers.to_gray(to_uint8(read_image_bytes(d, n).pixels))))
                 for n, d in cr]
    return {"synthetic (other seed)": outliers.synthetic(20, 1), "rendered text (other seed)": outliers.rendered_text(15, 1),
            "US/NM slices (unseen modalities)": outliers.dicom_slices(("US", "NM"), 1, 1),
            "photos (gray, unseen photos)": outliers.photos(outliers.PHOTOS[HALF:], 1, 1),
            "chest films (held-out half)": chest_films(False),
            "chest CR RG1 (gray pixels only)": cr_pixels, "chest CR RG1 (DICOM file)": cr}
