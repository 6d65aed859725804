"""bench/pointing_game.py: its geometry is the package's letterbox geometry, and it runs end to end."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bonexray.data.preprocess import letterbox
from builders import make_checkpoint, make_fracatlas_tree

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("pointing_game", REPO / "bench" / "pointing_game.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("h,w,size", [(454, 363, 64), (363, 454, 128), (100, 37, 64), (75, 75, 32), (1760, 1761, 320)])
def test_pointing_game_geometry_matches_letterbox(h, w, size):
    pg = _load_bench()
    content = letterbox(np.full((h, w), 255, np.uint8), size) > 0
    np.testing.assert_array_equal(content, pg.content_mask((w, h), size))
    # A bright square at a known place: the letterboxed peak lies in the square's tile box (within a model pixel).
    img = np.zeros((h, w), np.uint8)
    y0, x0, s = h // 3, w // 2, max(4, min(h, w) // 5)
    img[y0 : y0 + s, x0 : x0 + s] = 255
    r, c = pg.peak_of(letterbox(img, size).astype(float), content)
    px = max(h, w) / size  # one model pixel in original pixels
    assert pg.pixel_in_boxes(r, c, pg.tile_boxes([[x0, y0, s, s]], px, (w, h), (w, h), size))
    far = [[0, 0, 1, 1]] if x0 > w / 4 else [[w - 1, h - 1, 1, 1]]
    assert not pg.pixel_in_boxes(r, c, pg.tile_boxes(far, 0.0, (w, h), (w, h), size))
    # Decoded at half size (JPEG draft): annotated boxes still land on the same tile pixels.
    half = pg.tile_boxes([[x0, y0, s, s]], 0.0, (w // 2, h // 2), (w, h), size)
    full = pg.tile_boxes([[x0, y0, s, s]], 0.0, (w, h), (w, h), size)
    np.testing.assert_allclose(half, full, atol=2.0)
    assert pg.covered_fraction([[0, 0, w / 2, h]], w, h, 0) == pytest.approx(0.5, abs=2 / w)


def test_pointing_game_runs_on_a_fracatlas_tree(tmp_path):
    data = make_fracatlas_tree(tmp_path, n_groups=4, per_group=2)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", body_parts=("hand", "leg"))
    out = tmp_path / "pg.json"
    rc = _load_bench().main([str(ckpt), "--data", str(data), "--bootstrap", "50", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["n_images"] == 3  # 4 fractured images, one left unannotated by the builder
    oracle = next(r for r in result["results"] if r["method"].startswith("oracle"))
    assert oracle["tol0"]["hit_rate"] == 1.0
