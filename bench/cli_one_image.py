"""One image from the CLI against a bare onnxruntime process on the same exported model.

Each round starts two fresh Python processes, alternating: (a) ``bonexray predict MODEL.onnx IMAGE``
(the whole CLI: imports, model verification, decode, scope gate, boxes, JSON), and (b) a bare process
that imports onnxruntime and numpy, opens the same ONNX file and runs one 320 x 320 zero tile. The
figures are medians over rounds of wall time (``time.perf_counter`` around ``subprocess.run``), with
the min-max range, plus whether torch was imported by (a) (``-X importtime``).

    python bench/cli_one_image.py MODEL.onnx IMAGE --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

BARE = ("import numpy as np, onnxruntime as ort; s = ort.InferenceSession({model!r}, providers=['CPUExecutionProvider']);"
        "i = s.get_inputs()[0]; s.run(None, {{i.name: np.zeros((1, 1, 320, 320), np.uint8 if 'uint8' in i.type "
        "else np.float32)}})")


def _timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an ONNX file written by bonexray export")
    ap.add_argument("image")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cli = [sys.executable, "-X", "importtime", "-m", "bonexray.cli", "predict", args.model, args.image]
    bare = [sys.executable, "-c", BARE.format(model=args.model)]
    cli_s, bare_s, torch_seen = [], [], False
    for _ in range(args.rounds):
        t, err = _timed(cli)
        cli_s.append(t)
        torch_seen |= any(line.rstrip().endswith("| torch") for line in err.splitlines())
        bare_s.append(_timed(bare)[0])
    out = {"rounds": args.rounds, "cli_s": statistics.median(cli_s), "cli_range": [min(cli_s), max(cli_s)],
           "bare_onnxruntime_s": statistics.median(bare_s), "bare_range": [min(bare_s), max(bare_s)],
           "ratio": statistics.median(cli_s) / statistics.median(bare_s), "cli_imports_torch": torch_seen}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
