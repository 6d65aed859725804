"""The default inference engine: a checkpoint runs through its cached ONNX export, with torch's answers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import radiograph_like
from conftest import SHARED_DATA, requires_shared_data

from bonexray.cli import main
from bonexray.data.preprocess import letterbox, load_for_model
from bonexray.inference import backends
from bonexray.inference.predictor import Predictor

PROB_TOL = 1e-4


@pytest.fixture()
def ckpt(trained_checkpoint, tmp_path) -> Path:
    """A private copy of the trained checkpoint, so the export cached beside it is this test's own."""
    target = tmp_path / "run" / "best.ckpt"
    target.parent.mkdir()
    shutil.copy(trained_checkpoint, target)
    return target


def _synthetic(size: int, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(1)
    tiles = [letterbox(radiograph_like(i, 120 + 10 * i, 90, abnormal=i % 2), size) for i in range(n - 2)]
    tiles += [rng.integers(0, 256, (size, size), dtype=np.uint8), np.zeros((size, size), np.uint8)]
    return np.stack(tiles)


def _assert_same_probs(a: Predictor, b: Predictor, batch: np.ndarray) -> None:
    pa, ba = a.predict_arrays(batch)
    pb, bb = b.predict_arrays(batch)
    assert np.max(np.abs(pa - pb)) <= PROB_TOL
    assert np.max(np.abs(ba - bb)) <= PROB_TOL


def test_default_backend_is_onnx_on_cpu_and_matches_torch(ckpt):
    fast, ref = Predictor(ckpt, device="cpu"), Predictor(ckpt, device="cpu", backend="torch")
    assert (fast.backend, ref.backend) == ("onnx", "torch")
    assert fast.card == ref.card
    batch = _synthetic(fast.image_size)
    _assert_same_probs(fast, ref, batch)
    # One image at a time (batch 1) and with flip TTA too.
    _assert_same_probs(fast, ref, batch[:1])
    _assert_same_probs(Predictor(ckpt, device="cpu", tta="flip"), Predictor(ckpt, device="cpu", tta="flip", backend="torch"),
                       batch)


@requires_shared_data
def test_default_backend_matches_torch_on_real_radiographs(ckpt):
    fast, ref = Predictor(ckpt, device="cpu"), Predictor(ckpt, device="cpu", backend="torch")
    jpegs = sorted((SHARED_DATA / "FracAtlas" / "images" / "Fractured").glob("*.jpg"))[:4]
    jpegs += sorted((SHARED_DATA / "FracAtlas" / "images" / "Non_fractured").glob("*.jpg"))[:4]
    dicoms = sorted(p for p in (SHARED_DATA / "dicom").rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm"))[:2]
    batch = np.stack([load_for_model(p, fast.image_size)[0] for p in jpegs + dicoms])
    _assert_same_probs(fast, ref, batch)


def test_export_is_cached_beside_the_checkpoint_keyed_by_its_content(ckpt, monkeypatch):
    Predictor(ckpt, device="cpu")
    digest = backends.checkpoint_digest(ckpt)
    cached = ckpt.with_name(f"best.ckpt.{digest[:backends.DIGEST_CHARS]}.onnx")
    assert cached.is_file()
    assert [p.name for p in ckpt.parent.iterdir() if p.suffix == ".onnx"] == [cached.name]

    def no_export(*a, **k):
        raise AssertionError("exported again although the cached file fits")

    monkeypatch.setattr("bonexray.inference.export.export_onnx", no_export)
    assert Predictor(ckpt, device="cpu").backend == "onnx"
    # Another checkpoint's bytes -> another key: never the stale graph.
    with open(ckpt, "ab") as f:
        f.write(b"\0")
    assert backends.checkpoint_digest(ckpt) != digest
    with pytest.raises(AssertionError, match="exported again"):
        Predictor(ckpt, device="cpu")


def test_unwritable_checkpoint_folder_falls_back_to_user_cache_then_memory(ckpt, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    user = tmp_path / "user-onnx"
    digest = backends.checkpoint_digest(ckpt)
    monkeypatch.setattr(backends, "onnx_cache_locations", lambda c, d: [blocked / "x.onnx", user / f"{d[:8]}.onnx"])
    pr = Predictor(ckpt, device="cpu")
    assert pr.backend == "onnx" and (user / f"{digest[:8]}.onnx").is_file()

    monkeypatch.setattr(backends, "onnx_cache_locations", lambda c, d: [blocked / "x.onnx", blocked / "y.onnx"])
    made = []
    real_mkdtemp = backends.tempfile.mkdtemp
    monkeypatch.setattr(backends.tempfile, "mkdtemp", lambda **k: made.append(real_mkdtemp(**k)) or made[-1])
    in_memory = Predictor(ckpt, device="cpu")
    assert in_memory.backend == "onnx"
    assert made and not os.path.exists(made[0])  # the scratch export is gone once loaded
    _assert_same_probs(in_memory, Predictor(ckpt, device="cpu", backend="torch"), _synthetic(pr.image_size, 3))


def test_failed_export_falls_back_to_torch_under_auto_only(ckpt, monkeypatch, capsys):
    from bonexray.errors import BonexrayError

    def broken(*a, **k):
        raise BonexrayError("ONNX export differs from the torch model")

    monkeypatch.setattr("bonexray.inference.export.export_onnx", broken)
    assert Predictor(ckpt, device="cpu").backend == "torch"
    assert "running it with PyTorch" in capsys.readouterr().err
    with pytest.raises(BonexrayError, match="differs"):
        Predictor(ckpt, device="cpu", backend="onnx")


def test_cam_gets_the_torch_network_of_an_onnx_run(ckpt):
    pr = Predictor(ckpt, device="cpu")
    assert pr.backend == "onnx" and pr._net is None  # not loaded unless needed
    assert pr.net is not None and pr.net.num_body_parts == len(pr.body_parts)


def test_backend_choice_on_the_command_line(ckpt, tmp_path, capsys):
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(radiograph_like(3)).save(img)
    outs = {}
    for backend in ("torch", "onnx", "auto"):
        assert main(["predict", str(ckpt), str(img), "--backend", backend]) == 0
        outs[backend] = json.loads(capsys.readouterr().out.splitlines()[0])["prob_abnormal"]
    assert outs["onnx"] == pytest.approx(outs["torch"], abs=PROB_TOL) and outs["auto"] == outs["onnx"]
    onnx_file = next(ckpt.parent.glob("*.onnx"))
    assert main(["predict", str(onnx_file), str(img), "--backend", "torch"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_physical_cores_is_within_the_allowed_cpus():
    assert 1 <= backends.physical_cores() <= len(os.sched_getaffinity(0))
