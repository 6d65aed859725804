"""Speed of a CPU training step with glibc's default allocator vs ``keep_freed_memory()``.

Each setting runs in its own process (allocator state is per process), alternating A/B/A/B so
machine noise hits both alike; the result is a ratio of median step times from the same run.

    python bench/cpu_allocator.py                      # efficientnet_lite0, 224 px, batch 32
    python bench/cpu_allocator.py --pairs 3 --steps 15
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _worker(backbone: str, size: int, batch: int, steps: int, tuned: bool) -> None:
    if tuned:
        from bonexray.training.allocator import keep_freed_memory

        assert keep_freed_memory(), "glibc tuning not applied"
    import torch

    from bonexray.model.network import BoneXrayNet

    torch.manual_seed(0)
    net = BoneXrayNet(backbone, 3, pretrained=None)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x, y, part = torch.rand(batch, 1, size, size), torch.randint(0, 2, (batch,)).float(), torch.randint(0, 3, (batch,))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        abn, logits = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(abn, y) + torch.nn.functional.cross_entropy(logits, part)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step_s": statistics.median(times[3:]), "sys_s": use.ru_stime, "user_s": use.ru_utime,
                      "minor_faults": use.ru_minflt, "max_rss_mb": use.ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="steps per process; the first 3 are warm-up")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--worker", choices=["default", "tuned"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.backbone, a.image_size, a.batch_size, a.steps, a.worker == "tuned")
        return
    results: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(a.pairs):
        for mode in ("default", "tuned"):
            cmd = [sys.executable, __file__, "--worker", mode, "--backbone", a.backbone, "--image-size", str(a.image_size),
                   "--batch-size", str(a.batch_size), "--steps", str(a.steps)]
            env = dict(os.environ, BONEXRAY_MALLOC_TUNING="1")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(out))
            r = results[mode][-1]
            print(f"{mode:8s} step {r['step_s']:.3f} s  sys {r['sys_s']:.1f} s  faults {r['minor_faults']:,}  "
                  f"max RSS {r['max_rss_mb']:.0f} MB", flush=True)
    d = statistics.median(r["step_s"] for r in results["default"])
    t = statistics.median(r["step_s"] for r in results["tuned"])
    print(f"{a.backbone} {a.image_size}px batch {a.batch_size}: median step default {d:.3f} s, tuned {t:.3f} s, "
          f"speed-up x{d / t:.2f} ({a.batch_size / d:.1f} -> {a.batch_size / t:.1f} img/s)")


if __name__ == "__main__":
    main()
