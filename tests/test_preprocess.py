import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonexray.data.datasets import load_dataset
from bonexray.data.preprocess import ImageCache, build_cache, letterbox, load_for_model
from bonexray.errors import DatasetError

from builders import (bonexray_cmd, leftovers, make_manifest, nonblank_lines, radiograph_like, run_main,
                      subprocess_env)
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


# --------------------------------------------------------------------------- damaged caches, worker failures


def _built_cache(tmp_path, capsys) -> tuple[Path, Path]:
    manifest = make_manifest(tmp_path / "d", n=6)
    rc, _, _ = run_main(capsys, "preprocess", manifest, "--out", tmp_path / "c", "--size", 16, "--quiet")
    assert rc == 0
    return manifest, tmp_path / "c"


@pytest.mark.parametrize("damage,words", [
    ("short images", "images.u8 has 1,024 bytes; meta.json says 6 images of 16x16 = 1,536 bytes"),
    ("cut index", "index.csv does not match the SHA-256 recorded in meta.json"),
    ("cut index, old meta", "index.csv has 4 rows; meta.json says 6 images"),
])
def test_damaged_cache_is_refused_or_rebuilt(damage, words, tmp_path, capsys):
    manifest, cache = _built_cache(tmp_path, capsys)
    if damage == "short images":
        with open(cache / "images.u8", "r+b") as f:
            f.truncate(4 * 16 * 16)
    else:
        lines = (cache / "index.csv").read_text().splitlines(keepends=True)
        (cache / "index.csv").write_text("".join(lines[:5]))
        if damage == "cut index, old meta":  # a cache written before meta.json had index_sha256
            meta = json.loads((cache / "meta.json").read_text())
            del meta["index_sha256"]
            (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="damaged cache") as info:
        ImageCache.open(cache)
    assert words in str(info.value) and str(cache) in str(info.value)
    rc, out, err = run_main(capsys, "preprocess", manifest, "--out", cache, "--size", 16, "--quiet")
    assert rc == 0 and "built cache" in out  # rebuilt, not "reused"
    assert nonblank_lines(err) == [f"bonexray preprocess: warning: {cache}: damaged cache ({words}); rebuilding it"]
    assert len(ImageCache.open(cache).index) == 6 and leftovers(cache) == []


def test_preprocess_worker_bug_is_an_error_not_unreadable(tmp_path, capsys, monkeypatch):
    import bonexray.data.preprocess as pre

    manifest = make_manifest(tmp_path / "d", n=40)
    real = pre.load_for_model

    def buggy(path, size):
        if path.endswith("img017.png"):
            raise KeyError("a bug")
        return real(path, size)

    monkeypatch.setattr(pre, "load_for_model", buggy)  # forked pool workers inherit it
    before = set(_children())  # servers that session fixtures started earlier in the run are not this pool
    for workers in ("1", "2"):
        rc, _, err = run_main(capsys, "preprocess", manifest, "--out", tmp_path / "c", "--size", 16, "--workers",
                              workers, "--quiet")
        assert rc == 2 and f"{tmp_path / 'd' / 'img017.png'}: preprocessing failed with an unexpected error" in err
        assert "KeyError: 'a bug'" in err and not (tmp_path / "c").exists()
    assert set(_children()) - before == set()  # the pool is gone after the error


def test_missing_decoder_is_a_setup_error(tmp_path, capsys, monkeypatch):
    import bonexray.data.preprocess as pre
    from bonexray.errors import MissingDecoderError

    manifest = make_manifest(tmp_path / "d", n=4)

    def no_decoder(path, size):
        raise MissingDecoderError(path, "no decoder installed for JPEG-LS Lossless pixel data (pip install x)")

    monkeypatch.setattr(pre, "load_for_model", no_decoder)
    rc, _, err = run_main(capsys, "preprocess", manifest, "--out", tmp_path / "c", "--workers", "1", "--quiet")
    assert rc == 2 and "no decoder installed" in err and "setup problem, not a bad image" in err


def _children(pid: int | None = None) -> list[int]:
    pid = pid or os.getpid()
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_die_with_a_killed_parent(tmp_path):
    rs_dir = tmp_path / "d"
    make_manifest(rs_dir, n=400)
    code = (  # slow decoding, so the run is still going when it is killed
        "import time, bonexray.data.preprocess as p\n"
        "real = p.load_for_model\n"
        "def slow(path, size):\n    time.sleep(0.05); return real(path, size)\n"
        "p.load_for_model = slow\n"
        "from bonexray.cli import main\n"
        f"main(['preprocess', r'{rs_dir / 'manifest.csv'}', '--out', r'{tmp_path / 'c'}', '--size', '16', "
        "'--workers', '2', '--quiet'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while len(_children(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the pool never started"
    finally:
        proc.kill()  # SIGKILL: no cleanup code of the parent runs
        proc.wait()
    deadline = time.time() + 5
    while any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in _state(w)]
    for w in alive:  # a failing run must not leave its orphans behind either
        os.kill(w, 9)
    assert alive == [], f"pool workers {alive} outlived their killed parent"


def _state(pid: int) -> str:
    try:
        return next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:")).lower()
    except (OSError, StopIteration):
        return "zombie"


# --------------------------------------------------------------------------- a cache two runs share


def _dataset(base: Path, n: int, invert: bool) -> Path:
    """A manifest of n images; ``invert`` gives other pixels under the same names and labels."""
    manifest = make_manifest(base, n=n)
    if invert:
        for png in base.glob("*.png"):
            Image.fromarray(255 - np.asarray(Image.open(png))).save(png)
    return manifest


def _assert_index_matches_pixels(cache_dir: Path) -> None:
    cache = ImageCache.open(cache_dir)
    for row in cache.index.itertuples():
        want, _ = load_for_model(row.path, cache.size)
        assert np.array_equal(cache.images[row.row], want), f"row {row.row} holds other pixels than {row.path}"


def test_two_preprocess_processes_into_one_cache_folder(tmp_path):
    a = _dataset(tmp_path / "A", 60, invert=False)
    b = _dataset(tmp_path / "B", 60, invert=True)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(bonexray_cmd("preprocess", m, "--out", cache, "--size", 64, "--workers", 1, "--quiet"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for m in (a, b)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and "Traceback" not in err, err
    _assert_index_matches_pixels(cache)
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".partial")]
    # The same dataset twice at once: one builds, the other reuses the finished cache.
    procs = [subprocess.Popen(bonexray_cmd("preprocess", a, "--out", tmp_path / "same", "--size", 64, "--workers", 1,
                                           "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env()) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("Traceback" not in err for _, err in outs)
    _assert_index_matches_pixels(tmp_path / "same")


def test_second_run_waits_for_the_lock_then_reuses(tmp_path):
    from bonexray.data.preprocess import cache_lock

    manifest = _dataset(tmp_path / "A", 8, invert=False)
    cache = tmp_path / "cache"
    with cache_lock(cache):  # another run is building this cache
        proc = subprocess.Popen(bonexray_cmd("preprocess", manifest, "--out", cache, "--size", 64, "--workers", 1,
                                             "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env())
        deadline = time.monotonic() + 5  # without the lock, an 8-image cache is done by then (or soon after)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and not (cache / "meta.json").exists()  # it waits, and writes nothing
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "another run is building this cache; waiting" in err
    _assert_index_matches_pixels(cache)


def test_replaced_image_with_same_size_and_mtime_is_not_reused(tmp_path):
    base = tmp_path / "data"
    manifest = make_manifest(base, n=4)
    for i, png in enumerate(sorted(base.glob("*.png"))):  # uncompressed: the size depends on the shape only
        Image.fromarray(radiograph_like(i)).save(png, compress_level=0)
    from bonexray.data.datasets import load_dataset

    first, reused = build_cache(load_dataset(manifest), tmp_path / "cache", size=64, workers=1, progress=False)
    assert not reused
    target = sorted(base.glob("*.png"))[0]
    st = target.stat()
    Image.fromarray(255 - radiograph_like(0)).save(target, compress_level=0)  # `cp -p` of another image
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    second, reused = build_cache(load_dataset(manifest), tmp_path / "cache", size=64, workers=1, progress=False)
    assert not reused
    _assert_index_matches_pixels(tmp_path / "cache")
