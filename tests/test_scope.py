"""The scope gate (inference/scope.py), the borderline band and calibration in evaluate, in every front end."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import jpeg_bytes, lossy_jpeg_dicom, png_bytes, radiograph_like
from conftest import SHARED_DATA, requires_shared_data

from bonexray.inference import scope
from bonexray.inference.results import ImageResult, image_record, study_records


def _ct_slice_path() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")  # ships in the pydicom wheel


def _photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # RGB photo bundled with scikit-image


# --------------------------------------------------------------------------- image statistics


def test_statistics_flag_blank_constant_and_truncated_to_flat():
    assert scope.statistics_reason(np.full((300, 200), 128, np.uint8), False) == scope.BLANK
    noisy_flat = np.full((300, 200), 90, np.uint8)
    noisy_flat[::50, ::50] = 250  # a few specks: still nearly constant
    assert scope.statistics_reason(noisy_flat, False) == scope.BLANK
    img = radiograph_like(1, 300, 200)
    img[100:] = 128  # what a decoder fills in after the data ended
    assert scope.statistics_reason(img, True) == scope.TRUNCATED
    assert scope.statistics_reason(img, False) is None  # a flat band alone is not truncation
    assert scope.statistics_reason(radiograph_like(2, 300, 200), False) is None
    rng = np.random.default_rng(0)
    flat16 = (1000 + rng.integers(-1, 2, (300, 200))).astype(np.uint16)  # 16-bit, 3 levels of noise
    assert scope.statistics_reason(flat16, False) == scope.BLANK
    assert scope.statistics_reason(radiograph_like(5, 300, 200).astype(np.uint16) * 16, False) is None  # 12-bit


def test_colour_photo_and_ct_dicom_are_not_radiographs():
    photo = png_bytes(_photo())
    ev = scope.source_evidence(photo)
    assert ev.colourfulness is not None and ev.colourfulness > scope.COLOUR_LIMIT
    gray = np.asarray(Image.open(io.BytesIO(photo)).convert("L"))
    assert scope.statistics_reason(gray, False, ev) == scope.NOT_RADIOGRAPH
    ct = scope.source_evidence(_ct_slice_path())
    assert ct.modality == "CT"
    assert scope.statistics_reason(radiograph_like(3, 128, 128), False, ct) == scope.NOT_RADIOGRAPH
    # A grayscale radiograph stored as RGB is not "colour".
    rgb_gray = png_bytes(np.repeat(radiograph_like(4, 120, 100)[..., None], 3, axis=2))
    assert scope.source_evidence(rgb_gray).colourfulness < 1.0


def test_jpeg_quality_is_read_from_the_quantization_tables_and_heavy_compression_is_refused():
    gray = radiograph_like(6, 300, 240)
    for q in (30, 40, 50, 60, 75, 90, 95):
        assert scope.source_evidence(jpeg_bytes(gray, q)).jpeg_quality == q
    # Below IJG quality ~20 entries clip at 255 and the estimate reads a little high, still far below 50.
    assert scope.source_evidence(jpeg_bytes(gray, 5)).jpeg_quality < scope.MIN_JPEG_QUALITY
    assert scope.source_evidence(png_bytes(gray)).jpeg_quality is None
    for q, reason in ((5, scope.COMPRESSED), (30, scope.COMPRESSED), (49, scope.COMPRESSED), (50, None), (89, None)):
        data = jpeg_bytes(gray, q)
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        assert scope.statistics_reason(pixels, False, scope.source_evidence(data)) == reason, q
    # A colour JPEG says "not a radiograph" first: what it is matters more than how it was saved.
    photo = Image.fromarray(_photo())
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=20)
    ev = scope.source_evidence(buf.getvalue())
    assert ev.jpeg_quality == 20 and scope.statistics_reason(np.asarray(photo.convert("L")), False, ev) == scope.NOT_RADIOGRAPH


def test_api_and_cli_refuse_a_heavily_compressed_jpeg(tmp_path, capsys):
    from bonexray.api import load_model
    from bonexray.cli import main


    gray = radiograph_like(7, 300, 240)
    (tmp_path / "q20.jpg").write_bytes(jpeg_bytes(gray, 20))
    (tmp_path / "q90.jpg").write_bytes(jpeg_bytes(gray, 90))
    model = load_model("fracatlas", device="cpu")
    low, high = model.predict([tmp_path / "q20.jpg", tmp_path / "q90.jpg"])
    assert (low.in_scope, low.scope_reason, low.abnormal) == (False, scope.COMPRESSED, None)
    assert high.scope_reason != scope.COMPRESSED
    assert main(["predict", "fracatlas", str(tmp_path / "q20.jpg")]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["in_scope"] is False and record["scope_reason"] == scope.COMPRESSED and record["abnormal"] is None


def test_a_dicom_stored_as_heavily_compressed_lossy_jpeg_is_refused_like_a_jpeg_file(tmp_path, capsys):
    import pydicom

    from bonexray.api import load_model
    from bonexray.cli import main

    gray = radiograph_like(7, 300, 240)
    (tmp_path / "q20.dcm").write_bytes(lossy_jpeg_dicom(gray, 20))
    (tmp_path / "q90.dcm").write_bytes(lossy_jpeg_dicom(gray, 90))
    assert scope.source_evidence(tmp_path / "q20.dcm").jpeg_quality == 20
    assert scope.dataset_evidence(pydicom.dcmread(tmp_path / "q90.dcm")).jpeg_quality == 90
    model = load_model("fracatlas", device="cpu")
    low, high, from_dataset = model.predict([tmp_path / "q20.dcm", tmp_path / "q90.dcm",
                                             pydicom.dcmread(tmp_path / "q20.dcm")])
    assert (low.in_scope, low.scope_reason, low.abnormal) == (False, scope.COMPRESSED, None)
    assert high.scope_reason != scope.COMPRESSED
    assert (from_dataset.scope_reason, from_dataset.abnormal) == (scope.COMPRESSED, None)  # the PACS input
    assert main(["predict", "fracatlas", str(tmp_path / "q20.dcm")]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["in_scope"] is False and record["scope_reason"] == scope.COMPRESSED and record["abnormal"] is None


@requires_shared_data
def test_real_fracatlas_radiographs_pass_the_statistics_checks():
    from bonexray.data.imageio import read_image

    files = sorted((SHARED_DATA / "FracAtlas" / "images" / "Non_fractured").glob("*.jpg"))[:40]
    for f in files:
        d = read_image(f)
        assert scope.statistics_reason(d.pixels, d.truncated, scope.source_evidence(f)) is None, f
        assert scope.source_evidence(f).jpeg_quality >= 89, f  # FracAtlas is saved at 89-99


# --------------------------------------------------------------------------- feature space


def test_feature_scope_threshold_quantile_card_round_trip_and_far_points():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 64))
    train = rng.normal(size=(400, 8)) @ basis + 0.05 * rng.normal(size=(400, 64))
    held = rng.normal(size=(400, 8)) @ basis + 0.05 * rng.normal(size=(400, 64))
    fs = scope.fit_feature_scope(train, held, k=8, quantile=0.99)
    assert fs.info["held_out_refused"] <= 0.011
    back = scope.FeatureScope.from_card(json.loads(json.dumps(fs.to_card())))
    np.testing.assert_allclose(back.scores(held), fs.scores(held), rtol=1e-3)
    off_manifold = rng.normal(size=(20, 64)) * 3.0  # not in the span of the training data
    assert (back.scores(off_manifold) > back.far_threshold).all()


# --------------------------------------------------------------------------- records


def test_out_of_scope_records_have_no_verdict_and_studies_use_in_scope_images_only():
    parts = ["hand", "leg"]
    a = ImageResult("a.png", 0.9, np.array([0.8, 0.2]), False, "s1")
    b = ImageResult("b.png", 0.1, np.array([0.1, 0.9]), False, "s1", scope_reason=scope.BLANK)
    rec = image_record(b, parts, 0.5, band=0.1)
    assert rec["in_scope"] is False and rec["scope_reason"] == scope.BLANK
    assert rec["abnormal"] is None and rec["body_part"] is None and rec["confidence"] is None
    assert rec["prob_abnormal"] == 0.1  # kept for research
    ok = image_record(a, parts, 0.5, band=0.1)
    assert ok["in_scope"] is True and ok["abnormal"] is True and ok["confidence"] == "clear"
    assert image_record(ImageResult("c", 0.55, np.array([1.0, 0.0]), False), parts, 0.5, 0.1)["confidence"] == "borderline"
    (study,) = study_records([a, b], parts, 0.5, band=0.1)
    assert study["n_images"] == 2 and study["n_out_of_scope"] == 1 and study["prob_abnormal"] == 0.9
    assert study["abnormal"] is True and study["body_part"] == "hand"
    (none,) = study_records([b], parts, 0.5)
    assert none["in_scope"] is False and none["abnormal"] is None and none["prob_abnormal"] is None
    unchecked = image_record(ImageResult("d", 0.9, np.array([1.0, 0.0]), False, scope_checked=False), parts, 0.5)
    assert unchecked["in_scope"] is None and unchecked["abnormal"] is True


def test_band_default_is_stated_and_calibration_metrics():
    from bonexray.evaluation.calibration import band_error_rates, calibration_metrics
    from bonexray.model.checkpoint import ModelCard

    band, source = scope.borderline_band(ModelCard(backbone="efficientnet_lite0", image_size=64, body_parts=["a"]))
    assert band == scope.DEFAULT_BAND and "default" in source
    y = np.array([0, 1, 1, 1, 1, 0])
    p = np.array([0.1, 0.45, 0.55, 0.9, 0.35, 0.2])
    cal = calibration_metrics(y, p, n_bins=5)
    assert 0 <= cal["ece"] <= 1 and sum(b["n"] for b in cal["bins"]) == 6
    rates = band_error_rates(y, p, 0.5, 0.1, "test")
    assert rates["inside"] == {"n": 2, "error_rate": 0.5} and rates["outside"] == {"n": 4, "error_rate": 0.25}
    # Perfectly calibrated bins give ECE 0; all-wrong confident predictions give ECE near 1.
    assert calibration_metrics(np.array([0, 1]), np.array([0.0, 1.0]))["ece"] == pytest.approx(0.0, abs=1e-6)
    assert calibration_metrics(np.array([1, 0]), np.array([0.0, 1.0]))["ece"] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- end to end, every front end


@pytest.fixture(scope="module")
def calibrated(trained_run, tmp_path_factory):
    """The trained test model with scope statistics and band fitted on its own train/valid splits."""
    from bonexray.inference.calibrate import calibrate_model

    out = tmp_path_factory.mktemp("calibrated") / "calibrated.ckpt"
    return calibrate_model(trained_run["best_checkpoint"], trained_run["manifest"], out=out, quantile=0.99,
                           device="cpu", head_quantile=0.9)


@pytest.fixture(scope="module")
def ood_files(tmp_path_factory, trained_run):
    d = tmp_path_factory.mktemp("ood")
    Image.fromarray(_photo()).save(d / "photo.png")
    Image.fromarray(np.full((200, 160), 200, np.uint8)).save(d / "blank.png")
    (d / "ct.dcm").write_bytes(Path(_ct_slice_path()).read_bytes())
    train_image = Path(trained_run["manifest"]).parent / "img000.png"
    return {"photo": d / "photo.png", "blank": d / "blank.png", "ct": d / "ct.dcm", "radiograph": train_image}


def test_calibration_writes_scope_and_band_into_the_card(calibrated):
    from bonexray.model.checkpoint import read_card

    card = read_card(calibrated)
    assert card.scope["fitted_on"].startswith("train split") and "valid split" in card.scope["threshold_source"]
    assert card.scope["held_out_refused"] <= 0.05
    assert card.borderline_band is not None and card.borderline_source
    head = card.scope["head"]
    assert head["classes"][0] == scope.IN_SCOPE and scope.NOT_RADIOGRAPH in head["classes"]
    assert scope.ROTATED in head["classes"] and head["n_fit_outliers"][scope.ROTATED] > 0
    assert head["held_out_refused"] <= 0.1 + 1e-9  # its threshold passes 0.9 of the valid split
    assert card.calibration is None or (card.calibration["temperature"] > 0
                                        and "valid split" in card.calibration["fitted_on"])
    assert "valid split" in card.operating_points["source"]
    assert 0 <= card.operating_points["suspicious"] <= card.operating_points["definite"] <= 1


def test_calibration_under_d4_tta_records_it_and_rechooses_the_threshold_on_valid(trained_run, tmp_path):
    import pandas as pd

    from bonexray.cli import main
    from bonexray.data.datasets import load_dataset
    from bonexray.data.preprocess import build_cache
    from bonexray.inference.calibrate import calibrate_model
    from bonexray.inference.predictor import Predictor
    from bonexray.model.checkpoint import read_card
    from bonexray.training.threshold import choose_threshold

    import shutil

    cache = tmp_path / "cache"
    run = Path(shutil.copytree(trained_run["run_dir"], tmp_path / "run"))  # evaluate finds the valid split beside it
    out = calibrate_model(trained_run["best_checkpoint"], trained_run["manifest"], out=run / "checkpoints" / "d4.ckpt",
                          quantile=0.99, device="cpu", head=False, tta="d4", cache=cache)
    card, plain = read_card(out), read_card(trained_run["best_checkpoint"])
    assert plain.tta is None and card.tta == "d4"
    splits = pd.read_csv(Path(trained_run["run_dir"]) / "splits.csv")
    valid = splits[(splits["split"] == "valid") & splits["abnormal"].isin([0, 1])]
    image_cache, _ = build_cache(load_dataset(trained_run["manifest"]), cache, size=64)
    row_of = dict(zip(image_cache.index["path"], image_cache.index["row"]))
    tiles = np.asarray(image_cache.images[[row_of[p] for p in valid["path"]]])
    probs = Predictor(trained_run["best_checkpoint"], device="cpu", tta="d4").predict_batch(tiles, boxes=False).prob
    assert card.threshold == pytest.approx(float(choose_threshold(valid["abnormal"].to_numpy(), probs)), abs=1e-6)
    # evaluate keeps the card's threshold under the card's TTA, and re-chooses it for another.
    for tta, source in ((None, "model card"), ("none", "re-chosen on the run's valid split")):
        res = tmp_path / f"eval-{tta}"
        assert main(["evaluate", str(out), "--data", trained_run["manifest"], "--out", str(res), "--bootstrap", "0",
                     "--cache", str(cache), "--device", "cpu"] + (["--tta", tta] if tta else [])) == 0
        metrics = json.loads((res / "metrics.json").read_text())
        assert metrics["tta"] == (tta or "d4") and metrics["threshold_source"].startswith(source), metrics


def test_predict_cli_refuses_photo_ct_and_blank_and_answers_the_radiograph(calibrated, ood_files, capsys):
    from bonexray.cli import main

    files = [ood_files[k] for k in ("photo", "ct", "blank", "radiograph")]
    assert main(["predict", str(calibrated), *map(str, files), "--study", "--backend", "torch"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    by = {Path(r["path"]).name: r for r in lines if r["type"] == "image"}
    for name, reason in (("photo.png", scope.NOT_RADIOGRAPH), ("ct.dcm", scope.NOT_RADIOGRAPH),
                         ("blank.png", scope.BLANK)):
        assert by[name]["in_scope"] is False and by[name]["scope_reason"] == reason, by[name]
        assert by[name]["abnormal"] is None and by[name]["body_part"] is None
    assert by["img000.png"]["in_scope"] is True and isinstance(by["img000.png"]["abnormal"], bool)
    assert by["img000.png"]["confidence"] in ("clear", "borderline")
    # --no-scope-check: every image gets a verdict, in_scope null; CSV carries the columns.
    assert main(["predict", str(calibrated), str(ood_files["blank"]), "--no-scope-check", "--format", "csv",
                 "--backend", "torch"]) == 0
    out = capsys.readouterr().out.splitlines()
    header, row = out[0].split(","), out[1].split(",")
    cell = dict(zip(header, row))
    assert cell["in_scope"] == "" and cell["abnormal"] in ("0", "1") and "confidence" in header


def test_feature_distance_refuses_a_gray_photo_the_statistics_pass(calibrated, tmp_path):
    from skimage import data

    from bonexray.api import load_model

    Image.fromarray(data.camera()).save(tmp_path / "camera.png")  # gray, not blank: only the features can tell
    model = load_model(calibrated, device="cpu")
    pred = model.predict(tmp_path / "camera.png")
    assert pred.in_scope is False and pred.scope_reason in (scope.NOT_RADIOGRAPH, scope.UNKNOWN_PART)
    assert pred.abnormal is None and pred.body_part is None


def test_python_api_gives_in_scope_and_no_verdict(calibrated, ood_files):
    from bonexray.api import load_model

    model = load_model(calibrated, device="cpu")
    photo, blank, radiograph = model.predict([ood_files["photo"], ood_files["blank"], ood_files["radiograph"]])
    assert (photo.in_scope, photo.abnormal, photo.body_part) == (False, None, None)
    assert blank.scope_reason == scope.BLANK
    assert radiograph.in_scope is True and radiograph.confidence in ("clear", "borderline")
    array = model.predict(np.zeros((100, 100), np.uint8))
    assert array.in_scope is False and array.scope_reason == scope.BLANK
    unchecked = load_model(calibrated, device="cpu", scope_check=False).predict(ood_files["blank"])
    assert unchecked.in_scope is None and isinstance(unchecked.abnormal, bool)


def test_serve_api_says_cannot_assess(calibrated, ood_files):
    from fastapi.testclient import TestClient

    from bonexray.web import create_app

    client = TestClient(create_app(calibrated, device="cpu"))
    files = [("files", (p.name, p.read_bytes())) for p in (ood_files["photo"], ood_files["ct"], ood_files["radiograph"])]
    r = client.post("/api/predict", files=files, data={"grouping": "one"})
    assert r.status_code == 200, r.text
    body = r.json()
    by = {rec["path"]: rec for rec in body["images"]}
    # no verdict: null, as in the CLI's records
    assert by["photo.png"]["in_scope"] is False and by["photo.png"]["abnormal"] is None and by["photo.png"]["body_part"] is None
    assert by["ct.dcm"]["scope_reason"] == scope.NOT_RADIOGRAPH
    assert by["img000.png"]["in_scope"] is True
    # grouping=one: the two non-DICOM files are one study; the DICOM is the study of its StudyInstanceUID.
    studies = {st["study"]: st for st in body["studies"]}
    assert sum(st["n_out_of_scope"] for st in studies.values()) == 2 and sum(st["n_images"] for st in studies.values()) == 3
    assert studies["upload"]["n_images"] == 2 and studies["upload"]["n_out_of_scope"] == 1
    assert studies["upload"]["prob_abnormal"] == by["img000.png"]["prob_abnormal"]
    assert studies[by["ct.dcm"]["study"]]["prob_abnormal"] is None
    info = client.get("/api/model").json()
    assert "feature distance" in info["scope_check"] and info["borderline_band"] > 0


def test_evaluate_reports_calibration_and_band_error_rates(trained_run, tmp_path):
    from bonexray.evaluation.evaluate import run_evaluation

    summary = run_evaluation(trained_run["best_checkpoint"], trained_run["manifest"], split="test", out=str(tmp_path),
                             n_bootstrap=0, device="cpu", progress=False, backend="torch")
    m = json.loads((tmp_path / "metrics.json").read_text())
    cal, band = m["abnormality"]["calibration"], m["abnormality"]["borderline"]
    assert 0 <= cal["ece"] <= 1 and cal["n_bins"] == 10
    assert band["inside"]["n"] + band["outside"]["n"] == m["n_images"]
    assert (tmp_path / "reliability.png").is_file() and "ECE" in summary
    assert "Calibration and the borderline band" in (tmp_path / "report.md").read_text()


def test_bench_scope_measures_refusal_rates_per_set_and_leave_one_region_out(trained_run, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import scope as bench_scope  # bench/scope.py

    res = bench_scope.measure(str(trained_run["best_checkpoint"]), trained_run["manifest"], cache=str(tmp_path),
                              leave_out=("hand",), pca_quantile=0.99, head_quantile=0.9,
                              write_model=str(tmp_path / "gated.ckpt"))
    assert res["in_distribution"]["test"]["n"] == 12
    for name in ("synthetic (other seed)", "rendered text (other seed)"):
        r = res["measured_sets"][name]
        assert r["n"] > 0 and 0 <= r["refused"] <= 1 and sum(r["reasons"].values()) == r["n"], name
    turned = res["measured_sets"]["turned test radiographs (90/180/270, upside down)"]
    assert turned["n"] == 12 and sum(turned["reasons"].values()) == 12
    assert res["gate"]["fit_sets"]["turned radiographs"] > 0
    lo = res["leave_one_region_out"]["hand"]
    assert lo["region"]["n"] > 0 and 0 <= lo["region"]["refused"] <= 1
    assert set(res["targets"]) >= set(bench_scope.TARGETS)
    from bonexray.model.checkpoint import read_card

    card = read_card(tmp_path / "gated.ckpt")
    assert card.scope["head"]["classes"][0] == scope.IN_SCOPE
    assert scope.ScopeGate(card).head is not None


# --------------------------------------------------------------------------- DICOM kinds, size, colour, windowing


def _write_dicom(pixels: np.ndarray, modality: str = "CR", frames: int = 1, photometric: str | None = None,
                 **elements) -> bytes:
    """An uncompressed DICOM of ``pixels`` (uint8/uint16 gray, or uint8 RGB) as bytes."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture: the class says nothing, Modality does
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    colour = pixels.ndim == (4 if frames > 1 else 3)
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _gate_reason(data: bytes, name: str = "x.dcm", classes=("hand", "hip", "leg", "mixed", "shoulder")):
    """What the gate says about a file with its pixels and tags only (no feature statistics)."""
    from types import SimpleNamespace

    from bonexray.data.imageio import read_image_bytes

    d = read_image_bytes(data, name)
    gate = scope.ScopeGate(SimpleNamespace(body_parts=list(classes), scope=None))
    return gate.reasons([d.pixels], [d.truncated], [scope.source_evidence(data)], None)[0]


def test_turns_are_quarter_half_turns_and_upside_down_never_a_mirror():
    from bonexray.inference.outliers import TURNS, turned

    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(turned(a, "rot90"), np.rot90(a)) and turned(a, "rot90").shape == (4, 3)
    assert np.array_equal(turned(a, "rot180"), a[::-1, ::-1]) and np.array_equal(turned(a, "flip-ud"), a[::-1])
    assert np.array_equal(turned(turned(a, "rot90"), "rot270"), a)
    assert "flip-lr" not in TURNS  # the other side's view looks like a mirror: in scope
    with pytest.raises(ValueError, match="flip-lr"):
        turned(a, "flip-lr")


def test_a_head_fitted_with_turned_radiographs_refuses_them_as_rotated():
    rng = np.random.default_rng(0)
    upright = rng.normal(0, 1, (300, 8))
    turned_emb = rng.normal(0, 1, (300, 8)) + np.r_[6.0, np.zeros(7)]
    photos = rng.normal(0, 1, (300, 8)) + np.r_[0.0, -6.0, np.zeros(6)]
    head = scope.fit_scope_head(upright[:200], {scope.NOT_RADIOGRAPH: photos[:150], scope.ROTATED: turned_emb[:150]},
                                upright[200:], quantile=0.98)
    card_head = scope.ScopeHead.from_card(head.to_card())
    reasons = card_head.reasons(turned_emb[150:])
    assert sum(r == scope.ROTATED for r in reasons) >= 0.9 * len(reasons)
    assert sum(r is None for r in card_head.reasons(upright[200:])) >= 0.95 * 100
    assert scope.ROTATED == scope.SCOPE_REASONS[-1]  # appended: heads in older cards keep their class names


def test_dicom_kinds_by_allow_list():
    img = radiograph_like(7, 200, 160)
    assert _gate_reason(_write_dicom(img, "CR")) is None
    assert _gate_reason(_write_dicom(img, "DX")) is None
    assert _gate_reason(_write_dicom(img, "RF")) is None  # a single fluoroscopy frame: pixels decide
    assert _gate_reason(_write_dicom(np.stack([img] * 3), "XA", frames=3)) == scope.MULTI_FRAME
    assert _gate_reason(_write_dicom(img, "OT")) is None  # OT/SC: the pixels decide
    assert _gate_reason(_write_dicom(img, "")) is None
    for modality in ("RTDOSE", "SEG", "RTIMAGE", "CT", "MR", "US", "NM", "PT", "KO"):
        assert _gate_reason(_write_dicom(img, modality)) == scope.NOT_RADIOGRAPH, modality
    assert _gate_reason(_write_dicom(img, "MG")) == scope.UNKNOWN_PART  # a breast radiograph


def test_tiny_and_stripe_images_are_refused_with_a_stated_minimum():
    assert scope.statistics_reason(radiograph_like(1, 10, 10), False) == scope.TOO_SMALL
    assert scope.statistics_reason(radiograph_like(1, 45, 10), False) == scope.TOO_SMALL
    assert scope.statistics_reason(radiograph_like(1, 600, 100), False) == scope.TOO_SMALL  # 6 : 1
    side = scope.MIN_SIDE
    assert scope.statistics_reason(radiograph_like(1, side, side), False) is None
    assert scope.statistics_reason(radiograph_like(1, side - 1, 200), False) == scope.TOO_SMALL
    # A 10 x 10 RTDOSE grid (pydicom's own test file) is refused before anything reads its pixels.
    from pydicom.data import get_testdata_file

    path = get_testdata_file("rtdose_1frame.dcm")
    if path is not None:
        assert _gate_reason(Path(path).read_bytes()) in (scope.TOO_SMALL, scope.NOT_RADIOGRAPH)


def test_colour_dicom_is_checked_like_colour_files_and_a_red_arrow_is_not_colour():
    photo = _photo()[:256, :256]
    assert _gate_reason(_write_dicom(photo, "OT")) == scope.NOT_RADIOGRAPH
    gray_rgb = np.repeat(radiograph_like(4, 200, 160)[..., None], 3, axis=2)
    assert _gate_reason(_write_dicom(gray_rgb, "OT")) is None
    # A thin red arrow drawn on a radiograph stored as RGB: an annotation, not a colour photo.
    from PIL import ImageDraw

    im = Image.fromarray(np.repeat(radiograph_like(9, 400, 320)[..., None], 3, axis=2))
    draw = ImageDraw.Draw(im)
    draw.line([(40, 40), (200, 200)], fill=(255, 0, 0), width=3)
    draw.polygon([(200, 200), (180, 170), (170, 190)], fill=(255, 0, 0))
    data = png_bytes(np.asarray(im))
    ev = scope.source_evidence(data)
    assert ev.colourfulness is not None and not ev.is_colour
    assert _gate_reason(data, "arrow.png") is None
    # The same drawing over the whole image is colour.
    big = Image.fromarray(np.repeat(radiograph_like(9, 400, 320)[..., None], 3, axis=2))
    ImageDraw.Draw(big).rectangle([(0, 0), (320, 250)], fill=(220, 30, 30))
    assert _gate_reason(png_bytes(np.asarray(big)), "red.png") == scope.NOT_RADIOGRAPH


def test_16bit_image_with_a_hot_pixel_is_windowed_robustly_not_called_blank(tmp_path):
    from bonexray.data.imageio import read_image, to_uint8

    img = radiograph_like(11, 300, 240).astype(np.uint16) * 16 + 200  # 12-bit data
    img[10, 10] = 65535  # one hot pixel
    Image.fromarray(img).save(tmp_path / "hot.png")
    d = read_image(tmp_path / "hot.png")
    assert d.pixels.dtype == np.uint16
    u8 = to_uint8(d.pixels)
    assert u8.std() > 20 and np.percentile(u8, 99) > 200  # the image keeps its contrast
    assert scope.statistics_reason(d.pixels, d.truncated, scope.source_evidence(tmp_path / "hot.png")) is None
    # The same in a DICOM without a window (the window-less path).
    data = _write_dicom(img, "DX")
    assert _gate_reason(data) is None


# --------------------------------------------------------------------------- DICOM body-part tags


def test_body_part_table_maps_dicom_terms_to_the_model_classes():
    from bonexray.core.body_parts import dicom_region, region_outside_classes, terms_in

    fracatlas = ["hand", "hip", "leg", "mixed", "shoulder"]
    mura = ["elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist"]
    assert terms_in("PA CHEST") == ("CHEST",) and terms_in("c-spine lat") == ("CSPINE",)
    assert terms_in("Upper Extremity") == ("UPPEREXTREMITY",) and terms_in("legacy protocol") == ()
    for tags, outside in (({"BodyPartExamined": "CHEST", "StudyDescription": "THORAX"}, True),
                          ({"BodyPartExamined": "SKULL"}, True), ({"BodyPartExamined": "TEETH"}, True),
                          ({"BodyPartExamined": "EXTREMITY"}, False), ({"BodyPartExamined": "KNEE"}, False),
                          ({"BodyPartExamined": "WRIST", "ViewPosition": "PA"}, False),
                          ({"ProtocolName": "XR CHEST AND SHOULDER"}, False),  # one region maps: pixels decide
                          ({"SeriesDescription": "Abdomen supine"}, True),
                          ({"BodyPartExamined": ""}, False), ({}, False), ({"BodyPartExamined": "FOO"}, False)):
        assert region_outside_classes(dicom_region(tags), fracatlas) is outside, tags
    assert not region_outside_classes(dicom_region({"BodyPartExamined": "ELBOW"}), mura)
    assert region_outside_classes(dicom_region({"BodyPartExamined": "KNEE"}), mura)  # MURA has no knee
    assert dicom_region({"BodyPartExamined": "HAND", "ViewPosition": "PA"}).view == "PA"


def test_body_part_tags_refuse_a_chest_radiograph_and_keep_a_limb():
    img = radiograph_like(3, 200, 160)
    chest = _write_dicom(img, "CR", BodyPartExamined="CHEST", StudyDescription="THORAX")
    assert _gate_reason(chest) == scope.UNKNOWN_PART
    assert _gate_reason(_write_dicom(img, "CR", BodyPartExamined="HAND")) is None
    assert _gate_reason(_write_dicom(img, "CR", ProtocolName="XR SKULL 2 VIEWS")) == scope.UNKNOWN_PART
    assert _gate_reason(_write_dicom(img, "CR", BodyPartExamined="")) is None  # empty: pixels alone


def test_predict_the_bundled_model_on_the_pydicom_chest_cr_is_out_of_scope(capsys):
    from pydicom.data import get_testdata_file

    from bonexray.cli import main

    path = get_testdata_file("RG1_UNCR.dcm")  # pip install pydicom-data: a CR, BodyPartExamined CHEST
    if path is None:
        pytest.skip("pydicom-data is not installed (pip install pydicom-data)")
    assert main(["predict", "fracatlas", path]) == 0
    (rec,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rec["in_scope"] is False and rec["scope_reason"] == scope.UNKNOWN_PART
    assert rec["abnormal"] is None and rec["body_part"] is None
