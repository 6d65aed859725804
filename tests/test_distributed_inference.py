"""predict and evaluate across processes (Lightning DDP on CPU, gloo): the same output as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonexray.cli import main
from bonexray.inference.distributed import parse_devices, wants_distributed
from builders import make_checkpoint, make_manifest, radiograph_like

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonexray.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def _study_tree(base: Path, n: int = 20) -> Path:
    """MURA-style study folders (uneven sizes, sizes not a multiple of a batch) plus one damaged file."""
    for i in range(n):
        folder = base / f"patient{i // 7:05d}" / f"study{1 + (i // 3) % 2}_{'positive' if i % 2 else 'negative'}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(radiograph_like(i, 90 + 3 * i, 70 + i, abnormal=i % 2)).save(folder / f"image{i}.png")
    (base / "patient00000" / "study1_negative" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return base


def _out_of_scope_files(folder: Path) -> Path:
    """Files the scope gate refuses (a colour photo, a blank image, a CT slice) and a CR DICOM it
    assesses; both DICOMs state one StudyInstanceUID, so they form one study."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
    Image.fromarray(photo).save(folder / "photo.png")
    Image.fromarray(np.full((90, 70), 128, np.uint8)).save(folder / "blank.png")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.save_as(folder / "ct.dcm")
    ct.Modality = "CR"
    ct.SOPInstanceUID = pydicom.uid.generate_uid()
    ct.save_as(folder / "cr.dcm")
    return folder


def _gated_checkpoint(path: Path, images: list[Path]) -> Path:
    """A small model whose card holds the pixel gate (feature distance and in-scope head), fitted on
    ``images`` so that it refuses about half of them: the embedding checks decide some records."""
    from bonexray.inference.calibrate import rewrite_checkpoint
    from bonexray.inference.predictor import Predictor
    from bonexray.inference.scope import INVERTED, fit_feature_scope, fit_scope_head
    from bonexray.pipeline import decode

    plain = make_checkpoint(path.with_name("plain.ckpt"), body_parts=("hand", "leg"))
    predictor = Predictor(plain, device="cpu", backend="torch")
    tiles = [decode(p, predictor.image_size).tile for p in images]
    emb = predictor.predict_batch(np.stack(tiles), boxes=False).embedding
    inverted = predictor.predict_batch(255 - np.stack(tiles), boxes=False).embedding
    scope = fit_feature_scope(emb, emb, k=4, quantile=0.6).to_card()
    scope["head"] = fit_scope_head(emb, {INVERTED: inverted}, emb, quantile=0.8).to_card()
    return rewrite_checkpoint(plain, path, {"scope": scope})


def test_devices_syntax():
    assert parse_devices("2") == 2 and parse_devices(None) == 1 and parse_devices("0,1") == "0,1"
    assert not wants_distributed("1") and wants_distributed("2") and wants_distributed("1", num_nodes=2)
    assert wants_distributed("auto")  # Lightning decides how many: not the one-process path


def test_cam_across_processes_is_refused_in_one_line(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", body_parts=("hand", "leg"))
    png = tmp_path / "a.png"
    Image.fromarray(radiograph_like(0)).save(png)
    assert main(["predict", str(ckpt), str(png), "--cam", str(tmp_path / "cams"), "--devices", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bonexray predict: error: --cam runs in one process") and "\n" not in err


@pytest.mark.slow
def test_predict_two_processes_writes_what_one_process_writes(tmp_path):
    """The scope gate on (the default), with a model card that holds the pixel gate: every verdict and
    every refusal, from the file checks and the embedding checks alike, as one process gives them."""
    data = _study_tree(tmp_path / "data")
    _out_of_scope_files(data / "patient00002" / "study9_negative")
    ckpt = _gated_checkpoint(tmp_path / "m.ckpt", sorted(data.rglob("image*.png")))
    one = _cli("predict", ckpt, data, "--study", "--batch-size", "4", cwd=tmp_path)
    two = _cli("predict", ckpt, data, "--study", "--batch-size", "4", "--devices", "2", cwd=tmp_path)
    assert one.returncode == 1, one.stderr  # the damaged file
    assert two.returncode == one.returncode, two.stderr[-3000:]
    assert two.stdout == one.stdout  # byte for byte: every record, once, in input order
    recs = [json.loads(line) for line in one.stdout.splitlines()]
    assert sum(r["type"] == "image" for r in recs) == 24 and sum(r["type"] == "study" for r in recs) > 3
    by_name = {Path(r["path"]).name: r for r in recs if r["type"] == "image"}
    assert by_name["photo.png"]["scope_reason"] == "not a radiograph" and by_name["photo.png"]["abnormal"] is None
    assert by_name["blank.png"]["scope_reason"] == "blank or nearly constant image"
    assert by_name["ct.dcm"]["scope_reason"] == "not a radiograph"
    assert by_name["ct.dcm"]["study"] == by_name["cr.dcm"]["study"]  # one StudyInstanceUID, one study
    gated = [r for n, r in by_name.items() if n.startswith("image")]
    # The embedding checks refuse some of the radiograph-like images and pass others.
    assert any(r["in_scope"] is False for r in gated) and any(r["in_scope"] is True for r in gated)
    assert {r["scope_reason"] for r in gated if r["in_scope"] is False} <= {
        "not a radiograph", "body part not among the model's classes", "image looks inverted (a negative)"}
    broken = str(data / "patient00000" / "study1_negative" / "broken.png")
    assert [ln for ln in two.stderr.splitlines() if ln.startswith("bonexray predict:")] == \
           [ln for ln in one.stderr.splitlines() if ln.startswith("bonexray predict:")]
    assert any(ln.startswith(f"bonexray predict: {broken}: ") for ln in two.stderr.splitlines())
    # CSV through the same path, and the gate off.
    one_csv = _cli("predict", ckpt, data, "--format", "csv", "--devices", "1", "--no-scope-check", cwd=tmp_path)
    two_csv = _cli("predict", ckpt, data, "--format", "csv", "--devices", "2", "--no-scope-check", cwd=tmp_path)
    assert two_csv.stdout == one_csv.stdout and one_csv.stdout.count("\n") == 25


@pytest.mark.slow
def test_evaluate_two_processes_writes_what_one_process_writes(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", body_parts=("hand", "leg"))
    manifest = make_manifest(tmp_path / "d", n=22, parts=("hand", "leg"))
    common = [ckpt, "--data", manifest, "--split", "all", "--bootstrap", "20", "--cache", tmp_path / "cache",
              "--batch-size", "4"]
    one = _cli("evaluate", *common, "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("evaluate", *common, "--out", tmp_path / "two", "--devices", "2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "predictions.csv").read_text() == (tmp_path / "one" / "predictions.csv").read_text()
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2 == m1 and m1["n_images"] == 22
    assert two.stdout.count("evaluated 22 images") == 1  # the summary once, from rank 0


@pytest.mark.slow
def test_predict_launched_by_torchrun(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", body_parts=("hand", "leg"))
    data = _study_tree(tmp_path / "data", n=9)
    one = _cli("predict", ckpt, data, cwd=tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bonexray.cli", "predict", str(ckpt), str(data), "--devices", "2"]
    two = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    # The damaged file: exit 1 from rank 0, which torchrun passes on.
    assert one.returncode == 1 and two.returncode == 1, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.count('"type": "image"') == 9, two.stderr[-3000:]


@pytest.mark.slow
def test_evaluate_launched_by_torchrun_waits_for_one_cache(tmp_path):
    """torchrun starts both ranks at once: local rank 0 builds the missing cache, rank 1 waits for it."""
    ckpt = make_checkpoint(tmp_path / "m.ckpt", body_parts=("hand", "leg"))
    manifest = make_manifest(tmp_path / "d", n=14, parts=("hand", "leg"))
    common = [ckpt, "--data", manifest, "--split", "all", "--bootstrap", "10", "--batch-size", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bonexray.cli", "evaluate", *map(str, common), "--cache", str(tmp_path / "c2"),
           "--out", str(tmp_path / "two"), "--devices", "2"]
    two = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert not (tmp_path / "c2" / ".images.u8.partial").exists() and (tmp_path / "c2" / "meta.json").is_file()
    one = _cli("evaluate", *common, "--cache", tmp_path / "c1", "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert (tmp_path / "two" / "predictions.csv").read_text() == (tmp_path / "one" / "predictions.csv").read_text()
    assert two.stdout.count("evaluated 14 images") == 1


def test_a_waiting_rank_gives_up_when_rank_zero_builds_nothing(tmp_path):
    from bonexray.data.datasets import load_dataset
    from bonexray.errors import DatasetError
    from bonexray.evaluation.evaluate import _wait_for_cache

    records = load_dataset(make_manifest(tmp_path / "d", n=4))
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetError, match="did rank 0 fail"):
        _wait_for_cache(records, tmp_path / "c", 32, stall_s=1.5)


def _box_checkpoint(path: Path) -> Path:
    """An untrained model with a box head (random weights) and a low operating point, so it reports boxes."""
    import torch

    from bonexray.model.checkpoint import ModelCard, save_model
    from bonexray.model.network import BoneXrayNet

    torch.manual_seed(0)
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained=None, box_head=True)
    card = ModelCard(backbone="efficientnet_lite0", image_size=64, mean=net.mean, std=net.std, body_parts=["hand", "leg"],
                     threshold=0.5, boxes={"threshold": 0.05, "max_detections": 3})
    return save_model(path, net, card)


@pytest.mark.slow
def test_box_model_across_two_processes_writes_what_one_process_writes(tmp_path):
    """Boxes (predict, in original pixels) and localisation metrics (evaluate) with --devices 2."""
    from builders import make_fracatlas_tree

    ckpt = _box_checkpoint(tmp_path / "box.ckpt")
    root = make_fracatlas_tree(tmp_path / "data", n_groups=6)
    images = root / "images" / "Fractured"
    one = _cli("predict", ckpt, images, "--batch-size", "4", cwd=tmp_path)
    two = _cli("predict", ckpt, images, "--batch-size", "4", "--devices", "2", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout
    assert any(json.loads(line)["boxes"] for line in one.stdout.splitlines())
    for devices in ("1", "2"):
        run = _cli("evaluate", ckpt, "--data", root, "--split", "all", "--out", tmp_path / f"e{devices}",
                   "--bootstrap", "10", "--cache", tmp_path / "cache", "--devices", devices, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / f"e{d}" / "metrics.json").read_text()) for d in ("1", "2"))
    assert "localization" in m1 and m2 == m1


@pytest.mark.slow
def test_fewer_images_than_processes(tmp_path):
    """Rank 1 gets no image at all: it must still hand its (empty) share to rank 0, not hang or crash."""
    ckpt = make_checkpoint(tmp_path / "m.ckpt", body_parts=("hand", "leg"))
    png = tmp_path / "only.png"
    Image.fromarray(radiograph_like(3)).save(png)
    one = _cli("predict", ckpt, png, cwd=tmp_path)
    two = _cli("predict", ckpt, png, "--devices", "2", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.count("\n") == 1
