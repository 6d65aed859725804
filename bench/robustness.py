"""Robustness of verdicts on the test split: flip and refusal rates per transform, and dihedral averaging.

    python bench/robustness.py fracatlas --data ../shared/data/FracAtlas --limit 60 --out bench/robustness.json

Each test-split image (the model card's split; ``--limit`` N: the first N, a stated subset) is decoded,
transformed with PIL (quarter turns, flips, inversion as MONOCHROME1 read as MONOCHROME2, JPEG
re-compression at quality 5 / 30 / 70, centre crops, contrast and brightness), re-encoded and sent
through the front ends' path (bytes -> decoder -> tile -> model -> ScopeGate -> core.decision).
Per transform: the share refused by the gate, the share whose ``abnormal`` verdict flips (among all
images; refused ones do not flip, they are counted as refused), and the share whose finding flips
confidently (negative <-> positive) - both only over images in scope before and after.

The transforms are predicted under the model card's test-time augmentation (``--tta`` to choose
another), as every front end predicts. Dihedral test-time averaging (the mean probability over the 8
rotations / flips of the tile, invariant to them by construction; ``--tta d4``): image AUROC of the
plain view and of the average on the same images, and the paired bootstrap 95% CI of the difference
(resampling studies).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_cache import DEFAULT_CACHE, embed_items  # noqa: E402

TRANSFORMS = ("identity", "rot90", "rot180", "rot270", "flip-lr", "flip-ud", "invert", "jpeg5", "jpeg30", "jpeg70",
              "crop80", "crop60", "contrast0.6", "contrast1.5", "bright-40", "bright+40")
#: The issue's target: at most 3% of verdicts flip under these.
TARGET_SET = ("rot90", "rot180", "rot270", "flip-lr", "flip-ud", "jpeg30", "jpeg70")


def transform(gray: np.ndarray, name: str) -> tuple[str, bytes]:
    """(suffix, encoded bytes) of one transformed uint8 gray image."""
    from PIL import Image, ImageEnhance

    im = Image.fromarray(gray)
    fmt, quality = "PNG", None
    if name.startswith("rot"):
        im = im.rotate(int(name[3:]), expand=True)
    elif name == "flip-lr":
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif name == "flip-ud":
        im = im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    elif name == "invert":
        im = Image.fromarray(255 - gray)
    elif name.startswith("jpeg"):
        fmt, quality = "JPEG", int(name[4:])
    elif name.startswith("crop"):
        f = int(name[4:]) / 100
        w, h = im.size
        cw, ch = int(w * f), int(h * f)
        im = im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    elif name.startswith("contrast"):
        im = ImageEnhance.Contrast(im).enhance(float(name[8:]))
    elif name.startswith("bright"):
        im = Image.fromarray(np.clip(gray.astype(int) + int(name[6:]), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": quality} if quality else {}))
    return (".jpg" if fmt == "JPEG" else ".png"), buf.getvalue()


def dihedral(tiles: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(tiles, k, axes=(1, 2))
        out += [np.ascontiguousarray(r), np.ascontiguousarray(r[:, :, ::-1])]
    return out


def auroc_ci(y, a, b, groups, n_boot: int = 1000, seed: int = 0):
    """(AUROC a, AUROC b, difference b - a, its paired 95% CI resampling groups)."""
    from sklearn.metrics import roc_auc_score

    y, a, b, groups = map(np.asarray, (y, a, b, groups))
    _, inv = np.unique(groups.astype(str), return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if len(np.unique(y[pick])) < 2:
            continue
        diffs.append(roc_auc_score(y[pick], b[pick]) - roc_auc_score(y[pick], a[pick]))
    return (float(roc_auc_score(y, a)), float(roc_auc_score(y, b)), float(roc_auc_score(y, b) - roc_auc_score(y, a)),
            [float(v) for v in np.percentile(diffs, [2.5, 97.5])])


def measure(model: str, data: str, limit: int | None, cache: str | None, transforms=TRANSFORMS,
            tta: str | None = None) -> dict:
    from bonexray.core.decision import calibrated, finding_state, operating_points
    from bonexray.data.datasets import load_dataset
    from bonexray.data.imageio import read_image_bytes, to_uint8
    from bonexray.data.preprocess import read_bytes_for_model
    from bonexray.evaluation.evaluate import assign_eval_splits, find_run_dir
    from bonexray.inference.predictor import Predictor
    from bonexray.inference.scope import ScopeGate, source_evidence

    predictor = Predictor(model, device="cpu", tta=tta)  # None: the card's TTA, as every front end runs it
    card = predictor.card
    gate, points = ScopeGate(card), operating_points(card)
    records, how = assign_eval_splits(load_dataset(data), card.split, find_run_dir(predictor.path), None)
    root = Path(records.root)
    chosen = [r for r in records if r.split == "test" and r.abnormal in (0, 1)][:limit]
    originals = []
    for r in chosen:
        path = Path(r.path) if Path(r.path).is_file() else root / r.path
        raw = path.read_bytes()
        originals.append(to_uint8(read_image_bytes(raw, str(path)).pixels))
    per = {}
    for t in transforms:
        items, reasons = [], []
        for r, g in zip(chosen, originals):
            suffix, data_t = transform(g, t)
            items.append((f"{Path(r.path).stem}-{t}{suffix}", data_t))
        emb = embed_items(predictor, f"robust-{t}", items, cache)
        assert len(emb["names"]) == len(items), "a transformed image failed to decode"
        for (name, data_t), e in zip(items, emb["embedding"]):
            m = read_bytes_for_model(data_t, name, predictor.image_size)
            reasons.append(gate.reasons([m.decoded.pixels], [m.truncated], [source_evidence(data_t)], e[None])[0])
        prob = np.array([calibrated(float(p), card) for p in emb["prob"]])
        per[t] = {"prob": prob, "abnormal": emb["prob"] >= card.threshold,  # the card's threshold is on the network's p
                  "finding": [finding_state(p, points) for p in prob], "refused": np.array([x is not None for x in reasons]),
                  "reasons": reasons}
    base = per["identity"]
    out = {"model": str(predictor.path), "tta": predictor.tta, "split": f"test ({how})", "n_images": len(chosen),
           "subset": f"first {limit} labelled test images" if limit else "all labelled test images",
           "operating_points": [points.suspicious, points.definite], "transforms": {}}
    for t in transforms:
        cur = per[t]
        both = ~base["refused"] & ~cur["refused"]
        flip = both & (cur["abnormal"] != base["abnormal"])
        confident = both & np.array([{a, b} == {"negative", "positive"} for a, b in zip(base["finding"], cur["finding"])])
        out["transforms"][t] = {"refused": float(cur["refused"].mean()), "verdict_flips": float(flip.mean()),
                                "confident_finding_flips": float(confident.mean()), "n_flips": int(flip.sum()),
                                "reasons": {k: int(sum(1 for x in cur["reasons"] if x == k))
                                            for k in sorted({x for x in cur["reasons"] if x})}}
    worst = max(out["transforms"][t]["verdict_flips"] for t in TARGET_SET if t in out["transforms"])
    out["target"] = {"rule": "at most 3% of verdicts flip under quarter turns, flips and JPEG quality >= 30",
                     "worst": worst, "met": worst <= 0.03}
    # Dihedral averaging on the identity tiles.
    tiles = np.stack([read_bytes_for_model(transform(g, "identity")[1], "x.png", predictor.image_size).tile
                      for g in originals])
    views = dihedral(tiles)
    probs = []
    for k, v in enumerate(views):
        items = [(f"{Path(r.path).stem}-d{k}.png", transform(np.ascontiguousarray(v[i]), "identity")[1])
                 for i, r in enumerate(chosen)]
        probs.append(embed_items(predictor, f"dihedral-{k}", items, cache, tta="none")["prob"])
    tta = np.mean(probs, 0)
    y = np.array([r.abnormal for r in chosen])
    a, b, d, ci = auroc_ci(y, probs[0], tta, [r.study_id for r in chosen])
    out["dihedral_tta"] = {"auroc_plain": a, "auroc_dihedral": b, "difference": d, "difference_ci95": ci,
                           "cost": "8 network passes per image instead of 1"}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="embedding cache folder ('' for none)")
    ap.add_argument("--out", default="robustness.json")
    ap.add_argument("--tta", choices=("none", "flip", "d4"), default=None, help="default: the model card's")
    args = ap.parse_args(argv)
    res = measure(args.model, args.data, args.limit, args.cache or None, tta=args.tta)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['n_images']} test images ({res['subset']}), TTA {res['tta']}")
    print(f"{'transform':14s} {'refused':>8s} {'flips':>7s} {'confident':>10s}")
    for t, r in res["transforms"].items():
        print(f"{t:14s} {r['refused']:8.1%} {r['verdict_flips']:7.1%} {r['confident_finding_flips']:10.1%}")
    d = res["dihedral_tta"]
    print(f"dihedral averaging: AUROC {d['auroc_plain']:.3f} -> {d['auroc_dihedral']:.3f} "
          f"(difference {d['difference']:+.3f}, 95% CI {d['difference_ci95'][0]:+.3f} to {d['difference_ci95'][1]:+.3f})")
    print(f"target ({res['target']['rule']}): worst {res['target']['worst']:.1%}, "
          f"{'met' if res['target']['met'] else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
