"""The ONNX predict path is torch-free: ``bonexray predict MODEL.onnx`` reads the card, runs onnxruntime,
decodes boxes (numpy), applies the scope gate and writes its record without importing torch, timm,
Lightning or torchvision."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from builders import radiograph_like

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "torchvision", "timm", "lightning", "sklearn", "matplotlib")
PARTS = ["hand", "leg", "shoulder"]


@pytest.fixture(scope="module")
def box_onnx(tmp_path_factory) -> Path:
    """A random box-head model exported to ONNX, with a box threshold of 0 so every image gets boxes."""
    import torch

    from bonexray.inference.export import export_onnx
    from bonexray.model.checkpoint import ModelCard, save_model
    from bonexray.model.network import BoneXrayNet

    base = tmp_path_factory.mktemp("onnx-path")
    torch.manual_seed(2)
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=len(PARTS), pretrained=None, box_head=True)
    card = ModelCard(backbone="efficientnet_lite0", image_size=64, body_parts=PARTS,
                     boxes={"threshold": 0.0, "nms_iou": 0.5, "max_detections": 5})
    return export_onnx(save_model(base / "m.ckpt", net, card), base / "m.onnx")


def _predict_in_fresh_process(args: list[str]) -> tuple[list[dict], list[str]]:
    """(records, heavy modules imported) of ``bonexray predict ARGS`` in a new interpreter."""
    code = ("import json, sys\nfrom bonexray.cli import main\nrc = main(sys.argv[1:])\n"
            f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, "predict", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    *lines, last = done.stdout.strip().splitlines()
    status = json.loads(last)
    assert status["rc"] == 0, done.stderr
    return [json.loads(line) for line in lines], status["heavy"]


def test_predict_on_an_onnx_file_imports_no_torch(box_onnx, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(radiograph_like(4, 120, 90, abnormal=1)).save(image)
    records, heavy = _predict_in_fresh_process([str(box_onnx), str(image)])
    assert heavy == []
    (record,) = records
    assert record["path"] == str(image) and record["in_scope"] is True and record["body_part"] in PARTS
    assert record["boxes"], "the box decoder ran (threshold 0 gives boxes)"
    assert all(0 <= b["x0"] < b["x1"] <= 90 and 0 <= b["y0"] < b["y1"] <= 120 for b in record["boxes"])


def test_the_fresh_process_check_sees_torch_where_it_is_imported(tmp_path):
    """The check above can fail: a checkpoint on the torch engine imports torch, and it is seen."""
    from builders import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    image = tmp_path / "x.png"
    Image.fromarray(radiograph_like(4, 120, 90)).save(image)
    _, heavy = _predict_in_fresh_process([str(ckpt), str(image), "--backend", "torch"])
    assert "torch" in heavy
