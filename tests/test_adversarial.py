"""Bad files a user can hand bonexray (issue #11): each gives an exit code, one line naming the file
and the reason, no traceback; the good inputs of the same call are still processed; nothing
half-written is left behind. Every bad input is built here."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonexray.cli import main
from bonexray.data.mura import read_mura
from bonexray.data.preprocess import LOCK_NAME, ImageCache
from bonexray.errors import DatasetError
from bonexray.model.checkpoint import ModelCard, save_model
from bonexray.model.network import BoneXrayNet
from builders import make_manifest, make_mura_tree, radiograph_like

PARTS = ["hand", "wrist"]  # make_manifest's body parts
SIZE = 64


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def strict_json_lines(out: str) -> list[dict]:
    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON output")

    return [json.loads(ln, parse_constant=no_constants) for ln in out.splitlines() if ln.strip()]


def leftovers(folder: Path) -> list[str]:
    """Temporary files left behind (the cache folder's lock file and the output marker are meant to stay)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_NAME, ".bonexray-out.json") and (
        p.name.startswith(".") or p.name.endswith((".tmp", ".part", ".partial"))))


def tiny_net(seed: int = 0) -> BoneXrayNet:
    torch.manual_seed(seed)
    return BoneXrayNet("efficientnet_lite0", num_body_parts=len(PARTS), pretrained=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    save_model(folder / "good.ckpt", tiny_net(), ModelCard("efficientnet_lite0", SIZE, body_parts=PARTS))
    return folder


@pytest.fixture
def images(tmp_path) -> list[Path]:
    out = []
    for i in range(2):
        p = tmp_path / "in" / f"good{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(radiograph_like(i)).save(p)
        out.append(p)
    return out


# --------------------------------------------------------------------------- damaged checkpoints


# --------------------------------------------------------------------------- manifests and caches


def test_non_utf8_manifest_is_one_line(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "d", n=4)
    manifest.write_bytes(manifest.read_bytes().replace(b"hand", b"h\xe4nd", 1))  # Latin-1 umlaut
    rc, _, err = run(capsys, "preprocess", manifest, "--out", tmp_path / "c")
    assert rc == 2 and f"{manifest}: not UTF-8 text" in err and len(error_lines(err)) == 1
    assert not (tmp_path / "c").exists()


def _append_rows(manifest: Path, rows: list[list]) -> None:
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerows(rows)


def test_duplicate_manifest_rows(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "d", n=4)  # rows: img000..img003, lines 2..5
    _append_rows(manifest, [["img001.png", "wrist", 0, "s0"]])  # same as line 3: merged
    rc, out, _ = run(capsys, "preprocess", manifest, "--out", tmp_path / "c", "--size", 16, "--quiet")
    assert rc == 0 and "line 6: img001.png repeats line 3; merged" in out
    assert len(ImageCache.open(tmp_path / "c").index) == 4
    _append_rows(manifest, [["img002.png", "hand", 0, "s1"]])  # line 4 says abnormal=1: conflict
    rc, _, err = run(capsys, "preprocess", manifest, "--out", tmp_path / "c2")
    assert rc == 2 and "img002.png is listed on lines 4 and 7 with different abnormal (1 vs 0)" in err


def test_evaluate_out_is_checked_before_the_work(model_dir, tmp_path, capsys):
    manifest = make_manifest(tmp_path / "d", n=6)
    (tmp_path / "results").write_text("an existing file")
    rc, _, err = run(capsys, "evaluate", model_dir / "good.ckpt", "--data", manifest, "--out", tmp_path / "results",
                     "--cache", tmp_path / "cache")
    assert rc == 2 and f"--out {tmp_path / 'results'}: exists and is not a folder" in err
    assert not (tmp_path / "cache").exists()  # refused before preprocessing anything


# --------------------------------------------------------------------------- MURA


def test_malformed_mura_rows_are_problems_with_file_and_line(tmp_path, capsys):
    root = make_mura_tree(tmp_path)
    good = len(read_mura(root))
    with open(root / "train_image_paths.csv", "a", newline="") as f:
        f.write("MURA-v1.1/elsewhere/image1.png\n")  # no train/ or valid/ part
    with open(root / "train_labeled_studies.csv", "a", newline="") as f:
        f.write("MURA-v1.1/train/XR_HAND/patient00004/study1_positive/,maybe\n")
    img_line = len((root / "train_image_paths.csv").read_text().splitlines())
    lab_line = len((root / "train_labeled_studies.csv").read_text().splitlines())
    rs = read_mura(root)
    assert len(rs) == good  # every good row still read
    assert any(p.startswith(f"train_image_paths.csv line {img_line}: path does not follow MURA's layout")
               for p in rs.problems)
    assert any(p.startswith(f"train_labeled_studies.csv line {lab_line}: malformed row") for p in rs.problems)
    rc, out, _ = run(capsys, "preprocess", root, "--out", tmp_path / "c", "--size", 16, "--quiet")
    assert rc == 0 and f"train_image_paths.csv line {img_line}" in out


def test_mura_tree_without_csvs(tmp_path):
    root = make_mura_tree(tmp_path)
    with_csvs = {r.path: (r.abnormal, r.body_part, r.study_id, r.split) for r in read_mura(root)}
    for f in root.glob("*.csv"):
        f.unlink()
    rs = read_mura(root)
    assert {r.path: (r.abnormal, r.body_part, r.study_id, r.split) for r in rs} == with_csvs
    for split in ("train", "valid"):
        assert f"{split}_image_paths.csv missing: {split} images found by scanning {split}/" in rs.problems
        assert f"{split}_labeled_studies.csv missing: {split} labels taken from the study folder names" in rs.problems


# --------------------------------------------------------------------------- predict on a folder


