"""Box post-processing without retraining: suppression, fusion, boxes per image and the operating point.

    python bench/box_postprocess.py MODEL --data ../shared/data/FracAtlas [--choose-on valid] [--report-on test]
        [--json out.json]

Runs the model once on the images of two splits of its own card split (as ``bonexray evaluate``
does), keeps every candidate box down to score 0.01 before suppression, then for each
post-processing setting (NMS at several IoUs, NMS plus suppression of boxes nested in a better one,
weighted box fusion, at most k boxes per image) prints, on both splits: AP50 on all images and on
the fractured images only (images with at least one fracture box: FracAtlas's official protocol),
pointing, FROC sensitivity at 0.5 / 1 / 2 FP per image (evaluation/localization.py, the functions
``evaluate`` uses), and, at an operating point chosen on the ``--choose-on`` split (the lowest
score threshold with at most ``--fp-per-image`` false-positive boxes per image there), the boxes
per fractured image, FP per image and box sensitivity on both splits. The report split is only
read with settings fixed beforehand; nothing is chosen on it.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from box_model_data import add_model_data_arguments, load_box_model_and_data


#: Candidates kept per image before suppression (by score; COCO AP counts at most 100 per image).
MAX_CANDIDATES = 300


def candidates(pred, cache, records, split: str, batch: int = 16):
    """Per image of ``split``: (candidate boxes (n, 5) before suppression, fracture boxes (m, 4) or None, group)."""
    from bonexray.data.preprocess import letterbox_boxes

    row = dict(zip(cache.index["path"], cache.index["row"]))
    chosen = [r for r in records if r.split == split and r.path in row and r.abnormal in (0, 1)]
    settings = replace(pred.box_settings, threshold=0.01, nms_iou=1.0, max_detections=MAX_CANDIDATES)
    out = []
    for i in range(0, len(chosen), batch):
        chunk = chosen[i : i + batch]
        found = pred.predict_batch(np.stack([cache.images[row[r.path]] for r in chunk]), box_settings=settings).boxes
        print(f"  {split}: {min(i + batch, len(chosen))}/{len(chosen)} images", end="\r", file=sys.stderr)
        for r, f in zip(chunk, found):
            if not r.extras.get("localized", False):
                truth = None
            elif r.extras.get("boxes"):
                truth = letterbox_boxes(r.extras["boxes"], r.extras["annotated_size"], pred.image_size)
            else:
                truth = np.zeros((0, 4), np.float32)
            out.append((np.asarray(f, np.float32), truth, r.study_id))
    return out


def suppress(boxes: np.ndarray, how: str, iou: float, k: int = 100) -> np.ndarray:
    """Candidates (n, 5) sorted or not -> kept boxes, highest score first, at most ``k``.

    ``nms``: torchvision NMS at ``iou``. ``nms+nested``: NMS, then a box whose area lies mostly
    (>= 0.6) inside a better box is dropped too (small boxes inside a large one, and the reverse).
    ``wbf``: weighted box fusion (Solovyev et al., 2021) within one model: boxes are clustered in score
    order (IoU > ``iou`` with a cluster's fused box joins it), a cluster's box is the score-weighted
    mean of its members and its score is its best member's (so the ranking stays the model's).
    """
    import torch
    from torchvision.ops import box_iou, nms

    if not len(boxes):
        return boxes.reshape(0, 5)
    b = torch.as_tensor(boxes[:, :4], dtype=torch.float32)
    s = torch.as_tensor(boxes[:, 4], dtype=torch.float32)
    if how in ("nms", "nms+nested"):
        keep = nms(b, s, iou)
        b, s = b[keep], s[keep]
        if how == "nms+nested" and len(b) > 1:
            x0 = torch.maximum(b[:, None, 0], b[None, :, 0])
            y0 = torch.maximum(b[:, None, 1], b[None, :, 1])
            x1 = torch.minimum(b[:, None, 2], b[None, :, 2])
            y1 = torch.minimum(b[:, None, 3], b[None, :, 3])
            inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            iomin = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-6)
            kept = []
            for i in range(len(b)):  # sorted by score
                if all(float(iomin[i, j]) < 0.6 for j in kept):
                    kept.append(i)
            b, s = b[kept], s[kept]
        return torch.cat([b, s[:, None]], 1)[:k].numpy()
    if how == "wbf":
        bb, ss = boxes[np.argsort(-boxes[:, 4], kind="stable")][:, :4].astype(np.float64), np.sort(boxes[:, 4])[::-1]
        fused = np.zeros((len(bb), 4))
        wsum = np.zeros(len(bb))
        wbox = np.zeros((len(bb), 4))
        top = np.zeros(len(bb))
        n = 0
        for i in range(len(bb)):
            if n:
                f = fused[:n]
                wh = np.clip(np.minimum(f[:, 2:], bb[i, 2:]) - np.maximum(f[:, :2], bb[i, :2]), 0, None)
                inter = wh[:, 0] * wh[:, 1]
                union = (f[:, 2] - f[:, 0]) * (f[:, 3] - f[:, 1]) + (bb[i, 2] - bb[i, 0]) * (bb[i, 3] - bb[i, 1]) - inter
                ious = inter / np.maximum(union, 1e-9)
                j = int(ious.argmax())
                if ious[j] > iou:
                    wsum[j] += ss[i]
                    wbox[j] += ss[i] * bb[i]
                    fused[j] = wbox[j] / wsum[j]
                    continue
            fused[n], wsum[n], wbox[n], top[n] = bb[i], ss[i], ss[i] * bb[i], ss[i]
            n += 1
        return np.concatenate([fused[:n], top[:n, None]], 1).astype(np.float32)[:k]
    raise ValueError(how)


def operating_point(items, fp_per_image: float) -> float:
    """The lowest score threshold whose boxes give at most ``fp_per_image`` false positives per image
    (FROC's counting: a box is a TP when IoU >= 0.5 with a not-yet-hit fracture box of its image)."""
    scored = _tp_flags(items)
    n = len(items)
    if not scored:
        return 0.5
    scored.sort(key=lambda t: -t[0])
    fp, best = 0, scored[0][0] + 1e-6
    i = 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            fp += int(scored[j][1] == 0)
            j += 1
        if fp / n > fp_per_image:
            break
        best = scored[i][0]
        i = j
    return float(best)


def _tp_flags(items):
    """(score, 1 TP / 0 FP / -1 duplicate on a hit box) of every box, matched in global score order."""
    from bonexray.evaluation.localization import _match_image

    out = []
    for boxes, truth in items:
        if not len(boxes):
            continue
        order = np.argsort(-boxes[:, 4], kind="stable")
        if len(truth):
            matched, best = _match_image(boxes[order], truth)  # COCO's matching; row 0 is IoU 0.5
            flags = np.where(matched[0], 1, np.where(best >= 0.5, -1, 0))  # unmatched on a taken box: duplicate
        else:
            flags = np.zeros(len(boxes), int)
        out.extend(zip(boxes[order, 4].tolist(), np.asarray(flags).tolist()))
    return out


def at_threshold(items, thr: float, k: int) -> dict:
    kept = [(b[b[:, 4] >= thr][:k], t) for b, t in items]
    flags = _tp_flags(kept)
    n_gt = sum(len(t) for _, t in kept)
    fractured = [len(b) for b, t in kept if len(t)]
    return {"threshold": round(thr, 4), "boxes_per_fractured_image": float(np.mean(fractured)) if fractured else None,
            "boxes_per_normal_image": float(np.mean([len(b) for b, t in kept if not len(t)] or [0])),
            "fp_per_image": sum(f == 0 for _, f in flags) / max(1, len(kept)),
            "sensitivity": sum(f == 1 for _, f in flags) / max(1, n_gt),
            "fractured_images_with_a_box": float(np.mean([n > 0 for n in fractured])) if fractured else None}


def metrics(items, groups, n_bootstrap: int = 0) -> dict:
    from bonexray.evaluation.localization import localization_metrics

    preds = [b for b, _ in items]
    gts = [t for _, t in items]
    allm = localization_metrics(preds, gts, groups, n_bootstrap=n_bootstrap)
    fi = [i for i, t in enumerate(gts) if len(t)]
    frac = localization_metrics([preds[i] for i in fi], [gts[i] for i in fi], [groups[i] for i in fi],
                                n_bootstrap=n_bootstrap)
    keep = ("ap50", "ap50_95", "pointing", "froc_sensitivity", "n_images", "n_boxes") + (("ci95",) if n_bootstrap else ())
    return {"all": {k: allm[k] for k in keep}, "fractured_only": {k: frac[k] for k in ("ap50", "ap50_95", "n_images", "n_boxes")
                                                                   + (("ci95",) if n_bootstrap else ())}}


SETTINGS = [("nms", 0.5), ("nms", 0.3), ("nms", 0.2), ("nms", 0.1), ("nms+nested", 0.3), ("nms+nested", 0.2),
            ("wbf", 0.3), ("wbf", 0.2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_data_arguments(ap)
    ap.add_argument("--choose-on", default="valid")
    ap.add_argument("--report-on", default="test")
    ap.add_argument("--fp-per-image", type=float, default=1.0, help="operating point chosen for at most this many FP/image")
    ap.add_argument("--max-per-image", type=int, nargs="+", default=[10, 3, 2, 1], help="k values: boxes reported per image")
    ap.add_argument("--bootstrap", type=int, default=0, help="resamples for CIs of the report split (0: none)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--candidates", default=None, help="folder to keep the candidate boxes in (a rerun reads them back)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log file as it comes
    loaded = load_box_model_and_data(args)
    if loaded is None:
        return 2
    pred, cache, records, how = loaded
    print(f"{args.model}: card split ({how}); card boxes {pred.card.boxes}")
    data = {}
    for split in (args.choose_on, args.report_on):
        store = Path(args.candidates) / f"{split}.pkl" if args.candidates else None
        if store is not None and store.is_file():
            c = pickle.loads(store.read_bytes())
        else:
            c = [x for x in candidates(pred, cache, records, split) if x[1] is not None]
            if store is not None:
                store.parent.mkdir(parents=True, exist_ok=True)
                store.write_bytes(pickle.dumps(c))
        data[split] = ([(b, t) for b, t, _ in c], [g for _, _, g in c])
        print(f"{split}: {len(c)} images with known fracture locations, {sum(len(t) > 0 for _, t, _ in c)} fractured")
    rows = []
    hdr = (f"{'setting':16} {'split':6} {'AP50':>6} {'AP50fr':>6} {'point':>6} {'F@.5':>5} {'F@1':>5} {'F@2':>5} | "
           f"{'k':>2} {'thr':>6} {'box/fr':>6} {'FP/img':>6} {'sens':>5}")
    print(hdr)
    for how_, iou in SETTINGS:
        proc = {s: [(suppress(b, how_, iou), t) for b, t in data[s][0]] for s in data}
        m = {s: metrics(proc[s], data[s][1]) for s in proc}
        for k in args.max_per_image:
            thr = operating_point([(b[:k], t) for b, t in proc[args.choose_on]], args.fp_per_image)
            op = {s: at_threshold(proc[s], thr, k) for s in proc}
            for s in (args.choose_on, args.report_on):
                a, f = m[s]["all"], m[s]["fractured_only"]
                fr = a["froc_sensitivity"]
                print(f"{how_ + '@' + str(iou):16} {s:6} {a['ap50']:6.3f} {f['ap50']:6.3f} {a['pointing']:6.3f} "
                      f"{fr['0.5']:5.3f} {fr['1']:5.3f} {fr['2']:5.3f} | {k:2d} {thr:6.3f} "
                      f"{op[s]['boxes_per_fractured_image']:6.2f} {op[s]['fp_per_image']:6.2f} {op[s]['sensitivity']:5.3f}")
            rows.append({"suppression": how_, "iou": iou, "max_per_image": k, "metrics": m, "operating_point": op})
    if args.bootstrap:
        print(f"CIs on {args.report_on} ({args.bootstrap} resamples) for nms@0.5 (the card's) and the other settings:")
        for how_, iou in SETTINGS:
            proc = [(suppress(b, how_, iou), t) for b, t in data[args.report_on][0]]
            mm = metrics(proc, data[args.report_on][1], n_bootstrap=args.bootstrap)
            for r in rows:
                if r["suppression"] == how_ and r["iou"] == iou:
                    r["metrics"][args.report_on] = mm
            print(f"  {how_}@{iou}: AP50 {mm['all']['ap50']:.3f} {mm['all']['ci95']['ap50']}  fractured-only "
                  f"{mm['fractured_only']['ap50']:.3f} {mm['fractured_only']['ci95']['ap50']}  pointing "
                  f"{mm['all']['pointing']:.3f} {mm['all']['ci95']['pointing']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "choose_on": args.choose_on, "report_on": args.report_on,
                                               "fp_per_image": args.fp_per_image, "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
