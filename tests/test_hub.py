"""Named models (model/hub.py) and the bundled-model build (bench/build_bundled_model.py)."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA, requires_shared_data

from bonexray.errors import CheckpointError
from bonexray.model import hub

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_unknown_name_is_one_line_listing_the_known_names(tmp_path, capsys):
    from bonexray.cli import main

    with pytest.raises(CheckpointError, match="known: fracatlas-efficientnet_lite0-320, fracatlas"):
        hub.resolve_model("no-such-model")
    assert main(["predict", "no-such-model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a bundled model name" in err[0]


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fracatlas").write_bytes(b"")
    assert hub.resolve_model("fracatlas") == Path("fracatlas")


def test_a_bundled_model_not_built_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="not built in this copy"):
        hub.resolve_model("fracatlas")
    rows = hub.describe_models()
    assert rows[0]["built"] is False and "not built" in hub.format_models(rows)


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory):
    """A bundle built by the real build script from the tiny trained model, registered as 'tiny' / 'fracatlas'."""
    from build_bundled_model import build

    from bonexray.evaluation.evaluate import run_evaluation

    base = tmp_path_factory.mktemp("bundle")
    run_evaluation(trained_run["best_checkpoint"], trained_run["manifest"], split="test", out=str(base / "results"),
                   n_bootstrap=50, device="cpu", progress=False, backend="torch")
    images = ("img000.png", "img001.png", "img002.png")
    info = build(trained_run["best_checkpoint"], Path(trained_run["manifest"]).parent / "manifest.csv",
                 base / "results" / "metrics.json", base / "weights", "tiny-efficientnet_lite0-64", quantile=0.99,
                 images=images, max_auroc_drop=0.1)  # a 12-image test split: one pair swapped by float16 moves AUROC 1/36
    return {"dir": base / "weights", "info": info, "data": Path(trained_run["manifest"]).parent,
            "checkpoint": Path(trained_run["best_checkpoint"])}


@pytest.fixture
def registered(bundle, monkeypatch):
    monkeypatch.setattr(hub, "WEIGHTS_DIR", bundle["dir"])
    monkeypatch.setattr(hub, "BUNDLED", (hub.BundledModel("tiny-efficientnet_lite0-64", ("tiny", "fracatlas"),
                                                          sha256=bundle["info"]["sha256"]),))
    return bundle


def test_build_writes_a_compact_float16_file_and_its_card(bundle):
    import torch

    info = bundle["info"]
    path = bundle["dir"] / info["file"]
    assert path.stat().st_size < 0.6 * bundle["checkpoint"].stat().st_size  # float16 and no optimizer state
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(v.dtype == torch.float16 for v in state.values())
    assert info["sha256"] == hub.file_sha256(path)
    assert "CC BY 4.0" in info["training_data"]["licence"] and "Scientific Data" in info["training_data"]["citation"]
    assert "Not a medical device" in info["intended_use"]
    assert info["test_metrics"]["image_auroc"]["ci95"] is not None
    f16 = info["float16_check"]
    assert abs(f16["test_auroc_float32"] - f16["test_auroc_float16"]) <= f16["max_allowed_difference"] == 0.1
    assert info["scope_gate"]["threshold"] > 0 and info["borderline"]["band"] > 0
    assert [r["path"] for r in info["reference_predictions"]] == ["img000.png", "img001.png", "img002.png"]


def test_names_work_everywhere_a_path_does(registered, tmp_path, capsys):
    import bonexray
    from bonexray.cli import main
    from bonexray.model.weights import load_weights_file
    from bonexray.model.network import BoneXrayNet
    from bonexray.web import create_app

    img = registered["data"] / "img000.png"
    assert main(["predict", "tiny", str(img), "--backend", "torch"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    ref = registered["info"]["reference_predictions"][0]
    assert rec["prob_abnormal"] == pytest.approx(ref["prob_abnormal"], abs=1e-5)
    assert bonexray.load_model("tiny", device="cpu").predict(img).prob_abnormal == pytest.approx(rec["prob_abnormal"],
                                                                                                   abs=1e-5)
    assert main(["export", "tiny", "--out", str(tmp_path / "tiny.onnx")]) == 0
    assert (tmp_path / "tiny.onnx").is_file()
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=3, pretrained=None)
    load_weights_file(net, "tiny")  # train --weights tiny
    app = create_app(None, device="cpu")  # serve without a model: the default bundled one
    assert app.state.model_path.name == registered["info"]["file"]
    from fastapi.testclient import TestClient

    card = TestClient(app).get("/api/model").json()
    assert card["evaluation"]["auroc"] == registered["info"]["test_metrics"]["image_auroc"]["value"]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-efficientnet_lite0-64" in out and registered["info"]["sha256"] in out and "test AUROC" in out
    assert "test-time augmentation: none" in out  # the card states none


def test_a_changed_bundled_file_is_refused(registered, tmp_path, monkeypatch):
    damaged = tmp_path / "w"
    shutil.copytree(registered["dir"], damaged)
    f = damaged / registered["info"]["file"]
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(hub, "WEIGHTS_DIR", damaged)
    with pytest.raises(CheckpointError, match="does not match its pinned SHA-256"):
        hub.resolve_model("tiny")


# --------------------------------------------------------------------------- the shipped file


@requires_shared_data
def test_the_shipped_bundled_model_matches_its_pin_and_recorded_predictions():
    from bonexray.predict import run_predict

    model = hub.BUNDLED[0]
    if not model.path.is_file():
        pytest.skip("bundled file not built yet")
    assert model.sha256 is not None, "bundled file present but no SHA-256 pinned in model/hub.py"
    assert hub.file_sha256(model.path) == model.sha256
    refs = model.info()["reference_predictions"]
    buf = io.StringIO()
    data = SHARED_DATA / "FracAtlas"
    assert run_predict(model.name, [data / r["path"] for r in refs], stream=buf, backend="torch", device="cpu") == 0
    for got, want in zip((json.loads(x) for x in buf.getvalue().splitlines()), refs, strict=True):
        for key, value in want.items():  # recorded by `predict` with this card: calibrated, with its finding
            if key.startswith("prob_"):
                assert got[key] == pytest.approx(value, abs=1e-4), (want["path"], key)
        assert [got[k] for k in ("abnormal", "finding", "body_part", "in_scope")] == \
            [want[k] for k in ("abnormal", "finding", "body_part", "in_scope")]


def test_build_keeps_a_card_fitted_elsewhere_and_refuses_one_without_the_gate(bundle, tmp_path):
    from build_bundled_model import build

    from bonexray.model.checkpoint import read_card

    source = bundle["dir"] / bundle["info"]["file"]  # its card holds a gate with its head, fitted by the build
    kept = build(source, bundle["data"] / "manifest.csv", _metrics_of(bundle), tmp_path / "kept", "kept-efficientnet_lite0-64", keep_card=True,
                 images=("img000.png",))
    before, after = read_card(source), read_card(tmp_path / "kept" / kept["file"])
    assert after.scope == before.scope and after.calibration == before.calibration
    assert after.operating_points == before.operating_points
    assert kept["scope_gate"]["head"] == before.scope["head"]
    with pytest.raises(SystemExit, match="--keep-card needs a card with the scope gate's head"):
        build(bundle["checkpoint"], bundle["data"] / "manifest.csv", _metrics_of(bundle), tmp_path / "no",
              "no-efficientnet_lite0-64", keep_card=True, images=("img000.png",))
    assert not (tmp_path / "no").exists()


def _metrics_of(bundle) -> Path:
    return bundle["dir"].parent / "results" / "metrics.json"


def test_recard_replaces_only_the_card_of_the_same_weights_and_refuses_other_weights(bundle, tmp_path):
    import shutil

    from build_bundled_model import recard

    from bonexray.inference.calibrate import rewrite_checkpoint
    from bonexray.model.checkpoint import read_card

    built = tmp_path / "weights"
    shutil.copytree(bundle["dir"], built)
    name = bundle["info"]["name"]
    source = built / bundle["info"]["file"]
    scope = dict(read_card(source).scope)
    scope["threshold"] = float(scope["threshold"]) * 2  # a refitted gate: same network, other card
    refit = rewrite_checkpoint(source, tmp_path / "refit.ckpt", {"scope": scope}, half=True)
    info = recard(refit, bundle["data"], built, name, images=("img000.png",))
    described = json.loads((built / f"{name}.json").read_text())
    assert described == info and info["sha256"] == hub.file_sha256(source) != bundle["info"]["sha256"]
    assert read_card(source).scope["threshold"] == pytest.approx(scope["threshold"])
    assert info["float16_check"] == bundle["info"]["float16_check"]
    assert info["test_metrics"] == bundle["info"]["test_metrics"]
    assert [r["path"] for r in info["reference_predictions"]] == ["img000.png"]
    before = source.read_bytes()
    with pytest.raises(SystemExit, match="its weights are not those of"):  # the float32 training weights
        recard(rewrite_checkpoint(bundle["checkpoint"], tmp_path / "other.ckpt", {"scope": scope}),
               bundle["data"], built, name)
    assert source.read_bytes() == before


def test_build_writes_nothing_when_float16_moves_the_test_auroc_too_far(bundle, tmp_path):
    from build_bundled_model import build

    with pytest.raises(SystemExit, match="differs by more than -1.0; nothing written"):
        build(bundle["checkpoint"], bundle["data"] / "manifest.csv", _metrics_of(bundle), tmp_path / "w",
              "w-efficientnet_lite0-64", quantile=0.99, images=("img000.png",), max_auroc_drop=-1.0)
    assert not (tmp_path / "w").exists()
