"""One prediction reads each model file once: the checkpoint is hashed once (the hash serves the backend
record and the export cache key), the cached or given ONNX file is read and verified once (without the
onnx library when intact) and handed to the engine as bytes, and the model card is built once."""
from __future__ import annotations

import builtins
import io
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bonexray.cli import main
from bonexray.core.card import ModelCard
from bonexray.inference import backends
from builders import make_checkpoint, radiograph_like


@pytest.fixture()
def counted(monkeypatch):
    """(file opens for reading by resolved path, ModelCard.from_dict calls, onnx-library checks) during the test."""
    opens: Counter = Counter()
    cards, library_checks = [], []
    real_open, real_io_open = builtins.open, io.open

    def counting(real):
        def wrapper(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and "r" in mode and "+" not in mode:
                opens[Path(file).resolve()] += 1
            return real(file, mode, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", counting(real_open))
    monkeypatch.setattr(io, "open", counting(real_io_open))
    real_from_dict = ModelCard.from_dict.__func__
    monkeypatch.setattr(ModelCard, "from_dict", classmethod(lambda cls, d: cards.append(1) or real_from_dict(cls, d)))
    import bonexray.inference.onnx_file as onnx_file

    real_check = onnx_file.verify_onnx_integrity
    monkeypatch.setattr(onnx_file, "verify_onnx_integrity", lambda *a, **k: library_checks.append(a) or real_check(*a, **k))
    return opens, cards, library_checks


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint whose backend record accepts onnxruntime, its cached export made, and one image."""
    base = tmp_path_factory.mktemp("verify-once")
    ckpt = make_checkpoint(base / "m.ckpt")
    from bonexray.model.hub import file_sha256

    record = {"format": backends.RECORD_FORMAT, "model_sha256": file_sha256(ckpt),
              "backends": {"onnx": {"img_s": 10.0, "accepted": True}}}
    backends.backend_record_path(ckpt).write_text(json.dumps(record))
    backends.exported_onnx(ckpt)  # the cache a previous run left
    image = base / "x.png"
    Image.fromarray(radiograph_like(1, 100, 80)).save(image)
    return ckpt, image


def _cached(ckpt: Path) -> Path:
    (cached,) = ckpt.parent.glob(f"{ckpt.name}.*.onnx")
    return cached


def _predict(capsys, *args) -> dict:
    assert main(["predict", *map(str, args)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    return json.loads(line)


def test_a_checkpoint_on_onnxruntime_is_hashed_once_and_its_export_read_once(model, counted, capsys):
    ckpt, image = model
    opens, cards, library_checks = counted
    cached = _cached(ckpt)
    record = _predict(capsys, ckpt, image, "--backend", "auto", "--device", "cpu")
    assert record["prob_abnormal"] is not None
    assert opens[ckpt.resolve()] == 1  # one hash: backend record and export cache key
    assert opens[cached.resolve()] == 1
    assert len(cards) == 1 and library_checks == []


def test_an_onnx_file_is_read_once_and_its_card_built_once(model, counted, capsys):
    ckpt, image = model
    cached = _cached(ckpt)
    given = ckpt.parent / "given.onnx"
    given.write_bytes(cached.read_bytes())
    opens, cards, library_checks = counted
    _predict(capsys, given, image)
    assert opens[given.resolve()] == 1 and len(cards) == 1 and library_checks == []


def test_a_bundled_model_is_hashed_once(counted, capsys, tmp_path):
    from bonexray.model import hub

    hub._verified.clear()
    image = tmp_path / "x.png"
    Image.fromarray(radiograph_like(2, 100, 80)).save(image)
    opens, cards, _ = counted
    _predict(capsys, "fracatlas", image, "--device", "cpu")
    assert opens[hub.find_bundled("fracatlas").path.resolve()] == 1 and len(cards) == 1


def test_an_onnx_file_that_protobuf_did_not_write_canonically_goes_through_the_onnx_check(model, counted, tmp_path,
                                                                                        capsys):
    """The fast check is exact: bytes that do not hold the graph as one canonical field are judged by the
    onnx library (here: the same model with its graph written in two parts, which protobuf merges)."""
    import onnx

    ckpt, image = model
    cached = _cached(ckpt)
    m = onnx.load(str(cached))
    graph = m.SerializeToString()
    rest = onnx.ModelProto()
    rest.CopyFrom(m)
    rest.ClearField("graph")
    named, body = onnx.ModelProto(), onnx.ModelProto()
    named.graph.name = m.graph.name
    body.graph.CopyFrom(m.graph)
    body.graph.ClearField("name")
    reordered = tmp_path / "reordered.onnx"
    reordered.write_bytes(rest.SerializeToString() + named.SerializeToString() + body.SerializeToString())
    assert onnx.load(str(reordered)).SerializeToString() == graph  # the same model
    _, _, library_checks = counted
    _predict(capsys, reordered, image)
    assert len(library_checks) == 1
