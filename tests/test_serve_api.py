"""`bonexray serve`: the JSON API, its limits and error paths, the model card, the CLI."""
from __future__ import annotations

import base64
import io
import socket
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from builders import LiveServer, make_checkpoint, nonblank_lines, png_bytes, radiograph_like, run_main
from conftest import SHARED_DATA, requires_shared_data
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from bonexray.cli import main
from bonexray.web import create_app
from bonexray.web.uploads import UploadLimits

KEY = "secret-key-123"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "loc.ckpt", localization_head=True)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "plain.ckpt", seed=1)


@pytest.fixture(scope="module")
def client(checkpoint):
    return TestClient(create_app(checkpoint))


def _png(seed: int = 0, abnormal: int = 0, h: int = 96, w: int = 80) -> bytes:
    return png_bytes(radiograph_like(seed, h, w, abnormal=abnormal))


def _files(*named: tuple[str, bytes]):
    return [("files", (name, data)) for name, data in named]


def _header_only_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _assert_error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and "Traceback" not in r.text
    for w in words:
        assert w in body["detail"], body["detail"]
    return body


# --------------------------------------------------------------------------- predictions


def test_predict_one_image_matches_predict_cli(client, checkpoint, tmp_path, capsys):
    data = _png(3, abnormal=1)
    r = client.post("/api/predict", files=_files(("wrist.png", data)))
    assert r.status_code == 200, r.text
    body = r.json()
    (img,) = body["images"]
    assert "heatmap_png" not in img and body.get("heatmap") is None
    # Same fields and numbers as `bonexray predict` on the same file.
    (tmp_path / "wrist.png").write_bytes(data)
    assert main(["predict", str(checkpoint), str(tmp_path / "wrist.png")]) == 0
    import json

    cli = json.loads(capsys.readouterr().out.splitlines()[0])
    # serve leaves null fields out (boxes of a model without a box head, scope_reason of an in-scope image).
    assert {k for k, v in cli.items() if v is not None} - {"path"} <= set(img)
    for key in ("prob_abnormal", "abnormal", "body_part", "prob_hand", "prob_leg", "prob_shoulder", "truncated"):
        assert img[key] == cli[key], key
    assert img["path"] == "wrist.png" and img["study"] == "image 1"  # grouping=auto: a file alone is its study
    assert body["study"]["n_images"] == 1 and body["study"]["prob_abnormal"] == img["prob_abnormal"]
    assert body["threshold"] == 0.5


def test_study_of_several_images_is_their_mean(client):
    files = _files(*((f"view{i}.png", _png(i, abnormal=i % 2)) for i in range(3)))
    body = client.post("/api/predict", files=files, data={"grouping": "one"}).json()
    probs = [im["prob_abnormal"] for im in body["images"]]
    assert [im["path"] for im in body["images"]] == ["view0.png", "view1.png", "view2.png"]
    assert body["study"]["type"] == "study" and body["study"]["n_images"] == 3
    assert body["study"]["prob_abnormal"] == pytest.approx(np.mean(probs), abs=1e-6)
    assert body["study"]["abnormal"] == (body["study"]["prob_abnormal"] >= body["threshold"])


def test_heatmaps_are_pngs_of_the_learned_map(client):
    r = client.post("/api/predict?heatmap=1", files=_files(("a.png", _png(1, abnormal=1))))
    body = r.json()
    assert body["heatmap"] == "learned fracture map"
    img = body["images"][0]
    overlay = Image.open(io.BytesIO(base64.b64decode(img["heatmap_png"])))
    plain = Image.open(io.BytesIO(base64.b64decode(img["image_png"])))
    assert overlay.format == plain.format == "PNG" and overlay.size == plain.size == (512, 512)
    assert overlay.mode == "RGB" and np.asarray(overlay).std(axis=2).max() > 0  # coloured: a heatmap is drawn
    assert np.asarray(plain.convert("RGB")).std(axis=2).max() == 0  # the radiograph alone is gray


def test_gradcam_when_the_model_has_no_fracture_map(plain_checkpoint):
    c = TestClient(create_app(plain_checkpoint))
    assert c.get("/api/model").json()["heatmap"] == "Grad-CAM++"
    body = c.post("/api/predict?heatmap=true", files=_files(("a.png", _png(2)))).json()
    assert body["heatmap"] == "Grad-CAM++" and body["images"][0]["heatmap_png"]


def test_onnx_model_has_no_heatmap(checkpoint, tmp_path):
    from bonexray.inference.export import export_onnx

    onnx = export_onnx(checkpoint, tmp_path / "m.onnx")
    c = TestClient(create_app(onnx))
    card = c.get("/api/model").json()
    assert card["format"] == "onnx" and card["heatmap"] is None and "ONNX" in card["heatmap_note"]
    body = c.post("/api/predict?heatmap=1", files=_files(("a.png", _png(4)))).json()
    img = body["images"][0]
    assert "heatmap_png" not in img and img["image_png"] and body.get("heatmap") is None
    ref = TestClient(create_app(checkpoint)).post("/api/predict", files=_files(("a.png", _png(4)))).json()
    assert img["prob_abnormal"] == pytest.approx(ref["images"][0]["prob_abnormal"], abs=1e-4)


@requires_shared_data
def test_real_dicom_and_jpeg(client):
    dcm = (SHARED_DATA / "dicom" / "RG3_UNCR.dcm").read_bytes()
    jpg = min((SHARED_DATA / "FracAtlas" / "images" / "Fractured").glob("*.jpg"))
    r = client.post("/api/predict", files=_files(("RG3_UNCR.dcm", dcm), (jpg.name, jpg.read_bytes())))
    assert r.status_code == 200, r.text
    assert [im["path"] for im in r.json()["images"]] == ["RG3_UNCR.dcm", jpg.name]


# --------------------------------------------------------------------------- model card, page, docs


def test_model_card_and_health(client):
    card = client.get("/api/model").json()
    assert card["backbone"] == "efficientnet_lite0" and card["image_size"] == 64
    assert card["body_parts"] == ["hand", "leg", "shoulder"] and card["threshold"] == 0.5
    assert card["heatmap"] == "learned fracture map" and "Not a medical device" in card["intended_use"]
    assert card["training_data"] is None  # a file outside a run directory
    assert client.get("/healthz").json() == {"status": "ok"}


def test_model_card_names_the_training_data(trained_checkpoint):
    card = TestClient(create_app(trained_checkpoint)).get("/api/model").json()
    data = card["training_data"]
    assert data["dataset"] == "manifest.csv" and data["source"] == "manifest" and data["epochs"] == 2
    assert sum(data["images"].values()) > 0 and "/" not in data["dataset"]


def test_page_and_static_files_are_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for asset in ("/static/app.js", "/static/app.css"):
        assert asset in html
        assert client.get(asset).status_code == 200
    for text in (html, client.get("/static/app.js").text, client.get("/static/app.css").text):
        # Nothing from outside (the SVG namespace is a name, never fetched).
        text = text.replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text


def test_openapi_schema_matches_the_api(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/api/predict"]["post"]
    files = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]
    assert files == {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": "PNG, JPEG or DICOM files"}
    assert [p["name"] for p in post["parameters"]] == ["heatmap", "grouping"]
    grouping = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["grouping"]
    assert grouping["enum"] == ["auto", "one"]
    assert {"200", "400", "413", "415", "422"} <= set(post["responses"])
    components = schema["components"]["schemas"]
    assert {"images", "study", "threshold"} <= set(components["PredictResponse"]["properties"])
    assert {"/api/model", "/healthz"} <= set(schema["paths"])
    docs = client.get("/docs").text
    assert "cdn" not in docs and client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200


# --------------------------------------------------------------------------- error paths


def test_empty_upload(client):
    _assert_error(client.post("/api/predict", files=[], data={}), 415, "multipart/form-data")
    boundary = "xyz"
    r = client.post("/api/predict", content=f"--{boundary}--\r\n".encode(),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    _assert_error(r, 400, "no files")
    _assert_error(client.post("/api/predict", files=_files(("empty.png", b""))), 422, "empty.png", "empty file")


def test_wrong_field_and_text_field(client):
    _assert_error(client.post("/api/predict", files=[("file", ("a.png", _png()))]), 400, "'file'", "files=@")
    _assert_error(client.post("/api/predict", data={"files": "not a file"},
                              files=[("other", ("a.png", b"x"))]), 400, "must carry files")


def test_garbage_and_corrupt_bytes(client):
    rng = np.random.default_rng(0)
    body = _assert_error(client.post("/api/predict", files=_files(("random.jpg", rng.bytes(5000)))),
                         422, "random.jpg", "not an image")
    assert body["errors"] == [{"file": "random.jpg", "reason": body["errors"][0]["reason"]}]
    corrupt = _png(5)[:60] + b"\0" * 200  # a PNG header followed by nonsense
    _assert_error(client.post("/api/predict", files=_files(("bad.png", corrupt))), 422, "bad.png")
    fake_dicom = b"\0" * 128 + b"DICM" + b"\xff" * 64
    _assert_error(client.post("/api/predict", files=_files(("x.dcm", fake_dicom))), 422, "x.dcm", "DICOM")
    assert client.get("/healthz").status_code == 200  # still up


def test_decompression_bombs(checkpoint, client):
    # A header declaring 100,000 x 100,000 pixels: refused by the default limit before decoding.
    _assert_error(client.post("/api/predict", files=_files(("bomb.png", _header_only_png(100_000, 100_000)))),
                  422, "bomb.png", "decompression bomb")
    # A real, highly compressible 3000 x 3000 PNG against a 1-megapixel limit.
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    small = TestClient(create_app(checkpoint, limits=UploadLimits(max_pixels=1_000_000)))
    _assert_error(small.post("/api/predict", files=_files(("zeros.png", buf.getvalue()))), 422, "zeros.png", "bomb")


def test_too_many_files_and_too_large(checkpoint):
    c = TestClient(create_app(checkpoint, limits=UploadLimits(max_files=2, max_file_bytes=20_000,
                                                              max_request_bytes=60_000)))
    _assert_error(c.post("/api/predict", files=_files(*((f"{i}.png", _png(i)) for i in range(3)))), 413, "too many files")
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    assert 20_000 < len(big) < 60_000
    _assert_error(c.post("/api/predict", files=_files(("big.png", big))), 413, "big.png", "limit")
    _assert_error(c.post("/api/predict", files=_files(("a.png", b"x" * 70_000))), 413, "request")
    assert c.post("/api/predict", files=_files(("ok.png", _png(0)))).status_code == 200


def test_mixed_batch_gives_the_good_results_and_names_the_bad_files(client):
    # Defect 4: one unreadable file used to discard every good image of the request (422).
    corrupt = _png(5)[:60] + b"\0" * 200
    r = client.post("/api/predict?heatmap=1&grouping=one", files=_files(("ok.png", _png(1)), ("bad.png", corrupt),
                                                           ("ok2.png", _png(2)), ("empty.png", b"")))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["path"] for i in body["images"]] == ["ok.png", "ok2.png"]
    assert [e["file"] for e in body["errors"]] == ["bad.png", "empty.png"]
    assert "empty file" in body["errors"][1]["reason"]
    assert body["study"]["n_images"] == 2  # the study is made of the good images only
    # None good: still a 422 naming each file.
    both = _assert_error(client.post("/api/predict", files=_files(("bad.png", corrupt), ("empty.png", b""))),
                         422, "2 files", "bad.png")
    assert [e["file"] for e in both["errors"]] == ["bad.png", "empty.png"]


def test_sizes_are_in_mib(checkpoint):
    # Defect 6: the limit said "32 MB" and meant 32 MiB.
    c = TestClient(create_app(checkpoint, limits=UploadLimits(max_file_bytes=1024 * 1024)))
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (1024 * 1024 + 10)
    body = _assert_error(c.post("/api/predict", files=_files(("big.png", big))), 413, "1 MiB")
    assert " MB" not in body["detail"]


def test_original_image_and_heatmap_in_original_coordinates(client):
    # The page gets the radiograph at its own size, and a heatmap cut to the image (no letterbox padding).
    data = _png(4, h=150, w=90)
    img = client.post("/api/predict?heatmap=1", files=_files(("tall.png", data))).json()["images"][0]
    assert (img["original_width"], img["original_height"]) == (90, 150)
    original = Image.open(io.BytesIO(base64.b64decode(img["original_png"])))
    assert original.size == (90, 150) and original.mode == "L"
    assert np.array_equal(np.asarray(original), np.asarray(Image.open(io.BytesIO(data))))
    heat = Image.open(io.BytesIO(base64.b64decode(img["heatmap_gray_png"])))
    # The 64-px tile holds the image at 64 x 38 (letterbox: long side 64); the map is that part only.
    assert heat.mode == "L" and heat.size == (round(90 * 64 / 150), 64)


def test_heatmap_crop_follows_letterbox():
    from bonexray.data.preprocess import Letterbox, letterbox
    from bonexray.web.app import heatmap_on_original

    # A map that is 1 exactly where letterbox put the image and 0 on the padding.
    for w, h in ((90, 150), (300, 120), (64, 64)):
        tile = letterbox(np.full((h, w), 255, np.uint8), 64)
        crop = heatmap_on_original(tile.astype(np.float32) / 255.0, Letterbox(64, w, h))
        assert crop.min() == 255 and crop.size == np.count_nonzero(tile), (w, h)


def test_studies_auto_one_and_by_dicom_study_uid(client, tmp_path):
    # Defect 8: every set of files was one study. Now each non-DICOM file is its own study unless
    # grouping=one asks for all of them together (the shared study contract).
    files = _files(("a.png", _png(1)), ("b.png", _png(2)), ("c.png", _png(3)))
    auto = client.post("/api/predict", files=files).json()
    assert [s["n_images"] for s in auto["studies"]] == [1, 1, 1]
    assert len({i["study"] for i in auto["images"]}) == 3
    one = client.post("/api/predict?grouping=one", files=files).json()
    assert len(one["studies"]) == 1 and one["studies"][0]["n_images"] == 3
    _assert_error(client.post("/api/predict?grouping=some", files=files), 422, "grouping")


@requires_shared_data
def test_dicoms_of_different_studies_are_separate_studies(client):
    import pydicom

    src = SHARED_DATA / "dicom" / "RG3_UNCR.dcm"
    ds = pydicom.dcmread(src)
    buf = io.BytesIO()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.save_as(buf)
    r = client.post("/api/predict", files=_files(("a.dcm", src.read_bytes()), ("b.dcm", buf.getvalue()),
                                                 ("c.dcm", src.read_bytes())))
    body = r.json()
    assert [s["n_images"] for s in body["studies"]] == [2, 1]
    assert body["images"][0]["study"] == body["images"][2]["study"] != body["images"][1]["study"]


def test_model_card_says_where_the_threshold_came_from(tmp_path):
    # Defect 2: a train+valid fit keeps 0.5; the card said "chosen on the validation split".
    tv = make_checkpoint(tmp_path / "tv.ckpt", split={"fit_on": "train+valid", "seed": 0})
    card = TestClient(create_app(tv)).get("/api/model").json()
    assert "0.5 by design" in card["threshold_source"] and "validation" not in card["threshold_source"]
    tr = make_checkpoint(tmp_path / "tr.ckpt", split={"fit_on": "train", "seed": 0}, threshold=0.31)
    card = TestClient(create_app(tr)).get("/api/model").json()
    assert card["threshold"] == pytest.approx(0.31) and "validation split" in card["threshold_source"]
    assert card["classes"][:2] == ["normal", "abnormal"] and card["evaluation"] is None


def test_model_card_shows_test_results_from_metrics(checkpoint, tmp_path):
    import json

    m = {"split": "test", "n_images": 500, "n_studies": 120,
         "abnormality": {"image": {"auroc": 0.87, "recall": 0.8, "specificity": 0.75},
                         "ci95": {"image_auroc": [0.83, 0.9]}}}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    ev = TestClient(create_app(checkpoint, metrics=tmp_path / "metrics.json")).get("/api/model").json()["evaluation"]
    assert ev == {"split": "test", "n_images": 500, "n_studies": 120, "auroc": 0.87, "auroc_ci95": [0.83, 0.9],
                  "sensitivity": 0.8, "specificity": 0.75, "source_file": "metrics.json"}
    (tmp_path / "bad.json").write_text("{}")
    from bonexray.errors import BonexrayError
    with pytest.raises(BonexrayError, match="bad.json: not a metrics.json"):
        create_app(checkpoint, metrics=tmp_path / "bad.json")


def test_bad_query_value(client):
    _assert_error(client.post("/api/predict?heatmap=maybe", files=_files(("a.png", _png()))), 422, "heatmap")


def test_api_key(checkpoint):
    c = TestClient(create_app(checkpoint, api_key=KEY))
    files = _files(("a.png", _png()))
    _assert_error(c.post("/api/predict", files=files), 401, "needs an API key", "X-API-Key")
    _assert_error(c.post("/api/predict", files=files, headers={"X-API-Key": "wrong-key-000"}), 401, "wrong API key")
    _assert_error(c.get("/api/model"), 401)
    assert c.post("/api/predict", files=files, headers={"X-API-Key": KEY}).status_code == 200
    assert c.get("/api/model", headers={"X-API-Key": KEY}).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # the page itself is public
    schema = c.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_uploads_never_touch_the_disk(client, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    big = png_bytes(np.random.default_rng(1).integers(0, 255, (1200, 1200), dtype=np.uint8))
    assert len(big) > 1024 * 1024  # larger than Starlette's spooling threshold
    r = client.post("/api/predict", files=_files(("big.png", big)))
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- concurrency


def test_concurrent_requests_get_their_own_answers(checkpoint):
    import httpx

    payloads = [(f"img{i}.png", _png(10 + i, abnormal=i % 2, h=90 + 7 * i)) for i in range(6)]
    with LiveServer(create_app(checkpoint)) as live:
        def ask(i: int) -> dict:
            name, data = payloads[i % len(payloads)]
            r = httpx.post(f"{live.url}/api/predict?heatmap=1", files=_files((name, data)), timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["images"][0]

        alone = [ask(i) for i in range(len(payloads))]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(24)))
    assert len({a["prob_abnormal"] for a in alone}) > 1  # the images do differ
    for i, got in enumerate(together):
        want = alone[i % len(payloads)]
        assert got["path"] == want["path"]
        assert got["prob_abnormal"] == pytest.approx(want["prob_abnormal"], abs=1e-5)
        assert got["heatmap_png"] == want["heatmap_png"]  # the heatmap of this image, not a neighbour's


# --------------------------------------------------------------------------- CLI


def test_cli_refuses_other_hosts_without_key(checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("BONEXRAY_API_KEY", raising=False)
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "Traceback" not in err
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0", "--api-key", "short"]) == 2


def test_cli_starts_uvicorn_with_the_app(checkpoint, monkeypatch, capsys):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("BONEXRAY_API_KEY", KEY)
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0", "--port", "8123", "--max-files", "3"]) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8123
    c = TestClient(seen["app"])
    assert c.get("/api/model").status_code == 401
    assert c.get("/api/model", headers={"X-API-Key": KEY}).json()["limits"]["max_files"] == 3
    monkeypatch.delenv("BONEXRAY_API_KEY")
    assert main(["serve", str(checkpoint)]) == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert TestClient(seen["app"]).get("/api/model").status_code == 200  # loopback: no key needed


def test_cli_bad_model_file(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- NaN, idle sockets, busy, sizes


def test_serve_gives_no_verdict_for_nan_output(tmp_path):
    from fastapi.testclient import TestClient

    from bonexray.web.app import create_app
    from builders import png_bytes

    nan_ckpt = make_checkpoint(tmp_path / "nan.ckpt", body_parts=("hand", "wrist"), nan_output=True)
    client = TestClient(create_app(nan_ckpt, device="cpu"))
    r = client.post("/api/predict", files=[("files", ("x.png", png_bytes(radiograph_like(0)), "image/png"))])
    assert r.status_code == 500
    body = r.json()
    assert "not a finite number" in body["detail"] and body["errors"][0]["file"] == "x.png"
    assert "abnormal" not in body and "images" not in body


def test_idle_sockets_do_not_lock_other_clients_out(good_ckpt):
    import httpx

    from bonexray.web.app import create_app
    from bonexray.web.server import uvicorn_settings
    from builders import LiveServer, png_bytes

    app = create_app(good_ckpt, device="cpu")
    with LiveServer(app, **uvicorn_settings(header_timeout=2.0)) as live:
        idle = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(80)]  # nothing sent
        try:
            r = httpx.post(f"{live.url}/api/predict", timeout=30,
                           files=[("files", ("x.png", png_bytes(radiograph_like(0)), "image/png"))])
            assert r.status_code == 200, r.text
            assert httpx.get(f"{live.url}/healthz", timeout=30).status_code == 200
            # The server closes a connection that never sends its headers: recv sees the end.
            for s in idle[:3]:
                s.settimeout(30)
                assert s.recv(1) == b""
        finally:
            for s in idle:
                s.close()


def test_requests_beyond_the_limit_get_503_not_a_hang(good_ckpt):
    from fastapi.testclient import TestClient

    from bonexray.web.app import create_app

    client = TestClient(create_app(good_ckpt, device="cpu", max_requests=0))
    r = client.get("/api/model")  # not /healthz: it is outside the limit (issue #32)
    assert r.status_code == 503 and "server busy" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("flag,value", [("--max-file-mb", "nan"), ("--max-file-mb", "inf"), ("--max-request-mb", "-1")])
def test_serve_size_limits_must_be_finite(flag, value, good_ckpt, capsys):
    rc, _, err = run_main(capsys, "serve", good_ckpt, flag, value)
    assert rc == 2 and nonblank_lines(err) == [
        f"bonexray serve: error: {flag} {float(value)}: give a size in MB above 0"]
