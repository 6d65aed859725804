"""A bounded load test of the API on 127.0.0.1: 200 requests, 8 at a time, no errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from builders import LiveServer, make_checkpoint, png_bytes, radiograph_like

pytest.importorskip("fastapi")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_200_requests_8_at_a_time_without_errors(tmp_path):
    from bonexray.web import create_app

    app = create_app(make_checkpoint(tmp_path / "m.ckpt", image_size=64))
    payloads = [(f"img{i}.png", png_bytes(radiograph_like(i, abnormal=i % 2))) for i in range(8)]
    with LiveServer(app) as live:
        summary = _bench().run_load(live.url, payloads, n=200, concurrency=8)
    print("serve load:", summary)  # shown with pytest -s / -rA: the latency percentiles
    assert summary["status_counts"] == {"200": 200} and summary["errors"] == 0
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]
