"""Time of ``compute_metrics`` with 1000 bootstrap resamples on ~10,000 images (4000 studies, 3 body parts),
the size of MURA's valid split and then some; with ``--boxes N``, the time of ``localization_metrics`` (one
matching pass, AP/FROC/pointing and their 1000-resample CIs, all images and fractured only) on N
FracAtlas-shaped images with 100 detections each, as ``bonexray evaluate`` scores them. A timing, so it
lives here and not in the tests (a loaded machine must not fail a test; issue #24).

    python bench/bootstrap_speed.py                 # 3 rounds, prints seconds per round and the median
    python bench/bootstrap_speed.py --studies 8000 --rounds 5
    python bench/bootstrap_speed.py --boxes 523     # the size of FracAtlas's test split
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


def random_boxes(n_images: int, seed: int):
    """A sixth of the images fractured (1-2 boxes), 100 detections per image, one detection near each fracture
    most of the time; two images per exam."""
    rng = np.random.default_rng(seed)
    preds, gts, groups = [], [], []
    for i in range(n_images):
        m = int(rng.integers(1, 3)) if rng.random() < 0.17 else 0
        xy = rng.uniform(0, 280, (m, 2))
        g = np.c_[xy, xy + rng.uniform(10, 40, (m, 2))]
        pxy = rng.uniform(0, 300, (100, 2))
        p = np.c_[pxy, pxy + rng.uniform(8, 50, (100, 2)), rng.uniform(0.01, 1, 100)]
        for j, box in enumerate(g):
            if rng.random() < 0.7:
                p[j, :4] = box + rng.normal(0, 3, 4)
        p[:, 2:4] = np.maximum(p[:, 2:4], p[:, :2] + 1)
        preds.append(p)
        gts.append(g)
        groups.append(f"exam{i // 2}")
    return preds, gts, groups


def main() -> None:
    from bonexray.evaluation.metrics import compute_metrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4000)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--boxes", type=int, default=0, metavar="N",
                    help="time localization_metrics on N images with boxes instead")
    a = ap.parse_args()
    if a.boxes:
        from bonexray.evaluation.localization import localization_metrics

        preds, gts, groups = random_boxes(a.boxes, seed=6)
        times = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            localization_metrics(preds, gts, groups, n_bootstrap=a.bootstrap, seed=0)
            times.append(time.perf_counter() - t)
            print(f"{a.boxes} images, {sum(len(p) for p in preds)} detections, {a.bootstrap} resamples: "
                  f"{times[-1]:.2f} s", flush=True)
        print(f"median {statistics.median(times):.2f} s")
        return
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
