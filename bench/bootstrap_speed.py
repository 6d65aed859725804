"""Time of ``compute_metrics`` with 1000 bootstrap resamples on ~10,000 images (4000 studies, 3 body parts),
the size of MURA's valid split and then some. A timing, so it lives here and not in the tests (a loaded
machine must not fail a test; issue #24).

    python bench/bootstrap_speed.py                 # 3 rounds, prints seconds per round and the median
    python bench/bootstrap_speed.py --studies 8000 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd


def random_table(n_studies: int, seed: int, parts=("hand", "wrist", "elbow")) -> pd.DataFrame:
    """1-4 images per study, 40% abnormal studies, probabilities that separate the classes moderately."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        y = int(rng.random() < 0.4)
        part = parts[s % len(parts)]
        for i in range(int(rng.integers(1, 5))):
            p = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1))
            rows.append((f"{s}/{i}", f"st{s}", part, y, p, part))
    return pd.DataFrame(rows, columns=["path", "study_id", "body_part", "abnormal", "prob_abnormal", "pred_body_part"])


def main() -> None:
    from bonexray.evaluation.metrics import compute_metrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4000)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    df = random_table(a.studies, seed=6)
    times = []
    for _ in range(a.rounds):
        t = time.perf_counter()
        compute_metrics(df, 0.5, ["hand", "wrist", "elbow"], n_bootstrap=a.bootstrap, seed=0)
        times.append(time.perf_counter() - t)
        print(f"{len(df)} images, {a.bootstrap} resamples: {times[-1]:.2f} s", flush=True)
    print(f"median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
