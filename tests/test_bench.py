"""The benchmark scripts run: gpu.py exits clearly without a GPU and its pieces work at toy size on CPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_gpu_bench_says_so_without_a_gpu(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load("gpu").main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gpu_bench_smoke_on_cpu(tmp_path):
    gpu = _load("gpu")
    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--json", str(out), "--work", str(tmp_path / "w")]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 24 and res["train_img_s"] > 0 and res["loader_img_s"] > 0 and res["predict_img_s"] > 0
    # The synthetic cache is a real bonexray cache: ImageCache opens it, labels and tiles are sane.
    from bonexray.data.preprocess import ImageCache

    cache = ImageCache.open(tmp_path / "w" / "cache")
    assert cache.images.shape == (24, 40, 40) and cache.images.max() > 150
    assert set(cache.index["abnormal"]) <= {0, 1}


def test_preprocess_bench_on_a_tiny_manifest(tmp_path, capsys):
    from builders import make_manifest

    manifest = make_manifest(tmp_path / "data", n=6)
    out = tmp_path / "pre.json"
    assert _load("preprocess").main(["--data", str(manifest), "--size", "32", "--rounds", "1", "--read-batches", "1",
                                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["rows"]] == ["naive (1 process)", "bonexray preprocess, 1 worker(s)",
                                                   "bonexray preprocess, 2 worker(s)"]
    assert all(r["img_s"] > 0 for r in res["rows"]) and res["cache_read_img_s"] > 0


def test_int8_quantization_keeps_the_model_card_and_the_answer(trained_checkpoint, tmp_path):
    inference = _load("inference")
    from bonexray.inference.backends import exported_onnx
    from bonexray.inference.predict import Predictor

    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(Path(trained_checkpoint).read_bytes())
    ref = Predictor(ckpt, device="cpu", backend="torch")
    inference.SIZE = ref.image_size
    calib, how = inference.calibration_images(None, None, n=8)
    int8 = Predictor(inference.quantize_int8(exported_onnx(ckpt).path, calib, tmp_path / "m.int8.onnx"), device="cpu")
    assert int8.card == ref.card and "synthetic" in how
    p8, _ = int8.predict_arrays(calib)
    p32, _ = ref.predict_arrays(calib)
    assert np.max(np.abs(p8 - p32)) < 0.1  # quantised, so close but not equal
