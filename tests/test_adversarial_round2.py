"""Hardening, round 2 (issue #24): a cache two runs share, model cards that would give wrong answers, one NaN
policy for every front end, the server under idle sockets, and the tracebacks of the second adversarial pass.
Every bad input is built here; each test fails without its fix."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning  # noqa: F401 - imported here, not first inside a test: its log handler keeps the stderr it finds
import numpy as np
import pytest
import torch
from PIL import Image

from bonexray.cli import main
from bonexray.data.preprocess import ImageCache, build_cache, load_for_model
from bonexray.errors import BonexrayError, CheckpointError
from bonexray.model.checkpoint import ModelCard, save_model, stamp_weights_sha256
from bonexray.model.network import BoneXrayNet
from builders import make_manifest, radiograph_like
from conftest import SHARED_DATA, requires_shared_data

PARTS = ["hand", "wrist"]
SIZE = 64
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


def lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def tiny_net(seed: int = 0, parts=PARTS) -> BoneXrayNet:
    torch.manual_seed(seed)
    return BoneXrayNet("efficientnet_lite0", num_body_parts=len(parts), pretrained=None)


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models2")
    return save_model(folder / "good.ckpt", tiny_net(), ModelCard("efficientnet_lite0", SIZE, body_parts=PARTS))


@pytest.fixture
def images(tmp_path) -> list[Path]:
    out = []
    for i in range(2):
        p = tmp_path / "in" / f"good{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(radiograph_like(i)).save(p)
        out.append(p)
    return out


def bonexray_cmd(*argv) -> list[str]:
    return [sys.executable, "-c", "import sys; from bonexray.cli import main; sys.exit(main(sys.argv[1:]))",
            *[str(a) for a in argv]]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --------------------------------------------------------------------------- 1, 4: the cache


# --------------------------------------------------------------------------- 2, 5, 7, 8: the model card


# --------------------------------------------------------------------------- 3, 9: ONNX


# --------------------------------------------------------------------------- 6, 11: NaN


# --------------------------------------------------------------------------- 10: dataset readers and --limit


# --------------------------------------------------------------------------- 12, 13: the server


# --------------------------------------------------------------------------- 14, 15: training refusals


# --------------------------------------------------------------------------- 16, 17, 18: messages


