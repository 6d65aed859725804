"""What this machine's CPU offers, read in one place: training's default precision and the inference
backends' choice both follow it."""
from __future__ import annotations

import os
from pathlib import Path

#: CPU flags (``/proc/cpuinfo``) that give native bfloat16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings count once); onnxruntime's thread count."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16() -> bool:
    """Native bfloat16 on this CPU (AVX-512 BF16 or AMX): the one test every bf16 path uses."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def default_training_precision(on_gpu: bool) -> str:
    """Lightning precision when ``--precision`` is not given: fp16 mixed on GPU; bf16 mixed on a CPU with
    native bf16 (a full recipe run was no worse than fp32 within the seed spread, faster and in less
    memory: README, Training); fp32 elsewhere (emulated bf16 is slower than fp32)."""
    if on_gpu:
        return "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"
