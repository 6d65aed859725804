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


def test_read_rows_gives_the_memmap_rows(tmp_path):
    cache, _ = build_cache(load_dataset(make_manifest(tmp_path / "d", n=6)), tmp_path / "c", size=32, workers=1,
                           progress=False)
    rows = [4, 0, 5, 5]
    assert np.array_equal(cache.read_rows(rows), np.asarray(cache.images[rows]))
    assert cache.read_rows([]).shape == (0, 32, 32)
    with pytest.raises(IndexError):
        cache.read_rows([6])


_RSS_PROBE = r"""
import json, resource, sys
import numpy as np
from bonexray.data.datasets import load_dataset
from bonexray.data.preprocess import build_cache

def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])

records = load_dataset(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cache, _ = build_cache(records, sys.argv[2], size=512, workers=1, progress=False)
build_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
now = rss_kb()
for i in range(0, len(cache.index), 16):  # what evaluate does: every row, batch by batch
    cache.read_rows(np.arange(i, min(i + 16, len(cache.index))))
read_growth = rss_kb() - now
from bonexray.training.datamodule import CacheDataset
n = len(cache.index)
train = CacheDataset(str(cache.root), cache.size, n, range(n), [0] * n, [0] * n)
now = rss_kb()
for i in range(n):  # what a training epoch does: every row, one item at a time
    train[i]
print(json.dumps({"build_kb": build_growth, "read_kb": read_growth, "train_kb": rss_kb() - now,
                  "cache_kb": cache.images.nbytes // 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_building_and_reading_a_cache_does_not_keep_it_resident(tmp_path):
    """Pages written or read through a memory map stay in the process's RSS: preprocess, evaluate and
    a training epoch would hold the whole cache (4 GB for MURA at 320 px). None may grow by more than a
    third of it."""
    manifest = make_manifest(tmp_path / "d", n=160)
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(manifest), str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["cache_kb"] > 30_000
    assert got["build_kb"] < got["cache_kb"] / 3, got
    assert got["read_kb"] < got["cache_kb"] / 3, got
    assert got["train_kb"] < got["cache_kb"] / 3, got
