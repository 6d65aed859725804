"""bonexray predict: inputs (images, folders, studies, DICOM), outputs (JSON lines, CSV), CAMs."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonexray.cli import main
from bonexray.data.imageio import read_image, to_uint8
from bonexray.data.preprocess import letterbox, load_for_model
from bonexray.model.checkpoint import ModelCard, save_model
from bonexray.model.network import BoneXrayNet
from builders import make_checkpoint, make_manifest, nonblank_lines, radiograph_like, run_main, strict_json_lines
from conftest import SHARED_DATA, requires_shared_data

REPO = Path(__file__).resolve().parents[1]
PARTS = ["hand", "leg", "shoulder"]
FRACTURED = SHARED_DATA / "FracAtlas" / "images" / "Fractured"
REAL_JPEGS = [FRACTURED / "IMG0000019.jpg", FRACTURED / "IMG0000025.jpg"]
DICOM_DIR = SHARED_DATA / "dicom"
IMAGE_KEYS = {"type", "path", "prob_abnormal", "abnormal", "body_part", "truncated", "boxes", *(f"prob_{p}" for p in PARTS)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=3, pretrained=None)
    card = ModelCard(backbone="efficientnet_lite0", image_size=64, body_parts=PARTS, threshold=0.5)
    return save_model(tmp_path_factory.mktemp("model") / "m.ckpt", net, card)


def write_png(path: Path, seed: int, abnormal: int = 0, size=(96, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(radiograph_like(seed, *size, abnormal=abnormal)).save(path)
    return path


def run_cli(capsys, *args) -> tuple[int, list[str], str]:
    rc = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, [ln for ln in out.splitlines() if ln.strip()], err


def parse_json_lines(lines: list[str]) -> list[dict]:
    return [json.loads(ln) for ln in lines]


def check_image_record(rec: dict) -> None:
    assert IMAGE_KEYS <= set(rec)
    assert rec["type"] == "image"
    assert 0.0 <= rec["prob_abnormal"] <= 1.0
    assert rec["abnormal"] == (rec["prob_abnormal"] >= 0.5)
    probs = [rec[f"prob_{p}"] for p in PARTS]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert rec["body_part"] == PARTS[int(np.argmax(probs))]
    assert isinstance(rec["truncated"], bool)


# --------------------------------------------------------------------------- real radiographs


@requires_shared_data
def test_predict_real_jpegs_and_dicoms(ckpt, capsys):
    rc, lines, err = run_cli(capsys, ckpt, *REAL_JPEGS, DICOM_DIR)
    assert rc == 0, err
    recs = parse_json_lines(lines)
    images = [r for r in recs if r["type"] == "image"]
    assert [Path(r["path"]).name for r in images] == ["IMG0000019.jpg", "IMG0000025.jpg", "RG3_J2KR.dcm", "RG3_UNCR.dcm"]
    for r in images:
        check_image_record(r)
    # A folder not named like a MURA study is not aggregated without --study.
    assert not [r for r in recs if r["type"] == "study"]
    # Lossless JPEG 2000 and uncompressed copies of one radiograph: the same prediction.
    j2k, uncr = images[2], images[3]
    assert j2k["prob_abnormal"] == pytest.approx(uncr["prob_abnormal"], abs=1e-6)
    # The output is what the model gives for load_for_model's array.
    from bonexray.inference.predictor import Predictor

    pr = Predictor(ckpt, device="cpu")
    arr = np.stack([load_for_model(p, 64)[0] for p in REAL_JPEGS])
    probs, bp = pr.predict_arrays(arr)
    assert [r["prob_abnormal"] for r in images[:2]] == pytest.approx(probs.tolist(), abs=1e-6)
    assert bp.sum(axis=1) == pytest.approx(np.ones(2))


@requires_shared_data
def test_suffixless_dicom_found_in_folder_by_magic(ckpt, capsys, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(DICOM_DIR / "RG3_UNCR.dcm", folder / "1.2.840.113619.2.55")
    shutil.copy(DICOM_DIR / "RG3_UNCR.dcm", folder / "IM0001")
    (folder / "notes.txt").write_text("not an image")
    rc, lines, err = run_cli(capsys, ckpt, folder)
    assert rc == 0, err
    images = [r for r in parse_json_lines(lines) if r["type"] == "image"]
    assert sorted(Path(r["path"]).name for r in images) == ["1.2.840.113619.2.55", "IM0001"]


# --------------------------------------------------------------------------- studies


def make_study_tree(base: Path) -> tuple[Path, dict[str, int]]:
    """MURA-style XR_HAND/patient/studyN_label/imageK.png; returns (root, images per study)."""
    root = base / "XR_HAND"
    sizes = {"patient00001/study1_positive": 3, "patient00002/study1_negative": 2}
    seed = 0
    for study, n in sizes.items():
        for k in range(1, n + 1):
            seed += 1
            write_png(root / study / f"image{k}.png", seed, abnormal=int("positive" in study))
    return root, {str(root / s): n for s, n in sizes.items()}


def test_study_aggregation_is_mean_and_majority(ckpt, capsys, tmp_path):
    root, sizes = make_study_tree(tmp_path)
    rc, lines, err = run_cli(capsys, ckpt, root, "--study")
    assert rc == 0, err
    recs = parse_json_lines(lines)
    images = [r for r in recs if r["type"] == "image"]
    studies = [r for r in recs if r["type"] == "study"]
    assert recs[-len(studies):] == studies  # study lines come after all image lines
    assert len(images) == 5
    assert {s["study"]: s["n_images"] for s in studies} == sizes
    for s in studies:
        members = [r for r in images if r["study"] == s["study"]]
        assert len(members) == s["n_images"]
        assert s["prob_abnormal"] == pytest.approx(np.mean([m["prob_abnormal"] for m in members]), abs=2e-6)
        assert s["abnormal"] == (s["prob_abnormal"] >= 0.5)
        votes = [m["body_part"] for m in members]
        top = max(votes.count(v) for v in set(votes))
        assert votes.count(s["body_part"]) == top
        for p in PARTS:
            assert s[f"prob_{p}"] == pytest.approx(np.mean([m[f"prob_{p}"] for m in members]), abs=2e-6)


def test_study_majority_vote_tie_breaks_on_mean_probability():
    from bonexray.inference.results import ImageResult, study_records

    results = [
        ImageResult("a", 0.2, np.array([0.5, 0.4, 0.1]), False, "s"),
        ImageResult("b", 0.4, np.array([0.1, 0.8, 0.1]), False, "s"),
    ]
    (rec,) = study_records(results, PARTS, 0.3)
    assert rec["body_part"] == "leg"  # 1 vote each; leg's mean 0.6 > hand's 0.3
    assert rec["prob_abnormal"] == pytest.approx(0.3) and rec["abnormal"] is True


def test_leaf_folder_is_a_study_without_flag_but_a_tree_is_not(ckpt, capsys, tmp_path):
    root, _ = make_study_tree(tmp_path)
    leaf = root / "patient00001" / "study1_positive"
    rc, lines, _ = run_cli(capsys, ckpt, leaf)
    recs = parse_json_lines(lines)
    assert rc == 0
    assert [r["type"] for r in recs] == ["image"] * 3 + ["study"]
    rc, lines, _ = run_cli(capsys, ckpt, root)
    assert rc == 0
    assert {r["type"] for r in parse_json_lines(lines)} == {"image"}


# --------------------------------------------------------------------------- failures


def test_unreadable_inputs_are_reported_and_the_rest_predicted(ckpt, capsys, tmp_path):
    good1 = write_png(tmp_path / "a.png", 1)
    good2 = write_png(tmp_path / "c.png", 2)
    corrupt = tmp_path / "b.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    empty = tmp_path / "d.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "nope.png"
    rc, lines, err = run_cli(capsys, ckpt, good1, corrupt, good2, empty, missing)
    assert rc == 1
    assert [Path(r["path"]).name for r in parse_json_lines(lines)] == ["a.png", "c.png"]
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 3
    for bad in (corrupt, empty, missing):
        assert any(ln.startswith(f"bonexray predict: {bad}: ") for ln in err_lines), err


def test_bad_model_file_exits_2(capsys, tmp_path):
    img = write_png(tmp_path / "a.png", 1)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    for model in (bad, tmp_path / "missing.ckpt", tmp_path / "missing.onnx"):
        rc = main(["predict", str(model), str(img)])
        out, err = capsys.readouterr()
        assert rc == 2 and out == ""
        assert str(model) in err


# --------------------------------------------------------------------------- CSV


def test_csv_output_has_header_type_column_and_studies_last(ckpt, capsys, tmp_path):
    root, sizes = make_study_tree(tmp_path)
    rc, lines, err = run_cli(capsys, ckpt, root, "--study", "--format", "csv")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    assert lines[0].split(",")[:7] == ["type", "path", "study", "n_images", "prob_abnormal", "abnormal", "body_part"]
    assert [r["type"] for r in rows] == ["image"] * 5 + ["study"] * 2
    for r in rows:
        assert 0.0 <= float(r["prob_abnormal"]) <= 1.0
        assert sum(float(r[f"prob_{p}"]) for p in PARTS) == pytest.approx(1.0, abs=1e-5)
        assert r["abnormal"] in ("0", "1")
    assert {r["study"]: int(r["n_images"]) for r in rows if r["type"] == "study"} == sizes


# --------------------------------------------------------------------------- CAM


def _cam_inputs(tmp_path: Path) -> list[Path]:
    # Two files with the same stem in different folders: their CAM names must not collide.
    imgs = [write_png(tmp_path / "x" / "image1.png", 1, abnormal=1), write_png(tmp_path / "y" / "image1.png", 2)]
    if SHARED_DATA.is_dir():
        imgs += REAL_JPEGS
    return imgs


def test_cam_pngs_written_with_overlay(ckpt, capsys, tmp_path):
    imgs = _cam_inputs(tmp_path)
    out_dir = tmp_path / "cams"
    rc, lines, err = run_cli(capsys, ckpt, *imgs, "--cam", out_dir)
    assert rc == 0, err
    recs = parse_json_lines(lines)
    pngs = sorted(out_dir.glob("*_cam.png"))
    assert len(pngs) == len(imgs) == len(recs)
    assert sorted(Path(r["cam"]) for r in recs) == pngs
    assert {p.name for p in pngs} >= {"image1_cam.png", "image1-2_cam.png"}
    for rec, img_path in zip(recs, imgs):
        # The overlay is the original radiograph (its own aspect and pixels; upscaled to a 512-px long
        # side when smaller), not the model's letterboxed tile, with the caption band above it.
        full = read_image(img_path).pixels
        h0, w0 = full.shape
        up = max(1.0, 512 / max(h0, w0))
        w, h = round(w0 * up), round(h0 * up)
        with Image.open(rec["cam"]) as im:
            im.load()
            assert im.mode == "RGB" and im.size[0] == w and h < im.size[1] < h + 130
            rgb = np.asarray(im).astype(np.int16)
        band = rgb.shape[0] - h
        body, caption = rgb[band:], rgb[:band]  # the picture, and the caption band above it
        gray = np.asarray(Image.fromarray(to_uint8(full)).resize((w, h), Image.Resampling.BICUBIC))
        assert np.abs(body - gray[:, :, None]).mean() > 10  # the overlay changes the picture
        assert (np.abs(body[..., 0] - body[..., 2]) > 30).mean() > 0.2  # and it is in colour
        assert np.abs(body - gray[:, :, None]).mean(axis=2).min() < 40  # the radiograph shows through
        assert caption.std() > 20 and (caption > 200).any()  # white caption text is there


def test_cam_for_batch_shape_range_and_no_side_effects(ckpt):
    from bonexray.inference.cam import cam_for_batch
    from bonexray.model.checkpoint import load_model

    net, _ = load_model(ckpt)
    x = np.stack([letterbox(radiograph_like(i, 96, 80, abnormal=i % 2), 64) for i in range(3)])
    with torch.inference_mode():  # callers may be in inference mode: CAM re-enables autograd
        maps = cam_for_batch(net, x)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps.max() > 0.5
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters()) and not net.training
    t = torch.from_numpy(x).float().div(255)[:, None]
    np.testing.assert_allclose(cam_for_batch(net, t, method="gradcam"), cam_for_batch(net, x, method="gradcam"), atol=1e-6)


# --------------------------------------------------------------------------- subprocess / end to end


@pytest.mark.slow
def test_subprocess_cli_json_lines(ckpt, tmp_path):
    imgs = [write_png(tmp_path / f"s{i}.png", i) for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "bonexray.cli", "predict", str(ckpt), *map(str, imgs), str(tmp_path / "gone.png")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    recs = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [Path(r["path"]).name for r in recs] == ["s0.png", "s1.png"]
    for r in recs:
        check_image_record(r)
    assert proc.stderr.strip() == f"bonexray predict: {tmp_path / 'gone.png'}: no such file or directory"


def test_trained_checkpoint_end_to_end(trained_checkpoint, capsys, tmp_path):
    trained = Path(trained_checkpoint)
    from bonexray.model.checkpoint import load_model

    _, card = load_model(trained)
    imgs = REAL_JPEGS if SHARED_DATA.is_dir() else [write_png(tmp_path / "t.png", 3, abnormal=1)]
    rc, lines, err = run_cli(capsys, trained, *imgs, "--cam", tmp_path / "cams")
    assert rc == 0, err
    for r in parse_json_lines(lines):
        assert 0.0 <= r["prob_abnormal"] <= 1.0
        assert r["body_part"] in card.body_parts
        assert sum(r[f"prob_{p}"] for p in card.body_parts) == pytest.approx(1.0, abs=1e-5)
        assert Path(r["cam"]).is_file()


def test_flip_tta_averages_image_and_mirror(ckpt):
    from bonexray.errors import BonexrayError
    from bonexray.inference.predictor import Predictor

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, size=(3, 64, 64), dtype=np.uint8)
    plain, flip = Predictor(ckpt, device="cpu"), Predictor(ckpt, device="cpu", tta="flip")
    p0, b0 = plain.predict_arrays(batch)
    p1, b1 = plain.predict_arrays(batch[:, :, ::-1])
    pt, bt = flip.predict_arrays(batch)
    assert np.allclose(pt, (p0 + p1) / 2, atol=1e-6) and np.allclose(bt, (b0 + b1) / 2, atol=1e-6)
    assert not np.allclose(pt, p0)  # the mirror view really changes something for a random net
    sym = np.concatenate([batch[:, :, :32], batch[:, :, :32][:, :, ::-1]], axis=2)
    assert np.allclose(flip.predict_arrays(sym)[0], plain.predict_arrays(sym)[0], atol=1e-6)
    with pytest.raises(BonexrayError, match="test-time augmentation"):
        Predictor(ckpt, device="cpu", tta="rotate")


def test_d4_tta_averages_the_eight_turns_and_mirrors_and_is_invariant_to_them(ckpt):
    from bonexray.inference.predictor import Predictor

    rng = np.random.default_rng(1)
    batch = rng.integers(0, 255, size=(2, 64, 64), dtype=np.uint8)
    plain, d4 = Predictor(ckpt, device="cpu"), Predictor(ckpt, device="cpu", tta="d4")
    views = [np.rot90(batch, k, axes=(1, 2)) for k in range(4)]
    views += [v[:, :, ::-1] for v in views]
    got = [plain.predict_arrays(np.ascontiguousarray(v)) for v in views]
    pt, bt = d4.predict_arrays(batch)
    assert np.allclose(pt, np.mean([g[0] for g in got], axis=0), atol=1e-6)
    assert np.allclose(bt, np.mean([g[1] for g in got], axis=0), atol=1e-6)
    assert not np.allclose(pt, got[0][0])
    # A film turned on its side or mirrored gets the same probability: the 8 views are the same set.
    for v in views[1:]:
        assert np.allclose(d4.predict_arrays(np.ascontiguousarray(v))[0], pt, atol=1e-5)
    # The embedding (the scope gate's input) is the view as given, and a per-call tta overrides.
    assert np.allclose(d4.predict_batch(batch).embedding, plain.predict_batch(batch).embedding, atol=1e-6)
    assert np.allclose(d4.predict_batch(batch, tta="none").prob, got[0][0], atol=1e-6)


def test_the_model_cards_tta_is_the_default_everywhere_and_an_explicit_one_wins(ckpt, tmp_path):
    from bonexray.api import load_model
    from bonexray.errors import CheckpointError
    from bonexray.inference.calibrate import rewrite_checkpoint
    from bonexray.inference.predictor import Predictor

    d4_ckpt = rewrite_checkpoint(ckpt, tmp_path / "d4.ckpt", {"tta": "d4"})
    assert Predictor(ckpt, device="cpu").tta == "none"
    assert Predictor(d4_ckpt, device="cpu").tta == "d4"
    assert Predictor(d4_ckpt, device="cpu", tta="flip").tta == "flip"
    assert load_model(d4_ckpt, device="cpu")._predictor.tta == "d4"
    bad = rewrite_checkpoint(ckpt, tmp_path / "bad.ckpt", {"tta": "rotate"})
    with pytest.raises(CheckpointError, match="tta 'rotate' is not one of none, flip, d4"):
        Predictor(bad, device="cpu")


def _finding(prob: float, scope_reason: str | None = None):
    from types import SimpleNamespace

    from bonexray.core.findings import ReadingPolicy, read_image

    card = SimpleNamespace(body_parts=["hand", "hip"], threshold=0.5, borderline_band=0.1, operating_points=None,
                           calibration=None, boxes=None)
    return read_image(ReadingPolicy.from_card(card, 0.1), path="x.png", prob=prob, part_probs=[0.01, 0.99],
                      scope_reason=scope_reason)


def test_cam_caption_says_which_map():
    from bonexray.inference.cam import caption

    assert caption(_finding(0.9), 0.5)[0].startswith("ABNORMAL")
    assert caption(_finding(0.9), 0.5)[1] == "body part: hip (99%)"
    assert "learned fracture map" in caption(_finding(0.1), 0.5, "localization")[-1]
    assert "Grad-CAM++ of p(abnormal)" in caption(_finding(0.1), 0.5, "gradcam++")[-1]


def test_cam_caption_of_an_out_of_scope_image_states_no_verdict():
    lines = __import__("bonexray.inference.cam", fromlist=["caption"]).caption(
        _finding(0.219, scope_reason="not a radiograph"), 0.5, "gradcam++")
    text = " ".join(lines)
    assert lines[0] == "out of scope: not a radiograph"
    assert "normal" not in text.replace("abnormal)", "") and "hip" not in text and "0.219" not in text


def test_cam_onto_a_full_disk_is_one_line_and_the_records_are_written(ckpt, capsys, tmp_path, monkeypatch):
    import errno

    import bonexray.inference.cam as cam

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cam, "atomic_write", full_disk)  # a read-only folder fails the same way (EROFS)
    imgs = _cam_inputs(tmp_path)
    out_dir = tmp_path / "cams"
    rc, lines, err = run_cli(capsys, ckpt, *imgs, "--cam", out_dir)
    assert rc == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "cannot write" in ln]
    assert str(out_dir) in line and "No space left on device" in line
    recs = parse_json_lines(lines)
    assert len([r for r in recs if r["type"] == "image"]) == len(imgs) and not any("cam" in r for r in recs)


# --------------------------------------------------------------------------- no verdict from NaN, every file named, CSV


def test_nan_output_is_an_error_per_image_never_a_verdict(images, tmp_path, capsys):
    # What a diverged training run leaves (hash recorded), for make_manifest's body parts.
    nan_model = make_checkpoint(tmp_path / "nan.ckpt", body_parts=("hand", "wrist"), nan_output=True)
    rc, out, err = run_main(capsys, "predict", nan_model, *images)
    assert rc == 1 and strict_json_lines(out) == []
    lines = nonblank_lines(err)
    assert [ln.split(": ")[1] for ln in lines] == [str(p) for p in images]
    assert all("not a finite number" in ln and "no verdict" in ln for ln in lines)
    manifest = make_manifest(tmp_path / "data", n=8)
    rc, _, err = run_main(capsys, "evaluate", nan_model, "--data", manifest, "--out", tmp_path / "res", "--split",
                          "all", "--bootstrap", "0")
    assert rc == 2 and f"{nan_model}: the model's output is not a finite number" in err
    assert not (tmp_path / "res").exists()


def test_predict_folder_names_every_file(good_ckpt, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(radiograph_like(1)).save(folder / "a.png")
    Image.fromarray(radiograph_like(2)).save(folder / "b.webp")
    Image.fromarray(radiograph_like(3)).save(folder / "c.gif")
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(folder / "d_nan.tif")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    os.symlink("loop2", folder / "loop1")
    os.symlink("loop1", folder / "loop2")
    os.symlink(".", folder / "self")  # a folder link back to itself
    os.symlink("gone.png", folder / "dangling.png")
    rc, out, err = run_main(capsys, "predict", good_ckpt, folder, folder / "loop1")
    assert rc == 1
    assert sorted(Path(r["path"]).name for r in strict_json_lines(out)) == ["a.png", "b.webp", "c.gif"]
    lines = nonblank_lines(err)
    want = {
        "d_nan.tif": "no finite pixel", "notes.txt": "skipped: not an image file (.txt)",
        ".hidden.png": "skipped: hidden file", "loop1": "symlink loop", "loop2": "symlink loop",
        "self": "symlink loop", "dangling.png": "broken symlink",
    }
    for name, words in want.items():
        assert any(f"{folder / name}: " in ln and words in ln for ln in lines), (name, lines)
    assert len(lines) == len(want) + 1  # + loop1 named directly (reported as a loop, not "no such file")
    assert not any("no such file" in ln for ln in lines)


def test_csv_output_never_starts_a_cell_with_a_formula(good_ckpt, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@x.png", "plain.png"]
    for i, name in enumerate(names):
        Image.fromarray(radiograph_like(i)).save(folder / name)
    monkeypatch.chdir(folder)  # relative paths, as a user in that folder types them
    rc, out, _ = run_main(capsys, "predict", "--format", "csv", good_ckpt, "--", *names)
    assert rc == 0
    paths = [row["path"] for row in csv.DictReader(out.splitlines())]
    assert paths == ["'=HYPERLINK(1).png", "'+1.png", "'-2.png", "'@x.png", "plain.png"]
    from bonexray.inference.writers import csv_safe

    assert csv_safe("=1+1") == "'=1+1" and csv_safe("a=b") == "a=b" and csv_safe(0.5) == 0.5
