"""One contract per source kind: every front end (CLI, Python API, serve, PACS) gives the same finding.

Each front end is a thin adapter over bonexray.pipeline; these tests check that by comparing the
records they return for the same source, field by field (probabilities to 1e-6), with a model that has
a box head whose card states both box levels, so box mapping and levels are compared too.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from bonexray.cli import main
from builders import png_bytes, radiograph_like
from test_pacs import part10, synthetic_cr

PARTS = ("hand", "leg", "shoulder")
SIZE = 64


def _save(path, net, boxes: dict):
    from bonexray.model.checkpoint import ModelCard, save_model

    card = ModelCard(backbone="efficientnet_lite0", image_size=SIZE, mean=net.mean, std=net.std,
                     body_parts=list(PARTS), threshold=0.5, boxes=boxes)
    return save_model(path, net, card)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random box-head model whose box thresholds put some boxes of the probe image at each level."""
    import torch

    from bonexray.inference.predictor import Predictor
    from bonexray.model.detection import BoxSettings
    from bonexray.model.network import BoneXrayNet

    torch.manual_seed(3)
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=len(PARTS), pretrained=None, box_head=True)
    with torch.no_grad():  # spread the box scores so that the two levels can be told apart
        net.box_head.cls.weight.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("pipeline-model")
    probe = _save(folder / "probe.ckpt", net, {"threshold": 0.5})
    from bonexray.pipeline import decode

    tile = decode(_probe_png(), SIZE).tile
    found = Predictor(probe, backend="torch").predict_batch(tile[None], box_settings=BoxSettings(threshold=0.0)).boxes[0]
    scores = sorted(found[:, 4], reverse=True)
    assert len(scores) >= 4, "the probe model must give boxes"
    boxes = {"threshold": float(scores[1]), "suspicious_threshold": float(scores[3]), "nms_iou": 0.5,
             "max_detections": 10}
    return _save(folder / "model.ckpt", net, boxes)


def _probe_png() -> bytes:
    return png_bytes(radiograph_like(5, 90, 70, abnormal=1))


def _same(a: dict, b: dict, ignore=("path", "study")) -> None:
    """Two records agree: the same keys and values, probabilities and box scores within 1e-6."""
    a = {k: v for k, v in a.items() if k not in ignore}
    b = {k: v for k, v in b.items() if k not in ignore}
    assert a.keys() == b.keys()
    for k in a:
        if k == "boxes" and a[k] is not None:
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k], strict=True):
                assert x["level"] == y["level"] and x["score"] == pytest.approx(y["score"], abs=1e-6)
                assert [x[c] for c in ("x0", "y0", "x1", "y1")] == pytest.approx([y[c] for c in ("x0", "y0", "x1", "y1")],
                                                                                abs=0.11)
        elif isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
        else:
            assert a[k] == b[k], k


def _cli(capsys, model, *args) -> list[dict]:
    assert main(["predict", str(model), "--device", "cpu", *map(str, args)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _api(model):
    import bonexray

    return bonexray.load_model(str(model), device="cpu")


@pytest.fixture(scope="module")
def client(model):
    from fastapi.testclient import TestClient

    from bonexray.web.app import create_app

    with TestClient(create_app(str(model), device="cpu")) as c:
        yield c


def _serve(client, name: str, data: bytes) -> dict:
    body = client.post("/api/predict", files=[("files", (name, data, "application/octet-stream"))]).json()
    return body["images"][0]


def _pacs(model, ds) -> dict:
    from bonexray.inference.predictor import Predictor
    from bonexray.pacs.analysis import Instance, analyse_study

    analysis = analyse_study(Predictor(model, device="cpu"), str(ds.StudyInstanceUID), [Instance("x", ds)])
    assert not analysis.problems
    return analysis.images[0].record.record()


def test_file_path_gives_one_finding_in_every_front_end(model, client, capsys, tmp_path):
    path = tmp_path / "xray.png"
    path.write_bytes(_probe_png())
    (cli,) = _cli(capsys, model, path)
    api = _api(model).predict(str(path))
    assert cli["path"] == api.path == str(path)
    assert {b["level"] for b in cli["boxes"]} == {"definite", "suspicious"}  # both levels are compared
    assert cli["finding"] in ("negative", "suspicious", "positive")
    _same(cli, api.record())
    _same(cli, _serve(client, "xray.png", path.read_bytes()))


def test_bytes_give_the_finding_of_their_file(model, client, capsys, tmp_path):
    data = _probe_png()
    (tmp_path / "b.png").write_bytes(data)
    (cli,) = _cli(capsys, model, tmp_path / "b.png")
    api = _api(model).predict(data)
    assert api.path is None
    _same(cli, api.record())
    _same(cli, _serve(client, "b.png", data))


def test_array_and_pil_give_the_finding_of_their_file(model, capsys, tmp_path):
    data = _probe_png()
    (tmp_path / "a.png").write_bytes(data)
    (cli,) = _cli(capsys, model, tmp_path / "a.png")
    pil = Image.open(io.BytesIO(data))
    api = _api(model)
    from_array, from_pil = api.predict([np.asarray(pil.convert("L"))]), api.predict([pil])
    assert from_array[0].path is None and from_pil[0].path is None
    _same(cli, from_array[0].record())
    _same(cli, from_pil[0].record())


def test_dicom_dataset_gives_one_finding_in_every_front_end(model, client, capsys, tmp_path):
    ds = synthetic_cr(generate_uid(), seed=4)
    data = part10(ds)
    (tmp_path / "cr.dcm").write_bytes(data)
    (cli,) = _cli(capsys, model, tmp_path / "cr.dcm")
    api = _api(model).predict(pydicom.dcmread(io.BytesIO(data)))
    _same(cli, api.record())
    _same(cli, _serve(client, "cr.dcm", data))
    _same(cli, _pacs(model, pydicom.dcmread(io.BytesIO(data))))


def test_out_of_scope_image_has_no_verdict_anywhere(model, client, capsys, tmp_path):
    ds = synthetic_cr(generate_uid(), seed=4)
    ds.Modality = "CT"  # the scope gate refuses a non-radiograph modality
    data = part10(ds)
    (tmp_path / "ct.dcm").write_bytes(data)
    (cli,) = _cli(capsys, model, tmp_path / "ct.dcm")
    assert cli["in_scope"] is False and cli["scope_reason"] == "not a radiograph"
    assert cli["abnormal"] is cli["finding"] is cli["body_part"] is cli["boxes"] is None
    _same(cli, _api(model).predict(data).record())
    _same(cli, _serve(client, "ct.dcm", data))


def test_predict_study_never_merges_two_study_instance_uids(model, capsys, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    first, second = generate_uid(), generate_uid()
    (folder / "a.dcm").write_bytes(part10(synthetic_cr(first, seed=1)))
    (folder / "b.dcm").write_bytes(part10(synthetic_cr(second, seed=2)))
    (folder / "c.dcm").write_bytes(part10(synthetic_cr(first, seed=3)))
    (folder / "d.png").write_bytes(_probe_png())
    recs = _cli(capsys, model, folder, "--study")
    studies = {r["study"]: r for r in recs if r["type"] == "study"}
    images = {r["path"].rsplit("/", 1)[1]: r for r in recs if r["type"] == "image"}
    assert set(studies) == {first, second, str(folder)}
    assert (images["a.dcm"]["study"], images["c.dcm"]["study"], images["b.dcm"]["study"]) == (first, first, second)
    assert images["d.png"]["study"] == str(folder)
    assert [studies[s]["n_images"] for s in (first, second, str(folder))] == [2, 1, 1]
    for s in studies.values():
        members = [r for r in images.values() if r["study"] == s["study"]]
        assert s["n_assessed"] == len(members) and s["body_parts"] == list(dict.fromkeys(m["body_part"] for m in members))
        assert s["mixed_body_parts"] == (len(s["body_parts"]) > 1)
        assert s["n_positive"] + s["n_suspicious"] + s["n_negative"] == s["n_assessed"]


def test_serve_grouping_auto_and_one(client):
    files = [("files", (f"{n}.png", png_bytes(radiograph_like(n, 80, 70)), "image/png")) for n in range(3)]
    auto = client.post("/api/predict", files=files).json()
    assert [s["n_images"] for s in auto["studies"]] == [1, 1, 1]
    one = client.post("/api/predict", files=files, data={"grouping": "one"}).json()
    assert [s["n_images"] for s in one["studies"]] == [3]
    assert client.post("/api/predict?grouping=one", files=files).json()["studies"][0]["n_images"] == 3
    bad = client.post("/api/predict", files=files, data={"grouping": "some"})
    assert bad.status_code == 422 and "grouping" in bad.json()["detail"]


def test_non_utf8_file_names_are_escaped_in_json_and_csv(model, capsys, tmp_path):
    import os

    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(_probe_png())
    name = os.fsdecode(raw)
    (rec,) = _cli(capsys, model, name)
    assert rec["path"].endswith("caf\\xe9.png")
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in rec["path"])
    assert main(["predict", str(model), "--device", "cpu", "--format", "csv", name]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")  # no lone surrogate: encodable, so no raw bytes reach the file
    assert "caf\\xe9.png" in out


def test_decode_parses_a_dicom_file_once_and_takes_its_tags_from_that_parse(tmp_path, monkeypatch):
    """Pixels, grouping tags and the Modality evidence of a DICOM file come from one pydicom parse."""
    import pydicom

    from bonexray.pipeline import decode

    study = generate_uid()
    ds = synthetic_cr(study, seed=2)
    path = tmp_path / "cr.dcm"
    path.write_bytes(part10(ds))
    parses = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parses.append(k) or real(*a, **k))
    for source in (path, path.read_bytes()):
        parses.clear()
        d = decode(source, SIZE, name="cr.dcm")
        assert len(parses) == 1
        assert d.study_uid == study and d.tags["Modality"] == "CR" and d.tags["SOPInstanceUID"] == ds.SOPInstanceUID
        assert d.evidence.modality == "CR" and d.tile.shape == (SIZE, SIZE)
