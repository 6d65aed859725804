import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="allocator tuning is glibc-only")

PROBE = """
import ctypes, json, os
from bonexray.training.allocator import keep_freed_memory
applied = keep_freed_memory()
# A freed 64 MiB block: with mmap off it stays in the heap, so the next one reuses it (no new faults).
import resource
buf = ctypes.create_string_buffer(64 << 20); del buf
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    buf = ctypes.create_string_buffer(64 << 20); del buf
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _probe(env_value: str) -> dict:
    import json
    import os

    env = dict(os.environ, BONEXRAY_MALLOC_TUNING=env_value)
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def test_tuning_reuses_freed_large_blocks():
    default, tuned = _probe("0"), _probe("1")
    assert default["applied"] is False and tuned["applied"] is True
    # Default glibc maps and faults 64 MiB (16k pages) per block; tuned reuses the heap.
    assert default["faults"] > 5 * 10_000
    assert tuned["faults"] < 2_000
