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


# --------------------------------------------------------------------------- MURA


# --------------------------------------------------------------------------- predict on a folder


