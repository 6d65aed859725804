#!/usr/bin/env python
"""Pointing game: does the CAM peak of the abnormality logit land on the fracture?

For every fractured FracAtlas image with boxes in ``Annotations/COCO JSON/`` (read by bonexray's
own COCO reader; optionally only those in one split of a run's ``splits.csv``), the CAM is computed
at model resolution on exactly what predict sees (``read_image`` + ``letterbox``, i.e.
``load_for_model``). Its peak is searched inside the image content only, never in the letterbox
padding, and it is a hit when the peak pixel's centre lies inside any fracture box (grown by
``--tolerance`` original pixels on each side) mapped into the model tile by ``letterbox_boxes``, the
mapping training uses for the same boxes (the hit test is ``bonexray.evaluation.localization.pointing_hits``,
the one ``bonexray evaluate`` uses for box centres). Reported with a 95% percentile-bootstrap CI over images, next
to baselines from the same images:

* ``random point``: one uniform point inside each image (seeded), and ``random (expected)``: its
  exact expectation, the fraction of the image covered by the (grown) boxes;
* ``image centre``: the centre pixel of each image;
* ``oracle (geometry check)``: each image's first box centre sent to its model pixel, scored like a
  CAM peak; it must score ~1.0, or the coordinate mapping is broken.

Usage::

    python bench/pointing_game.py RUN/checkpoints/best.ckpt --splits RUN/splits.csv --out pg.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing
from bonexray.evaluation.localization import pointing_hits  # noqa: E402  (the package's one hit test)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "FracAtlas"
COCO_REL = Path("Annotations") / "COCO JSON"


# --------------------------------------------------------------------------- geometry
# All letterbox geometry comes from bonexray.data.preprocess.letterbox_boxes, the mapping training uses
# for the fracture boxes, so the CAM is scored in exactly the frame the model sees.


def tile_boxes(boxes: list[list[float]], tol: float, decoded_wh: tuple[int, int], annotated_wh: tuple[float, float],
               size: int) -> np.ndarray:
    """Boxes [x, y, w, h] in annotated pixels, grown by ``tol`` on each side -> [x0, y0, x1, y1] in the model tile.

    The decoded image may be smaller than the annotated one (JPEG draft decoding): boxes are scaled
    to the decoded pixels first, then through that image's letterbox.
    """
    from bonexray.data.preprocess import letterbox_boxes

    (w, h), (aw, ah) = decoded_wh, annotated_wh
    grown = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + [-tol, -tol, 2 * tol, 2 * tol]
    return letterbox_boxes(grown * [w / aw, h / ah, w / aw, h / ah], (w, h), size)


def content_mask(decoded_wh: tuple[int, int], size: int) -> np.ndarray:
    """True on the tile pixels that hold the image (not the letterbox padding)."""
    w, h = decoded_wh
    x0, y0, x1, y1 = tile_boxes([[0, 0, w, h]], 0.0, (w, h), (w, h), size)[0].round().astype(int)
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def peak_of(cam: np.ndarray, content: np.ndarray) -> tuple[int, int]:
    """(row, col) of the CAM maximum inside the image content (first one on ties)."""
    masked = np.where(content, cam, -np.inf)
    r, c = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return int(r), int(c)


def pixel_in_boxes(row: int, col: int, tboxes: np.ndarray) -> bool:
    """Is the centre of tile pixel (row, col) inside any of the tile boxes (xyxy)?"""
    return bool(pointing_hits([[col + 0.5, row + 0.5]], [tboxes])[0])


def inside_any(x: float, y: float, boxes: list[list[float]], tol: float) -> bool:
    """Is (x, y) inside any of the [x, y, w, h] boxes, grown by ``tol`` on each side?"""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    grown = np.c_[b[:, :2] - tol, b[:, :2] + b[:, 2:] + tol]
    return bool(pointing_hits([[x, y]], [grown])[0])


def covered_fraction(boxes: list[list[float]], w: int, h: int, tol: float) -> float:
    """Fraction of the image area inside the union of the grown boxes (exact on the pixel grid)."""
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    cover = np.zeros((h, w), bool)
    for bx, by, bw, bh in boxes:
        rows = (ys >= by - tol) & (ys <= by + bh + tol)
        cols = (xs >= bx - tol) & (xs <= bx + bw + tol)
        cover |= rows[:, None] & cols[None, :]
    return float(cover.mean())


def bootstrap_ci(values: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- data


def load_boxes(data: Path) -> dict[str, dict]:
    """file_name -> {"size": (w, h), "boxes": [[x, y, w, h], ...]} for images with boxes (bonexray's COCO reader)."""
    from bonexray.data.fracatlas import read_fracatlas_boxes

    problems: list[str] = []
    boxes = read_fracatlas_boxes(data, problems)
    if boxes is None:
        raise SystemExit(f"pointing_game: {data}: no readable COCO annotations ({'; '.join(problems) or 'none found'})")
    return {name: info for name, info in boxes.items() if info["boxes"]}


def split_names(splits_csv: Path, split: str) -> set[str]:
    with open(splits_csv, newline="") as f:
        return {Path(row["path"]).name for row in csv.DictReader(f) if row.get("split") == split}


def find_file(data: Path, name: str) -> Path | None:
    for folder in ("Fractured", "Non_fractured"):
        p = data / "images" / folder / name
        if p.is_file():
            return p
    return None


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="bonexray checkpoint (.ckpt)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"FracAtlas folder (default {DEFAULT_DATA})")
    ap.add_argument("--splits", type=Path, default=None, help="a run's splits.csv (or the run folder): restrict to --split")
    ap.add_argument("--split", default="test", help="which split of --splits (default test)")
    ap.add_argument("--method", action="append", default=None,
                    help="CAM method: gradcam, gradcam++ (default), layercam, hirescam, or localization (the "
                         "fracture map of models trained with --localization-weight); repeat to compare")
    ap.add_argument("--tolerance", type=float, default=15.0,
                    help="also score hits within this many original pixels of a box (default 15)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (quick trials)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from bonexray.data.imageio import read_image
    from bonexray.data.preprocess import letterbox
    from bonexray.errors import BonexrayError
    from bonexray.inference.cam import DEFAULT_METHOD, cam_for_batch
    from bonexray.inference.predictor import Predictor

    methods = args.method or [DEFAULT_METHOD]
    data: Path = args.data
    if not any((data / COCO_REL).glob("*.json")):
        ap.error(f"{data}: no {COCO_REL}/*.json (not a FracAtlas folder?)")
    boxes = load_boxes(data)
    names = sorted(boxes)
    if args.splits is not None:
        splits_csv = args.splits / "splits.csv" if args.splits.is_dir() else args.splits
        wanted = split_names(splits_csv, args.split)
        if not wanted:
            ap.error(f"{splits_csv}: no rows with split == {args.split!r}")
        names = [n for n in names if n in wanted]
    if args.limit:
        names = names[: args.limit]

    try:
        pred = Predictor(args.checkpoint, device=args.device)
    except BonexrayError as e:
        print(f"pointing_game: error: {e}", file=sys.stderr)
        return 2
    if pred.net is None:
        ap.error("the pointing game needs a checkpoint (CAM takes gradients), not an ONNX file")
    size = pred.image_size
    t0 = time.perf_counter()

    rng = np.random.default_rng(args.seed)
    tols = sorted({0.0, float(args.tolerance)})
    hits: dict[str, dict[float, list[bool]]] = {m: defaultdict(list) for m in methods}
    base: dict[str, dict[float, list[float]]] = {k: defaultdict(list) for k in ("random point", "random (expected)", "image centre", "oracle (geometry check)")}
    skipped: list[str] = []
    used: list[str] = []
    probs_all: list[float] = []

    def flush(batch: list[tuple[str, np.ndarray, tuple[int, int], dict]]) -> None:
        if not batch:
            return
        arr = np.stack([b[1] for b in batch])
        probs, _ = pred.predict_arrays(arr)
        probs_all.extend(float(p) for p in probs)
        cams = {m: cam_for_batch(pred.net, pred.to_tensor(arr), method=m) for m in methods}
        for i, (name, _, decoded_wh, info) in enumerate(batch):
            (W, H), bxs = info["size"], info["boxes"]
            content = content_mask(decoded_wh, size)
            peaks = {m: peak_of(cams[m][i], content) for m in methods}
            rx, ry = rng.uniform(0, W), rng.uniform(0, H)
            bx, by, bw, bh = bxs[0]
            # Oracle: the first box's centre, sent to the model pixel that holds it.
            cx, cy = tile_boxes([[bx + bw / 2, by + bh / 2, 0, 0]], 0.0, decoded_wh, (W, H), size)[0][:2]
            oracle = (min(int(cy), size - 1), min(int(cx), size - 1))
            for tol in tols:
                tb = tile_boxes(bxs, tol, decoded_wh, (W, H), size)
                for m in methods:
                    hits[m][tol].append(pixel_in_boxes(*peaks[m], tb))
                base["random point"][tol].append(float(inside_any(rx, ry, bxs, tol)))
                base["random (expected)"][tol].append(covered_fraction(bxs, W, H, tol))
                base["image centre"][tol].append(float(inside_any(W / 2, H / 2, bxs, tol)))
                base["oracle (geometry check)"][tol].append(float(pixel_in_boxes(*oracle, tb)))
            used.append(name)
        batch.clear()

    pending: list[tuple[str, np.ndarray, tuple[int, int], dict]] = []
    for name in names:
        info = boxes[name]
        path = find_file(data, name)
        if path is None:
            skipped.append(f"{name}: not on disk")
            continue
        try:
            decoded = read_image(path, draft_size=size)  # = load_for_model, keeping the decoded shape
        except BonexrayError as e:
            skipped.append(f"{name}: {e}")
            continue
        h, w = decoded.pixels.shape
        W, H = info["size"]
        # Draft decoding shrinks by up to 8x; the aspect ratio must still match the COCO size.
        if abs(w / h - W / H) > 0.02 * (W / H) + 8.0 / min(h, w):
            skipped.append(f"{name}: decoded {w}x{h} does not match the annotated {W}x{H}")
            continue
        pending.append((name, letterbox(decoded.pixels, size), (w, h), info))
        if len(pending) >= args.batch_size:
            flush(pending)
    flush(pending)

    n = len(used)
    rows = []
    for label, per_tol in [*((f"CAM peak ({m})", hits[m]) for m in methods), *base.items()]:
        row = {"method": label}
        for tol in tols:
            v = np.asarray(per_tol[tol], dtype=np.float64)
            lo, hi = bootstrap_ci(v, args.bootstrap, args.seed)
            row[f"tol{tol:g}"] = {"hit_rate": float(v.mean()) if n else float("nan"), "ci95": [lo, hi]}
        rows.append(row)
    # Paired difference CAM - expected random, per method, at each tolerance.
    diffs = {}
    for m in methods:
        for tol in tols:
            d = np.asarray(hits[m][tol], float) - np.asarray(base["random (expected)"][tol], float)
            diffs[f"{m}@tol{tol:g}"] = {"mean": float(d.mean()) if n else float("nan"),
                                        "ci95": list(bootstrap_ci(d, args.bootstrap, args.seed))}

    seconds = time.perf_counter() - t0
    print(f"pointing game: {n} fractured images with boxes"
          + (f" ({args.split} split of {args.splits})" if args.splits else "")
          + f", model {Path(args.checkpoint).name} ({pred.card.backbone}, {size}px), "
          + f"{args.bootstrap} bootstrap resamples, {seconds:.0f}s")
    if not args.splits:
        print("note: no --splits given, so this includes images the model may have been trained on")
    if skipped:
        print(f"skipped {len(skipped)}: " + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    head = f"{'method':28s}" + "".join(f"{'hit@' + format(t, 'g') + 'px':>10s} {'95% CI':>15s}" for t in tols)
    print(head)
    print("-" * len(head))
    for row in rows:
        cells = "".join(
            f"{row[f'tol{t:g}']['hit_rate']:10.3f} [{row[f'tol{t:g}']['ci95'][0]:.3f},{row[f'tol{t:g}']['ci95'][1]:.3f}]"
            for t in tols
        )
        print(f"{row['method']:28s}{cells}")
    for k, v in diffs.items():
        print(f"CAM - random (expected), {k}: {v['mean']:+.3f} [{v['ci95'][0]:+.3f},{v['ci95'][1]:+.3f}]")

    if args.out:
        result = {
            "checkpoint": str(args.checkpoint), "data": str(data),
            "splits": str(args.splits) if args.splits else None, "split": args.split if args.splits else None,
            "image_size": size, "backbone": pred.card.backbone, "methods": methods,
            "n_images": n, "n_boxes": int(sum(len(boxes[u]["boxes"]) for u in used)),
            "mean_prob_abnormal": float(np.mean(probs_all)) if probs_all else None,
            "tolerances_px": tols, "bootstrap": args.bootstrap, "seed": args.seed,
            "results": rows, "cam_minus_random_expected": diffs, "skipped": skipped,
            "seconds": round(seconds, 1),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
