import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bonexray.data.datasets import load_dataset
from bonexray.data.preprocess import ImageCache, build_cache, letterbox
from bonexray.errors import DatasetError

from builders import make_manifest
from conftest import SHARED_DATA, requires_shared_data


def test_letterbox_keeps_aspect_and_pads():
    img = np.full((100, 50), 255, np.uint8)
    out = letterbox(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    cols = np.where(out.max(axis=0) > 0)[0]
    assert 30 <= len(cols) <= 34 and out[:, 0].max() == 0  # 32 px wide content, black padding
    assert letterbox(np.zeros((10, 10), np.uint16), 16).shape == (16, 16)


def test_build_reuse_and_bad_files(tmp_path):
    manifest = make_manifest(tmp_path / "d", n=8)
    (tmp_path / "d" / "img003.png").write_bytes(b"not a png at all")
    rs = load_dataset(manifest)
    cache, reused = build_cache(rs, tmp_path / "c", size=32, workers=2, progress=False)
    assert not reused and cache.images.shape == (8, 32, 32)
    st = cache.index.set_index("path")["status"]
    assert st[str(tmp_path / "d" / "img003.png")] == "unreadable"
    assert (st == "ok").sum() == 7
    row = cache.index[cache.index["status"] == "unreadable"].iloc[0]
    assert row["reason"]
    ok_row = cache.index[cache.index["status"] == "ok"].iloc[0]
    assert cache.images[ok_row["row"]].max() == 200  # bone bar survives
    again, reused = build_cache(rs, tmp_path / "c", size=32, progress=False)
    assert reused
    # Different size or changed file -> rebuilt.
    _, reused = build_cache(rs, tmp_path / "c", size=48, progress=False)
    assert not reused
    os.utime(tmp_path / "d" / "img000.png", ns=(1, 1))  # a new date alone: same bytes, reused
    _, reused = build_cache(rs, tmp_path / "c", size=48, progress=False)
    assert reused
    Image.fromarray(255 - np.asarray(Image.open(tmp_path / "d" / "img000.png"))).save(tmp_path / "d" / "img000.png")
    _, reused = build_cache(rs, tmp_path / "c", size=48, progress=False)
    assert not reused


def test_incomplete_cache_is_never_taken_as_complete(tmp_path):
    rs = load_dataset(make_manifest(tmp_path / "d", n=4))
    build_cache(rs, tmp_path / "c", size=16, progress=False)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    meta["complete"] = False
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="incomplete"):
        ImageCache.open(tmp_path / "c")
    _, reused = build_cache(rs, tmp_path / "c", size=16, progress=False)
    assert not reused


def test_killed_preprocess_leaves_no_complete_cache(tmp_path):
    """Kill a real preprocess run mid-way: the folder must not pass as a finished cache."""
    rs_dir = tmp_path / "d"
    make_manifest(rs_dir, n=300)
    code = (
        "import sys, time, bonexray.data.preprocess as p\n"
        "orig = p._decode_one\n"
        "def slow(a):\n    time.sleep(0.02); return orig(a)\n"
        "p._decode_one = slow\n"
        "from bonexray.cli import main\n"
        f"main(['preprocess', r'{rs_dir / 'manifest.csv'}', '--out', r'{tmp_path / 'c'}', '--size', '16', '--workers', '1', '--quiet'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = 30
    import time

    t0 = time.time()
    while not list((tmp_path / "c").glob(".images.u8.*.partial")) and time.time() - t0 < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "c" / "meta.json").exists()
    with pytest.raises(DatasetError):
        ImageCache.open(tmp_path / "c")


@requires_shared_data
def test_fracatlas_subset_with_truncated_jpeg(tmp_path):
    rs = load_dataset(SHARED_DATA / "FracAtlas")
    from bonexray.data.imageio import read_image

    # Pick a few images including at least one truncated JPEG (found by the decoder itself).
    picked = rs.records[:6]
    truncated = next((r for r in rs.records[-700:] if read_image(r.path, draft_size=64).truncated), None)
    assert truncated is not None, "expected a truncated JPEG among the last 700 FracAtlas images (ids 40xx)"
    rs.records = picked + [truncated]
    cache, _ = build_cache(rs, tmp_path / "c", size=64, workers=1, progress=False)
    assert cache.index["status"].iloc[-1] == "truncated"
    assert (cache.index["status"].iloc[:-1] == "ok").all()
    assert cache.images[-1].std() > 5  # decoded content, not an empty frame
