"""bonexray export: a valid ONNX file with the model card, dynamic batch, same answers as the checkpoint."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from bonexray.cli import main
from bonexray.inference.export import export_onnx
from bonexray.inference.onnx_format import ONNX_CARD_KEY
from bonexray.predict import run_predict
from bonexray.inference.predictor import Predictor
from bonexray.model.checkpoint import ModelCard, load_model, save_model
from bonexray.model.network import BoneXrayNet
from builders import nonblank_lines, radiograph_like, run_main, strict_json_lines
from conftest import SHARED_DATA

PARTS = ["hand", "leg", "shoulder"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=3, pretrained=None)
    card = ModelCard(backbone="efficientnet_lite0", image_size=64, body_parts=PARTS, threshold=0.42)
    ckpt = save_model(base / "m.ckpt", net, card)
    return ckpt, export_onnx(ckpt, base / "m.onnx")


def parity_inputs(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        p = tmp_path / f"synthetic{i}.png"
        Image.fromarray(radiograph_like(i, 120, 90, abnormal=i % 2)).save(p)
        paths.append(p)
    if SHARED_DATA.is_dir():
        frac = SHARED_DATA / "FracAtlas" / "images"
        paths += [frac / "Fractured" / "IMG0000019.jpg", frac / "Non_fractured" / "IMG0000000.jpg",
                  SHARED_DATA / "dicom" / "RG3_UNCR.dcm"]
    return paths


def test_onnx_is_valid_and_carries_the_model_card(exported):
    ckpt, onnx_path = exported
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    _, card = load_model(ckpt)
    assert json.loads(meta[ONNX_CARD_KEY]) == card.to_dict()
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["abnormal_logit", "body_part_logits", "embedding"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 64, 64]
    assert not [p for p in onnx_path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_matches_torch_logits(exported, batch):
    ckpt, onnx_path = exported
    net, _ = load_model(ckpt)
    x = torch.rand(batch, 1, 64, 64, generator=torch.Generator().manual_seed(batch))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    abn, bp = sess.run(["abnormal_logit", "body_part_logits"], {"image": x.numpy()})
    assert abn.shape == (batch,) and bp.shape == (batch, 3)
    with torch.inference_mode():
        t_abn, t_bp = net(x)
    np.testing.assert_allclose(abn, t_abn.numpy(), atol=1e-4)
    np.testing.assert_allclose(bp, t_bp.numpy(), atol=1e-4)


def test_predict_on_onnx_equals_checkpoint(exported, tmp_path):
    ckpt, onnx_path = exported
    paths = parity_inputs(tmp_path)
    outs = {}
    for model in (ckpt, onnx_path):
        buf = io.StringIO()
        assert run_predict(model, paths, batch_size=2, stream=buf) == 0
        outs[model.suffix] = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    a, b = outs[".ckpt"], outs[".onnx"]
    assert [r["path"] for r in a] == [r["path"] for r in b] == [str(p) for p in paths]
    keys = ["prob_abnormal", *(f"prob_{p}" for p in PARTS)]
    diff = max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in keys)
    assert diff < 1e-4, diff
    assert [(r["abnormal"], r["body_part"]) for r in a] == [(r["abnormal"], r["body_part"]) for r in b]
    # Raw probabilities (not rounded for output) agree as well; the threshold comes from the card.
    from bonexray.data.preprocess import load_for_model

    arr = np.stack([load_for_model(p, 64)[0] for p in paths])
    pt, po = Predictor(ckpt), Predictor(onnx_path)
    assert po.threshold == pytest.approx(0.42) and po.body_parts == PARTS
    for x, y in zip(pt.predict_arrays(arr), po.predict_arrays(arr)):
        assert np.max(np.abs(x - y)) < 1e-4


def test_cli_export_and_onnx_cam_refused(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / "sub" / "cli.onnx"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    img = tmp_path / "a.png"
    Image.fromarray(radiograph_like(0)).save(img)
    rc = main(["predict", str(out), str(img), "--cam", str(tmp_path / "cams")])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert "--cam needs the checkpoint" in captured.err
    assert not (tmp_path / "cams").exists()


def test_export_of_a_bad_checkpoint_fails_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"nope")
    assert main(["export", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "bad.ckpt" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_without_card_is_rejected(tmp_path, capsys):
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3)), x.mean(dim=(2, 3)).repeat(1, 3)

    path = tmp_path / "plain.onnx"
    torch.onnx.export(Plain(), (torch.rand(1, 1, 8, 8),), str(path), input_names=["image"],
                      output_names=["abnormal_logit", "body_part_logits"], dynamo=False)
    img = tmp_path / "a.png"
    Image.fromarray(radiograph_like(0)).save(img)
    assert main(["predict", str(path), str(img)]) == 2
    assert "no bonexray model card" in capsys.readouterr().err


# --------------------------------------------------------------------------- damaged ONNX files, contradicting cards


@pytest.fixture(scope="module")
def good_onnx(good_ckpt) -> Path:
    from bonexray.inference.export import export_onnx

    return export_onnx(good_ckpt, good_ckpt.with_name("good.onnx"))


def test_damaged_onnx_is_refused_by_name(good_onnx, images, tmp_path, capsys):
    import onnx

    rc, out, _ = run_main(capsys, "predict", good_onnx, *images)
    assert rc == 0 and len(strict_json_lines(out)) == 2
    model = onnx.load(str(good_onnx))
    weights = max(model.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data = bytearray(good_onnx.read_bytes())
    at = data.find(weights) + len(weights) // 2
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    flipped = tmp_path / "flipped.onnx"
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good_onnx.read_bytes()[:5000])
    for bad, words in ((flipped, "corrupt ONNX model (weights do not match their recorded SHA-256)"),
                       (truncated, "corrupt ONNX model")):
        rc, out, err = run_main(capsys, "predict", bad, *images)
        assert rc == 2 and out == "" and f"{bad}: {words}" in err and len(nonblank_lines(err)) == 1


def _edit_onnx_card(src: Path, dst: Path, **changes) -> Path:
    import onnx

    from bonexray.inference.export import ONNX_HASH_KEY, onnx_graph_sha256
    from bonexray.inference.onnx_format import ONNX_CARD_KEY

    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    card = json.loads(meta[ONNX_CARD_KEY])
    card.update(changes)
    for p in model.metadata_props:
        if p.key == ONNX_CARD_KEY:
            p.value = json.dumps(card)
    for p in model.metadata_props:  # a consistent file: the hash recomputed over the edited card
        if p.key == ONNX_HASH_KEY:
            p.value = onnx_graph_sha256(model)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("changes,words", [
    ({"body_parts": ["hand", "wrist", "elbow"]}, "names 3 body parts but the graph has 2 body-part outputs"),
    ({"body_parts": ["hand"]}, "names 1 body parts but the graph has 2"),
    ({"body_parts": []}, "no body_parts"),
    ({"image_size": 128}, "image_size 128 but the graph takes input"),
])
def test_onnx_card_is_checked_against_the_graph(changes, words, good_onnx, images, tmp_path, capsys):
    bad = _edit_onnx_card(good_onnx, tmp_path / "bad.onnx", **changes)
    rc, out, err = run_main(capsys, "predict", bad, *images)
    assert rc == 2 and out == "" and len(nonblank_lines(err)) == 1 and f"{bad}: " in err and words in err
