"""The benchmark scripts run: gpu.py exits clearly without a GPU and its pieces work at toy size on CPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

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
    from bonexray.inference.predictor import Predictor

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


def _metrics(folder: Path, auroc, ap, kappa, body_acc):
    folder.mkdir(parents=True)
    image = {"auroc": auroc, "average_precision": ap, "recall": 0.8, "specificity": 0.9, "kappa": kappa}
    folder.joinpath("metrics.json").write_text(json.dumps({
        "abnormality": {"image": image, "study": {"auroc": auroc}, "ci95": {"image_auroc": [auroc - 0.02, auroc + 0.02]}},
        "body_part": {"accuracy": body_acc, "macro_f1": 0.9}, "split": "test", "threshold": 0.5,
        "n_images": 10, "n_studies": 4}))
    return folder


def test_results_row_prints_means_and_the_difference_of_means(tmp_path, capsys):
    rows = _load("results_row")
    a = [_metrics(tmp_path / "a0", 0.96, 0.88, 0.72, 0.98), _metrics(tmp_path / "a1", 0.94, 0.84, 0.68, 0.97)]
    b = [_metrics(tmp_path / "b0", 0.93, 0.83, 0.66, 0.99), _metrics(tmp_path / "b1", 0.91, None, 0.64, 0.97)]
    rows.main([str(p) for p in a] + ["--minus"] + [str(p) for p in b])
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| a0 (test, tta none) | 0.960 [0.940, 0.980] | 0.880 |")
    assert out[4] == "| mean of 2: a0, a1 | 0.950 (0.940-0.960) | 0.860 | 0.800 / 0.900 | 0.700 | 0.950 | 0.975 / 0.900 | |"
    # b1 has no AP, so b's mean AP and the AP difference are undefined, not computed from b0 alone.
    assert out[7] == "| mean of 2: b0, b1 | 0.920 (0.910-0.930) | n/a | 0.800 / 0.900 | 0.650 | 0.920 | 0.980 / 0.900 | |"
    assert out[8] == ("| difference of means | +0.030 | n/a | +0.000 / +0.000 | +0.050 | +0.030 | -0.005 / +0.000 | |")


def test_results_row_names_a_folder_without_metrics(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="nope: no readable metrics.json"):
        _load("results_row").main([str(tmp_path / "nope")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(SystemExit, match="other/metrics.json: not a bonexray evaluate metrics.json"):
        _load("results_row").main([str(tmp_path / "other")])


def test_scale_bench_tree_is_mura_layout_with_distinct_images(tmp_path):
    """bench/scale.py's trees: MURA-v1.1's folders and CSVs, read by the MURA reader without a problem,
    no two image files identical although 40 images come from 4 sources, labels by the stated rule."""
    import csv
    import hashlib

    from PIL import Image

    from bonexray.data.datasets import load_dataset
    from builders import radiograph_like

    scale = _load("scale")
    src = tmp_path / "FracAtlas" / "images" / "Fractured"
    src.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(radiograph_like(i, 120, 100)).save(src / f"IMG{i:07d}.jpg")
    root = scale.build_tree(tmp_path / "t", 40, tmp_path / "FracAtlas", seed=0)
    records = load_dataset(root)
    assert records.source == "mura" and len(records.records) == 40 and records.problems == []
    files = sorted(root.rglob("*.png"))
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 40
    assert {r.split for r in records.records} == {"train", "valid"}
    layout = scale.tree_layout(40)
    for r in records.records:  # label and body part follow the rule, and the CSV agrees with the folder name
        split, part, patient, study, label, number = next(x for x in layout if
                                                          r.path.endswith(f"XR_{x[1]}/{x[2]}/{x[3]}_"
                                                                          f"{'positive' if x[4] else 'negative'}/image{x[5]}.png"))
        assert (r.split, r.body_part, r.abnormal) == (split, part.lower(), label)
    with open(root / "train_labeled_studies.csv") as f:
        rows = list(csv.reader(f))
    assert all(row[0].startswith("MURA-v1.1/train/XR_") and row[0].endswith("/") and row[1] in "01" for row in rows)
    # Reused, not rebuilt, when asked again with the same rule.
    stamp = (root / ".scale-bench.json").stat().st_mtime_ns
    scale.build_tree(tmp_path / "t", 40, tmp_path / "FracAtlas", seed=0)
    assert (root / ".scale-bench.json").stat().st_mtime_ns == stamp


def test_scale_bench_judges_the_targets():
    scale = _load("scale")
    rows = [{"n": n, "stage": "predict", "items": n, "seconds": s, "s_per_image": s / n, "peak_rss_mb": rss,
             "peak_tree_rss_mb": rss, "peak_tree_anon_mb": rss} for n, s, rss in ((1000, 10.0, 800), (4000, 52.0, 1900))]
    rows += [{"n": n, "stage": "preprocess", "items": n, "seconds": 1.0, "s_per_image": 1.0 / n, "peak_rss_mb": 100,
              "peak_tree_rss_mb": 100, "peak_tree_anon_mb": 50, "cache_mb": c} for n, c in ((1000, 100), (4000, 400))]
    v = {x["stage"]: x for x in scale.judge(rows)}["predict"]
    assert v["time_per_image_change"] == pytest.approx(0.30) and not v["time_target_met"]
    assert v["rss_growth_mb"] == 1100 and not v["rss_flat"] and v["rss_under_2gb"] and v["holds_all_images"]
    assert v["marginal_s_per_image"] == pytest.approx(42.0 / 3000) and v["startup_s"] == pytest.approx(10 - 14.0)


def test_scale_bench_judges_linearity_by_the_marginal_cost_and_training_without_start_up():
    """Three sizes: the cost of one more image over the lower pair of sizes against the upper pair; the
    train row (start-up plus fixed steps) gets no time verdict, its "train steps" row does."""
    scale = _load("scale")

    def row(stage, n, items, seconds):
        return {"n": n, "stage": stage, "items": items, "seconds": seconds, "s_per_image": seconds / items,
                "peak_rss_mb": 900, "peak_tree_rss_mb": 900, "peak_tree_anon_mb": 600}

    # evaluate: 10 s start-up + 5 ms per image up to 10k, then 8 ms per image: not linear.
    rows = [row("evaluate", 2000, 2000, 20.0), row("evaluate", 10000, 10000, 60.0), row("evaluate", 40000, 40000, 300.0)]
    rows += [row("predict", n, n, 10.0 + 0.006 * n) for n in (2000, 10000, 40000)]
    rows += [row("train", n, 64, 10.0 + n / 4000) for n in (2000, 10000, 40000)]
    rows += [row("train steps", n, 320, s) for n, s in ((2000, 8.2), (10000, 8.0), (40000, 7.8))]
    v = {x["stage"]: x for x in scale.judge(rows)}
    assert v["evaluate"]["marginal_change"] == pytest.approx(0.008 / 0.005 - 1) and not v["evaluate"]["marginal_target_met"]
    assert v["predict"]["marginal_change"] == pytest.approx(0.0) and v["predict"]["marginal_target_met"]
    assert v["train"]["time_target_met"] is None  # start-up grows with N: judged on "train steps"
    assert v["train steps"]["time_target_met"] and v["train steps"]["time_per_image_change"] == pytest.approx(0.4 / 8.2)


def test_adversarial_script_covers_every_item_and_its_fast_items_pass(tmp_path):
    """bench/adversarial.py, the pass over issue 32's items 1-20, cannot rot: its fast items (no model, no
    server; the real CLI in a subprocess) run here, and a failing item makes its exit status 1."""
    adversarial = _load("adversarial")
    assert [key for key, *_ in adversarial.ITEMS] == [str(n) for n in range(1, 21)]
    lines: list[str] = []
    results = adversarial.run_items(fast_only=True, base=tmp_path, echo=lines.append)
    assert set(results) == {"10", "14", "16"} and len(lines) == 3
    assert all(o.ok is True for o in results.values()), lines
    assert all(line.endswith("| PASS") for line in lines)


def test_adversarial_script_exits_1_when_an_item_fails(monkeypatch, capsys):
    adversarial = _load("adversarial")
    monkeypatch.setattr(adversarial, "ITEMS", [("x", "an item whose answer is wrong", True,
                                                lambda ws: adversarial.Outcome("refused", "accepted", False))])
    assert adversarial.main(["--fast"]) == 1
    out = capsys.readouterr().out
    assert "| FAIL" in out and "0 PASS, 1 FAIL (x)" in out


def test_box_postprocess_flags_a_hit_a_duplicate_and_a_miss():
    _tp_flags = _load("box_postprocess")._tp_flags

    truth = np.array([[10.0, 10.0, 30.0, 30.0]])
    boxes = np.array([[10.0, 10.0, 30.0, 30.0, 0.9],   # on the fracture: the hit
                      [11.0, 11.0, 30.0, 30.0, 0.8],   # on the same fracture again: a duplicate
                      [60.0, 60.0, 80.0, 80.0, 0.7]])  # elsewhere: a false positive
    assert _tp_flags([(boxes, truth)]) == [(0.9, 1), (0.8, -1), (0.7, 0)]
    assert _tp_flags([(boxes[:1], np.zeros((0, 4)))]) == [(0.9, 0)]
