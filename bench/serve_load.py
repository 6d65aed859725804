"""Bounded load test of `bonexray serve` on 127.0.0.1: N requests, C at a time, latency percentiles.

    python bench/serve_load.py MODEL [--images IMG ...] [-n 200] [-c 8] [--heatmap]

Starts `bonexray serve MODEL` on a free local port in a child process (or uses --url), sends the
images (default: the first 8 FracAtlas radiographs in ../shared/data) round-robin, one image per
request, and prints one JSON object: counts per HTTP status, errors, p50/p95/p99/max latency (ms)
and throughput. Exit status 1 if any request failed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "FracAtlas" / "images"


def run_load(url: str, payloads: list[tuple[str, bytes]], n: int = 200, concurrency: int = 8,
             heatmap: bool = False, api_key: str | None = None, timeout: float = 120.0) -> dict:
    """Send ``n`` single-image requests, ``concurrency`` at a time; returns the summary."""
    if not payloads:
        raise ValueError("no images to send")
    headers = {"X-API-Key": api_key} if api_key else {}
    endpoint = f"{url.rstrip('/')}/api/predict" + ("?heatmap=1" if heatmap else "")

    with httpx.Client(timeout=timeout, headers=headers,
                      limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(i: int) -> tuple[int, float, str]:
            name, data = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            try:
                r = client.post(endpoint, files=[("files", (name, data))])
                ok = r.status_code == 200 and r.json()["images"][0]["path"] == name
                return r.status_code, time.perf_counter() - t0, "" if ok else r.text[:200]
            except httpx.HTTPError as err:
                return 0, time.perf_counter() - t0, f"{type(err).__name__}: {err}"

        one(0)  # warm-up (first call allocates), not counted
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0

    lat_ms = np.array([r[1] for r in results]) * 1000.0
    statuses: dict[str, int] = {}
    for code, _, _ in results:
        statuses[str(code)] = statuses.get(str(code), 0) + 1
    errors = [r[2] for r in results if r[2]]
    return {
        "requests": n, "concurrency": concurrency, "heatmap": heatmap, "status_counts": statuses,
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 1), "p95_ms": round(float(np.percentile(lat_ms, 95)), 1),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1), "max_ms": round(float(lat_ms.max()), 1),
        "throughput_rps": round(n / wall, 2), "wall_s": round(wall, 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bonexray.cli", "serve", model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # loading torch and the model on a busy machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bonexray serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("bonexray serve did not come up")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="checkpoint or ONNX to serve (not needed with --url)")
    p.add_argument("--url", help="an already running server instead of starting one")
    p.add_argument("--images", nargs="*", default=None)
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--heatmap", action="store_true")
    p.add_argument("--api-key", default=os.environ.get("BONEXRAY_API_KEY"))
    args = p.parse_args(argv)
    if not args.model and not args.url:
        p.error("give MODEL or --url")
    images = args.images or sorted(str(x) for x in SHARED_IMAGES.glob("*/*.jpg"))[:8]
    if not images:
        p.error(f"no --images and no radiographs under {SHARED_IMAGES}")
    payloads = [(Path(x).name, Path(x).read_bytes()) for x in images]

    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        proc = _start_server(args.model, port)
        url = f"http://127.0.0.1:{port}"
    try:
        summary = run_load(url, payloads, n=args.requests, concurrency=args.concurrency, heatmap=args.heatmap,
                           api_key=args.api_key)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    summary["images"] = len(payloads)
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
