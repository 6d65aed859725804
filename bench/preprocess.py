"""Speed of ``bonexray preprocess`` against a naive loop, and of the cache read path training uses.

  naive      one process: ``PIL.Image.open(p).convert("L").resize((S, S))`` then ``np.asarray``
  bonexray   ``build_cache`` (what ``bonexray preprocess`` runs: JPEG draft decoding, letterbox,
             memmap), with 1 and 2.. worker processes, rebuilt from scratch each time
  cache read ``CacheDataset`` + ``DataLoader`` (shuffled batches of 32, as training reads), against
             the training throughput of the model (forward + backward + AdamW, batch 32) measured here

Each round times every variant once, alternating; figures are medians over rounds.

    python bench/preprocess.py --data ../shared/data/FracAtlas               # 400 images at 224 px
    python bench/preprocess.py --data ../shared/data/FracAtlas --limit 800 --workers 1 2 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def naive(paths: list[str], size: int) -> None:
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            np.asarray(im.convert("L").resize((size, size)))


def cache_read_speed(cache_root: Path, batches: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    from bonexray.data.preprocess import ImageCache
    from bonexray.training.datamodule import CacheDataset

    cache = ImageCache.open(cache_root)
    n = len(cache.index)
    ds = CacheDataset(str(cache_root), cache.size, n, np.arange(n), np.zeros(n, int), np.zeros(n, int))
    loader = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen, t = 0, time.perf_counter()
    while seen < batches * 32:
        for img, *_ in loader:
            img.float().div_(255.0)  # what on_after_batch_transfer does first
            seen += img.shape[0]
            if seen >= batches * 32:
                break
    return seen / (time.perf_counter() - t)


def train_speed(backbone: str, size: int, steps: int = 3) -> float:
    import torch

    from bonexray.model.network import BoneXrayNet

    net = BoneXrayNet(backbone, 3, pretrained=None).train()
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x, y = torch.rand(32, 1, size, size), torch.randint(0, 2, (32,)).float()
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        abn, _ = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(abn, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return 32 / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (FracAtlas, MURA) or manifest CSV")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=400, help="first N images (0: all)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--read-batches", type=int, default=40)
    ap.add_argument("--backbone", default="efficientnet_lite0", help="model whose training speed the cache must outrun")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from bonexray.data.datasets import load_dataset
    from bonexray.data.preprocess import build_cache

    records = load_dataset(a.data)
    if a.limit:
        records.records = records.records[: a.limit]
    paths, n = [r.path for r in records], len(records.records)
    speeds: dict[str, list[float]] = {"naive (1 process)": [], **{f"bonexray preprocess, {w} worker(s)": [] for w in a.workers}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            t = time.perf_counter()
            naive(paths, a.size)
            speeds["naive (1 process)"].append(n / (time.perf_counter() - t))
            for w in a.workers:
                t = time.perf_counter()
                build_cache(records, Path(tmp) / f"w{w}", size=a.size, workers=w, progress=False, force=True)
                speeds[f"bonexray preprocess, {w} worker(s)"].append(n / (time.perf_counter() - t))
        read = cache_read_speed(Path(tmp) / f"w{a.workers[0]}", a.read_batches)
    train = train_speed(a.backbone, a.size)
    base = statistics.median(speeds["naive (1 process)"])
    print(f"{n} images of {a.data} -> {a.size} px, median of {a.rounds} rounds")
    rows = []
    for name, s in speeds.items():
        ips = statistics.median(s)
        rows.append({"variant": name, "img_s": round(ips, 1), "ratio": round(ips / base, 2)})
        print(f"  {name:32s} {ips:8.1f} images/s  x{ips / base:.2f}")
    print(f"  cache read (DataLoader, batch 32) {read:8.0f} images/s = x{read / train:.0f} the training speed of "
          f"{a.backbone} at {a.size} px ({train:.1f} images/s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                                            "n": n, "size": a.size, "rows": rows, "cache_read_img_s": round(read),
                                            "train_img_s": round(train, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
