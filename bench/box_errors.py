"""Why box AP is low or high: the top box of every fractured test image against its fracture boxes.

    python bench/box_errors.py runs/fa-box-s0/checkpoints/best.ckpt --data ../shared/data/FracAtlas --splits runs/fa-box-s0

Prints the top box's best IoU with the image's fracture boxes (median, share >= 0.5 / 0.3 / 0.1), the
ratio of its area to that box's, its score, and the sizes of the fracture boxes in tile pixels. Uses
the model's own split (as ``bonexray evaluate`` does) and the cached tiles.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace

import numpy as np

from box_model_data import add_model_data_arguments, load_box_model_and_data


def main(argv=None) -> int:
    import torch
    from torchvision.ops import box_iou

    from bonexray.data.preprocess import letterbox_boxes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_data_arguments(ap)
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    loaded = load_box_model_and_data(args)
    if loaded is None:
        return 2
    pred, cache, records, how = loaded
    row = dict(zip(cache.index["path"], cache.index["row"]))
    boxed = [r for r in records if r.split == args.split and r.extras.get("boxes") and r.path in row]
    settings = replace(pred.box_settings, threshold=0.0, max_detections=1)
    ious, ratios, scores, sizes = [], [], [], []
    for i in range(0, len(boxed), 16):
        chunk = boxed[i : i + 16]
        found = pred.predict_batch(np.stack([cache.images[row[r.path]] for r in chunk]), box_settings=settings).boxes
        for r, b in zip(chunk, found):
            truth = torch.as_tensor(letterbox_boxes(r.extras["boxes"], r.extras["annotated_size"], pred.image_size))
            sizes.append(np.stack([truth[:, 2] - truth[:, 0], truth[:, 3] - truth[:, 1]], 1))
            if not len(b):
                ious.append(0.0)
                continue
            top = torch.as_tensor(b[:1, :4], dtype=truth.dtype)
            overlap = box_iou(top, truth)[0]
            j = int(overlap.argmax())
            ious.append(float(overlap[j]))
            area = lambda t: float((t[2] - t[0]) * (t[3] - t[1]))  # noqa: E731
            ratios.append(area(top[0]) / max(1e-6, area(truth[j])))
            scores.append(float(b[0, 4]))
    ious, sizes = np.array(ious), np.concatenate(sizes)
    print(f"{len(boxed)} fractured {args.split} images with boxes ({how})")
    print(f"top box IoU with its fracture box: median {np.median(ious):.3f}; >= 0.5: {np.mean(ious >= 0.5):.3f}, "
          f">= 0.3: {np.mean(ious >= 0.3):.3f}, >= 0.1: {np.mean(ious >= 0.1):.3f}")
    q = np.percentile(ratios, [10, 25, 50, 75, 90])
    print("top box area / fracture box area: p10 {:.2f}  p25 {:.2f}  median {:.2f}  p75 {:.2f}  p90 {:.2f}".format(*q))
    print(f"top box score: median {np.median(scores):.3f} (operating point {pred.box_settings.threshold:.3f})")
    print(f"fracture boxes in {pred.image_size}-px tile pixels: median w x h {np.median(sizes[:, 0]):.1f} x "
          f"{np.median(sizes[:, 1]):.1f}, p10 {np.percentile(sizes[:, 0], 10):.1f} x {np.percentile(sizes[:, 1], 10):.1f}, "
          f"p90 {np.percentile(sizes[:, 0], 90):.1f} x {np.percentile(sizes[:, 1], 90):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
