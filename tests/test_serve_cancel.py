"""A client that goes away stops the server's work for it (`bonexray serve`, real uvicorn, real radiographs).

The app counts, per request, the images it decoded and ran through the model (``app.state.work``);
these tests read that count instead of timing anything: a cancelled 16-image request must stop
well before its 16th image, and a later request is served in full.
"""
from __future__ import annotations

import socket
import time
import uuid

import httpx
from builders import LiveServer, make_checkpoint
from conftest import SHARED_DATA, requires_shared_data

pytestmark = requires_shared_data


def _radiographs(n: int):
    return sorted((SHARED_DATA / "FracAtlas" / "images" / "Fractured").glob("*.jpg"))[:n]


def _multipart(paths) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for p in paths:
        parts.append((f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{p.name}\"\r\n"
                      "Content-Type: image/jpeg\r\n\r\n").encode() + p.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def _wait_for(condition, what: str, bound_s: float = 180.0) -> None:
    """Poll ``condition`` (a bound on a hung server, not a speed check)."""
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the server never got to: {what}")
        time.sleep(0.005)


def test_a_client_that_disconnects_stops_its_decode_and_inference(tmp_path):
    from bonexray.web import create_app

    app = create_app(make_checkpoint(tmp_path / "loc.ckpt", localization_head=True))
    work = app.state.work
    files = _radiographs(16)
    body, boundary = _multipart(files)
    with LiveServer(app) as live:
        started, cancelled = work.started, work.cancelled
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall((f"POST /api/predict?heatmap=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        _wait_for(lambda: work.started > started, "decoding the 16 images")
        sock.close()  # the client goes away (a closed tab, a cancel, a later drop)
        _wait_for(lambda: work.cancelled > cancelled, "noticing that the client went away")
        stopped = work.last_cancelled
        assert stopped["of"] == 16
        assert stopped["decoded"] < 8 and stopped["inferred"] < 8, stopped

        # A later request is served in full, and the cancelled one did no more work meanwhile.
        one = httpx.post(f"{live.url}/api/predict", files=[("files", (files[0].name, files[0].read_bytes()))],
                         timeout=300)
        assert one.status_code == 200 and len(one.json()["images"]) == 1
        assert work.last_cancelled == stopped
        assert work.last_completed == {"of": 1, "decoded": 1, "inferred": 1}
