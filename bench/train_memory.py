"""Peak memory of ``bonexray train`` at the recipe's shipped size: fp32 whole batch, fp32 micro-batches, bf16.

Each setting is one real ``bonexray train --recipe fracatlas`` process (efficientnet_lite0 with its box
and localisation heads, 320 px, batch 32, AdamW, deterministic algorithms) stopped after ``--steps``
optimiser steps on ``--limit`` images, under ``/usr/bin/time -v``; the figure is its ``Maximum
resident set size``. The cache is train's own per-user cache (``--cache`` to choose another), built by
the first setting if it is missing (a full build of the dataset, not of the ``--limit`` images).
``--pretrained none`` (the ImageNet weights change no memory figure and need no download).

    python bench/train_memory.py --data ../shared/data/FracAtlas
    python bench/train_memory.py --data ../shared/data/FracAtlas --settings fp32-micro16 bf16 --json mem.json

Settings: ``fp32-full`` (``--precision 32-true --micro-batch 32``), ``fp32-micro16`` (``--precision
32-true``: the automatic choice, two micro-batches of 16), ``bf16`` (``--precision bf16-mixed``, whole
batch; emulated and slow on CPUs without native bf16, but its memory is the same).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SETTINGS = {
    "fp32-full": ["--precision", "32-true", "--micro-batch", "32"],
    "fp32-micro16": ["--precision", "32-true"],
    "bf16": ["--precision", "bf16-mixed"],
}


def train_cmd(data: str, out: Path, cache: str | None, limit: int, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from bonexray.cli import main; sys.exit(main(sys.argv[1:]))",
            "train", "--recipe", "fracatlas", "--data", data, "--out", str(out), *(["--cache", cache] if cache else []),
            "--limit", str(limit), "--max-steps", str(steps), "--pretrained", "none", "--quiet", *extra]


def peak_rss_kb(time_output: str) -> int:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
    if not found:
        raise RuntimeError("no 'Maximum resident set size' in /usr/bin/time -v output")
    return int(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="FracAtlas folder")
    ap.add_argument("--limit", type=int, default=80, help="images (whole exam groups; default 80)")
    ap.add_argument("--steps", type=int, default=2, help="optimiser steps per setting (default 2)")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--cache", default=None, help="preprocessed cache folder (default: train's per-user cache)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bonexray-train-memory-") as tmp:
        cache = args.cache
        for name in args.settings:
            out = Path(tmp) / f"run-{name}"
            cmd = ["/usr/bin/time", "-v", *train_cmd(args.data, out, cache, args.limit, args.steps, SETTINGS[name])]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name}: bonexray train exited {done.returncode}")
            cfg = yaml.safe_load((out / "config.yaml").read_text())
            wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr)
            row = {"setting": name, "precision_used": cfg["precision_used"], "batch_size": cfg["batch_size"],
                   "micro_batch_used": cfg["micro_batch_used"], "accumulate": cfg["accumulate_grad_batches"],
                   "peak_rss_mb": round(peak_rss_kb(done.stderr) / 1024), "wall": wall.group(1) if wall else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| setting | precision | batch | micro-batch x steps accumulated | peak RSS MB | wall (incl. start-up) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['precision_used']} | {r['batch_size']} | {r['micro_batch_used']} x "
              f"{r['accumulate']} | {r['peak_rss_mb']:,} | {r['wall']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
