"""Time of one ``augment_batch`` call (image + padded fracture boxes) on a training-sized batch.

To compare two versions of the augmentation, point ``--src`` at each tree's ``src`` folder (e.g.
a ``git worktree`` of an older commit); they run in turn, alternating, in separate processes.

    python bench/augment_speed.py                              # this checkout, batch 32, 224 px, CPU
    python bench/augment_speed.py --src OLD/src --src src      # A/B, same machine, same run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker(batch: int, size: int, repeats: int, device: str, threads: int) -> None:
    import time

    import torch

    from bonexray.training.augment import augment_batch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=gen).to(device)
    # One fracture box per image (a few of the 16 padded rows used), as the training loader gives them.
    boxes = torch.zeros(batch, 16, 4, device=device)
    boxes[:, 0] = torch.tensor([0.4, 0.4, 0.5, 0.55], device=device) * size
    valid = torch.zeros(batch, 16, dtype=torch.bool, device=device)
    valid[:, 0] = True
    augment_batch(x, boxes=boxes, valid=valid)  # warm-up: imports, kernel selection
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        augment_batch(x, boxes=boxes, valid=valid)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", type=Path, help="a tree's src folder (repeat to compare); default: this checkout")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.batch, args.size, args.repeats, args.device, args.threads)
        return 0
    trees = args.src or [REPO / "src"]
    times: dict[str, list[float]] = {str(t): [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            cmd = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--size", str(args.size),
                   "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(tree.resolve())})
            times[str(tree)] += json.loads(out.stdout.strip().splitlines()[-1])["times"]
    print(f"augment_batch, batch {args.batch} x 1 x {args.size} x {args.size} + 16 padded boxes, {args.device}, "
          f"{args.threads} threads, {args.rounds} rounds x {args.repeats} calls")
    for tree, ts in times.items():
        print(f"  {tree}: median {statistics.median(ts) * 1000:.0f} ms (min {min(ts) * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
