"""CPU training speed: ``bonexray train``'s loop against the bare model, and bfloat16 autocast.

  loop   ``run_training`` (what ``bonexray train`` runs: Lightning, augmentation, logging, metrics),
         timed per step by a callback added to its Trainer; steady-state steps only
  bare   the same network's forward + backward + AdamW step on the same cached batches, nothing else
  bf16   ``run_training`` with ``--precision bf16-mixed`` against ``32-true``: speed and the valid
         AUROC of one short run each (only where the CPU has AVX-512 BF16 or AMX)

Loop and bare alternate within each round; figures are medians over rounds.

    python bench/train.py --data ../shared/data/FracAtlas                   # efficientnet_lite0, 224 px
    python bench/train.py --data ../shared/data/FracAtlas --steps 8 --rounds 3 --bf16-limit 600
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import cpu_info, has_bf16  # noqa: E402  (same folder)


def timed_run_training(values: dict) -> tuple[list[float], dict]:
    """``run_training`` with a step clock in its Trainer: (step end times, training result)."""
    import lightning as L

    from bonexray.training.train import TrainConfig, run_training

    times: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            times.append(time.perf_counter())

    original = L.Trainer

    def with_clock(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StepClock()]
        return original(*args, **kwargs)

    L.Trainer = with_clock
    try:
        result = run_training(TrainConfig.from_args(values))
    finally:
        L.Trainer = original
    return times, result


def steady_img_s(times: list[float], batch: int, skip: int = 2) -> float:
    times = times[skip:]
    return (len(times) - 1) * batch / (times[-1] - times[0])


def bare_img_s(values: dict, steps: int, skip: int = 2) -> float:
    """Forward + backward + AdamW on the run's own cached training batches (uint8 -> float included)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from bonexray.data.datasets import load_dataset
    from bonexray.data.preprocess import build_cache, default_cache_dir
    from bonexray.data.splits import limit_records, make_splits
    from bonexray.model.network import BoneXrayNet
    from bonexray.training.datamodule import split_datasets

    records = load_dataset(values["data"])
    cache, _ = build_cache(records, default_cache_dir(records.root, values["image_size"]), size=values["image_size"],
                           progress=False)
    records = make_splits(limit_records(records, values["limit"], 0), 0.15, 0.15, seed=0)
    train = split_datasets(cache, records, records.body_parts)["train"]
    batches = []
    for b in DataLoader(train, batch_size=values["batch_size"], shuffle=True):
        batches.append(b)
        if len(batches) == steps:
            break
    torch.manual_seed(0)
    net = BoneXrayNet(values["backbone"], len(records.body_parts), pretrained=None).train()
    opt = torch.optim.AdamW(net.parameters(), values["lr"])
    times = []
    for img, abnormal, part in batches:
        abn, parts = net(img.float().div_(255.0))
        loss = F.binary_cross_entropy_with_logits(abn, abnormal.float()) + F.cross_entropy(parts, part)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter())
    return steady_img_s(times, values["batch_size"], skip)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="steps per measurement (the first 2 are not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bf16-limit", type=int, default=400, help="images of the short bf16/fp32 runs (0: skip them)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    info = cpu_info()
    print(f"CPU: {info['model']}; {info['physical_cores']} physical cores; flags: {' '.join(info['flags'])}")
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": info, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        # The shipped FracAtlas recipe's loop (EMA, localisation head and loss, augmentation, metrics) with
        # the network settings given here: more work per step than the bare model, never less.
        base = dict(data=a.data, recipe="fracatlas", backbone=a.backbone, image_size=a.image_size, batch_size=a.batch_size, lr=3e-4,
                    pretrained="none", epochs=1, quiet=True, workers=0, seed=0,
                    limit=a.batch_size * (a.steps + 2) * 10 // 7)  # ~steps+2 training batches after the 70% split
        loop, bare = [], []
        for r in range(a.rounds):
            times, _ = timed_run_training({**base, "max_steps": a.steps, "out": f"{tmp}/loop{r}"})
            loop.append(steady_img_s(times, a.batch_size))
            bare.append(bare_img_s(base, a.steps))
            print(f"  round {r + 1}: loop {loop[-1]:.2f} images/s, bare {bare[-1]:.2f} images/s", flush=True)
        lm, bm = statistics.median(loop), statistics.median(bare)
        print(f"{a.backbone} {a.image_size}px batch {a.batch_size}: loop {lm:.2f} images/s = {100 * lm / bm:.0f}% of "
              f"the bare model ({bm:.2f} images/s)")
        result.update(loop_img_s=round(lm, 2), bare_img_s=round(bm, 2), loop_share=round(lm / bm, 3))
        if a.bf16_limit and has_bf16(info):
            runs = {}
            for precision in ("32-true", "bf16-mixed"):
                times, res = timed_run_training({**base, "pretrained": "imagenet", "limit": a.bf16_limit,
                                                 "monitor": "valid_auroc", "precision": precision,
                                                 "out": f"{tmp}/{precision}"})
                rows = [r for r in csv.DictReader(open(Path(res["run_dir"]) / "metrics.csv")) if r.get("valid_auroc")]
                runs[precision] = {"img_s": round(steady_img_s(times, a.batch_size), 2),
                                   "valid_auroc": round(float(rows[-1]["valid_auroc"]), 4) if rows else None}
                print(f"  {precision:10s} {runs[precision]['img_s']:.2f} images/s, valid AUROC "
                      f"{runs[precision]['valid_auroc']}", flush=True)
            ratio = runs["bf16-mixed"]["img_s"] / runs["32-true"]["img_s"]
            print(f"bf16 autocast: x{ratio:.2f} the float32 speed ({a.bf16_limit} images, 1 epoch, ImageNet init)")
            result.update(bf16=runs, bf16_ratio=round(ratio, 2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
