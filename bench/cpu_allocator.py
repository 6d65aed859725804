"""CPU training step: speed and peak memory under allocator, precision and batch settings.

Each setting runs in its own process (allocator state and peak RSS are per process), settings
alternate round by round so machine noise hits all alike, and the result is median step times and
peak resident set from the same run. The step is the recipe's network (backbone with its box and
localisation heads) in train mode with AdamW, like ``bonexray train`` on CPU: deterministic
algorithms on (which fill every new tensor before use, as ``deterministic=True`` does) unless
``fill=off`` is asked for.

A setting is ``precision:allocator[:fill][:microN]``:

* precision ``32`` or ``bf16`` (torch autocast, what ``--precision bf16-mixed`` does);
* allocator ``default`` (glibc's) or ``tuned`` (``keep_freed_memory()``: no mmap for large blocks,
  no trimming; what ``bonexray train`` does on CPU unless ``BONEXRAY_MALLOC_TUNING=0``);
* ``fill`` ``on``/``off``: ``torch.utils.deterministic.fill_uninitialized_memory``;
* ``microN``: the batch in N slices with gradients accumulated (same images per step, BatchNorm
  statistics over batch / N images).

It also prints the activation memory autograd keeps for the backward pass, per image (unique
storages saved by the forward pass), which sets how training memory grows with the batch.

    python bench/cpu_allocator.py                      # recipe settings: lite0, 320 px, batch 32
    python bench/cpu_allocator.py --settings 32:default 32:tuned bf16:tuned 32:tuned:on:micro2 --rounds 2
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

DEFAULT_SETTINGS = ("32:default", "32:tuned", "32:tuned:off", "bf16:tuned", "bf16:default", "32:tuned:on:micro2")


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in ("32", "bf16") or parts[1] not in ("default", "tuned"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected precision:allocator[:fill][:microN], e.g. bf16:tuned")
    fill = parts[2] if len(parts) > 2 else "on"
    micro = int(parts[3].removeprefix("micro")) if len(parts) > 3 else 1
    if fill not in ("on", "off") or micro < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: fill is on/off, micro is microN with N >= 1")
    return {"name": text, "precision": parts[0], "allocator": parts[1], "fill": fill, "micro": micro}


def _net(backbone: str):
    from bonexray.model.network import BoneXrayNet

    return BoneXrayNet(backbone, 7, pretrained=None, localization_head=True, box_head=True).train()


def saved_activation_mb(backbone: str, size: int, bf16: bool) -> float:
    """MB per image of the tensors the forward pass saves for backward (unique storages, batch 2)."""
    import torch

    net, seen = _net(backbone), {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net.forward_with_boxes(torch.rand(2, 1, size, size))
    return sum(seen.values()) / 2 / 2**20


def _worker(backbone: str, size: int, batch: int, steps: int, setting: dict) -> None:
    if setting["allocator"] == "tuned":
        from bonexray.training.allocator import keep_freed_memory

        assert keep_freed_memory(), "glibc tuning not applied"
    import torch
    import torch.nn.functional as F

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = setting["fill"] == "on"
    torch.manual_seed(0)
    net = _net(backbone)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x, y, part = torch.rand(batch, 1, size, size), torch.randint(0, 2, (batch,)).float(), torch.randint(0, 7, (batch,))
    bf16, micro = setting["precision"] == "bf16", setting["micro"]
    times, rss_after_first = [], None
    for i in range(steps):
        t = time.perf_counter()
        opt.zero_grad()
        for xs, ys, ps in zip(x.chunk(micro), y.chunk(micro), part.chunk(micro)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fmap, abn, logits, boxes = net.forward_with_boxes(xs)
                loss = F.binary_cross_entropy_with_logits(abn.float(), ys) + F.cross_entropy(logits.float(), ps)
                loss = loss + sum(m.float().square().mean() for m in boxes) + fmap.float().square().mean() * 1e-3
            (loss / micro).backward()
        opt.step()
        times.append(time.perf_counter() - t)
        if i == 0:
            rss_after_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step_s": statistics.median(times[2:]), "sys_s": use.ru_stime, "user_s": use.ru_utime,
                      "minor_faults": use.ru_minflt, "max_rss_mb": use.ru_maxrss / 1024,
                      "max_rss_after_first_step_mb": rss_after_first}))


def cpu_line() -> str:
    from bonexray.hardware import cpu_flags, cpu_model

    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return f"{cpu_model()}, {os.cpu_count()} CPUs, flags: {' '.join(shown) or 'n/a'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="steps per process; the first 2 are warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="processes per setting, alternating")
    ap.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting(s) for s in DEFAULT_SETTINGS])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", type=parse_setting, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.backbone, a.image_size, a.batch_size, a.steps, a.worker)
        return
    print(f"machine: {cpu_line()}; torch {__import__('torch').__version__}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    saved = {p: saved_activation_mb(a.backbone, a.image_size, p == "bf16") for p in ("32", "bf16")}
    print(f"activations saved for backward, per image at {a.image_size} px: fp32 {saved['32']:.0f} MB, "
          f"bf16 {saved['bf16']:.0f} MB (x batch {a.batch_size}: {saved['32'] * a.batch_size / 1024:.1f} / "
          f"{saved['bf16'] * a.batch_size / 1024:.1f} GB)", flush=True)
    results: dict[str, list[dict]] = {s["name"]: [] for s in a.settings}
    for _ in range(a.rounds):
        for s in a.settings:
            cmd = [sys.executable, __file__, "--worker", s["name"], "--backbone", a.backbone, "--image-size",
                   str(a.image_size), "--batch-size", str(a.batch_size), "--steps", str(a.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            results[s["name"]].append(r)
            print(f"{s['name']:20s} step {r['step_s']:.2f} s ({a.batch_size / r['step_s']:.1f} img/s)  sys {r['sys_s']:.1f} s  "
                  f"faults {r['minor_faults']:,}  peak RSS {r['max_rss_mb']:,.0f} MB", flush=True)
    base = statistics.median(r["step_s"] for r in results[a.settings[0]["name"]])
    print(f"\n| setting | median step s | img/s | x {a.settings[0]['name']} | peak RSS MB (max over rounds) |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        step = statistics.median(r["step_s"] for r in rs)
        print(f"| {name} | {step:.2f} | {a.batch_size / step:.1f} | x{base / step:.2f} | "
              f"{max(r['max_rss_mb'] for r in rs):,.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": cpu_line(), "backbone": a.backbone, "image_size": a.image_size,
                       "batch_size": a.batch_size, "saved_activation_mb_per_image": saved, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
