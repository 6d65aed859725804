"""Measure the scope gate: detection AUROC of in-distribution test radiographs against images the model
cannot know, and the share of in-distribution test images it refuses.

    python bench/scope.py fracatlas --data ../shared/data/FracAtlas --out bench/scope.json
    python bench/scope.py fracatlas --data ../shared/data/FracAtlas \\
        --holdout-model runs/fa-no-shoulder/checkpoints/last.ckpt --holdout-part shoulder

Every image goes through the front ends' path (bytes -> ``read_bytes_for_model`` -> model ->
``ScopeGate``). Out-of-distribution sets, all built offline: natural photos (scikit-image's bundled
samples) as colour files and as gray pixels only; CT / MR / US / NM slices from pydicom's bundled test
files, as DICOM files (Modality tag) and as gray PNGs (pixels only); synthetic gradients, noise,
rendered text, blank and nearly blank images. The score per image is the feature-space score
(inference/scope.py), +inf where an image-statistics check refused it; AUROC is scikit-learn's, OOD
as the positive class. ``--holdout-model``: a model trained (and calibrated) on a manifest CSV of the
dataset without one body part (``--holdout-data``), scored on that part's images from ``--data``
against its own test split; without it the held-out-part AUROC is "not measured".
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
          "clock", "coins", "moon", "brick", "grass", "gravel")
DICOM_FILES = {"CT": ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"),
               "MR": ("MR_small.dcm", "examples_overlay.dcm", "MR_small_RLE.dcm"),
               "US": ("ExplVR_BigEnd.dcm", "examples_palette.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm",
                      "examples_jpeg2k.dcm"),
               "NM": ("JPEG2000.dcm", "JPEG-lossy.dcm")}


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


def gray(a: np.ndarray) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(a)
    return np.asarray(im.convert("L"))


def photo_sets() -> dict[str, list[tuple[str, bytes]]]:
    from skimage import data

    colour, pixels = [], []
    for name in PHOTOS:
        a = getattr(data, name)()
        if a.ndim == 3:
            colour.append((f"{name}.png", png(a[..., :3])))
        pixels.append((f"{name}-gray.png", png(gray(a[..., :3]) if a.ndim == 3 else a)))
    return {"photos (colour files)": colour, "photos (gray pixels only)": pixels}


def dicom_sets() -> dict[str, list[tuple[str, bytes]]]:
    from pydicom.data import get_testdata_file

    from bonexray.data.imageio import read_image_bytes, to_uint8

    out: dict[str, list[tuple[str, bytes]]] = {}
    for modality, names in DICOM_FILES.items():
        files, pixels = [], []
        for n in names:
            path = get_testdata_file(n)
            if path is None:
                continue
            data = Path(path).read_bytes()
            try:
                g = to_uint8(read_image_bytes(data, n).pixels)
            except Exception as err:  # noqa: BLE001 - a file this machine cannot decode is left out, said so
                print(f"  {n}: left out ({type(err).__name__})", file=sys.stderr)
                continue
            files.append((n, data))
            pixels.append((n.replace(".dcm", ".png"), png(g)))
        out[f"{modality} (DICOM files)"] = files
        out[f"{modality} (gray pixels only)"] = pixels
    return out


def synthetic_sets(seed: int = 0) -> dict[str, list[tuple[str, bytes]]]:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    h, w = 384, 320
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    grads = []
    for i, ang in enumerate(np.linspace(0, np.pi, 8, endpoint=False)):
        g = (np.cos(ang) * xx + np.sin(ang) * yy)
        g = (255 * (g - g.min()) / (np.ptp(g) + 1e-9)).astype(np.uint8)
        grads.append((f"gradient{i}.png", png(g)))
    r = np.hypot(yy - 0.5, xx - 0.5)
    grads.append(("radial.png", png((255 * r / r.max()).astype(np.uint8))))
    for i in range(4):  # colour gradients
        c = np.stack([xx * 255, yy * 255, np.full_like(xx, 60.0 * i)], -1).astype(np.uint8)
        grads.append((f"colour-gradient{i}.png", png(c)))
    noise = [(f"uniform{i}.png", png(rng.integers(0, 256, (h, w), dtype=np.uint8))) for i in range(4)]
    noise += [(f"gauss{i}.png", png(np.clip(rng.normal(128, 20 + 20 * i, (h, w)), 0, 255).astype(np.uint8)))
              for i in range(4)]
    noise += [(f"colour-noise{i}.png", png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for i in range(2)]
    text = []
    font = ImageFont.load_default()
    for i in range(8):
        im = Image.new("L", (w, h), 255 if i % 2 == 0 else 0)
        d = ImageDraw.Draw(im)
        for line in range(18):
            d.text((8, 6 + 20 * line), f"Report {i}: the quick brown fox {line} jumps over 13 lazy dogs",
                   fill=0 if i % 2 == 0 else 255, font=font)
        text.append((f"text{i}.png", png(np.asarray(im))))
    blank = [(f"constant{v}.png", png(np.full((h, w), v, np.uint8))) for v in (0, 40, 128, 200, 255)]
    blank += [(f"near-constant{i}.png", png(np.clip(rng.normal(100 + 30 * i, 1.0, (h, w)), 0, 255).astype(np.uint8)))
              for i in range(5)]
    return {"synthetic gradients": grads, "noise": noise, "rendered text": text, "blank / nearly constant": blank}


def score_items(predictor, gate, items: list[tuple[str, bytes]], batch_size: int = 32):
    """(scores, reasons) for (name, bytes) items through the front ends' path; undecodable files are left out."""
    from bonexray.data.preprocess import read_bytes_for_model
    from bonexray.inference.scope import source_evidence, statistics_reason

    scores, reasons = [], []
    for i in range(0, len(items), batch_size):
        ms, ev, names = [], [], []
        for name, data in items[i : i + batch_size]:
            try:
                ms.append(read_bytes_for_model(data, name, predictor.image_size))
            except Exception as err:  # noqa: BLE001
                print(f"  {name}: not decoded ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            ev.append(source_evidence(data))
            names.append(name)
        if not ms:
            continue
        pred = predictor.predict_batch(np.stack([m.tile for m in ms]), boxes=False)
        why = gate.reasons([m.decoded.pixels for m in ms], [m.truncated for m in ms], ev, pred.embedding)
        feat = (gate.features.scores(pred.embedding) if gate.features is not None and pred.embedding is not None
                else np.zeros(len(ms)))
        for m, e, f in zip(ms, ev, feat):
            stat = statistics_reason(m.decoded.pixels, m.truncated, e)
            scores.append(np.inf if stat is not None else float(f))
        reasons.extend(why)
    return np.asarray(scores, np.float64), reasons


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not len(in_scores) or not len(out_scores):
        return None
    s = np.concatenate([in_scores, out_scores])
    s = np.where(np.isfinite(s), s, 1e300)
    return float(roc_auc_score(np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], s))


def test_images(model_path, data: str, part: str | None = None, exclude_part: str | None = None):
    """(name, bytes) of the model's test split images (``part``: only that body part, from every split)."""
    from bonexray.data.datasets import load_dataset
    from bonexray.evaluation.evaluate import assign_eval_splits, find_run_dir
    from bonexray.model.checkpoint import read_card

    records = load_dataset(data)
    if part is not None:
        chosen = [r for r in records if r.body_part == part]
    else:
        records, _ = assign_eval_splits(records, read_card(model_path).split, find_run_dir(Path(model_path)), None)
        chosen = [r for r in records if r.split == "test" and r.body_part != exclude_part]
    root = Path(records.root)
    # Record paths are as the reader made them (already under the dataset root) or relative to it.
    return [(r.path, (Path(r.path) if Path(r.path).is_file() else root / r.path).read_bytes()) for r in chosen]


def measure(model: str, data: str, holdout_model: str | None = None, holdout_part: str | None = None,
            batch_size: int = 32, limit: int | None = None, holdout_data: str | None = None) -> dict:
    from bonexray.inference.predictor import Predictor
    from bonexray.inference.scope import ScopeGate

    predictor = Predictor(model, device="cpu")
    gate = ScopeGate(predictor.card)
    ind = test_images(predictor.path, data)[:limit]
    in_scores, in_reasons = score_items(predictor, gate, ind, batch_size)
    result = {"model": str(predictor.path), "data": str(data),
              "feature_statistics": gate.features is not None,
              "in_distribution": {"set": "the model's test split", "n": len(in_scores),
                                  "refused_share": float(np.mean([r is not None for r in in_reasons])),
                                  "reasons": dict(Counter(r for r in in_reasons if r))},
              "ood": {}}
    sets = {**photo_sets(), **dicom_sets(), **synthetic_sets()}
    for name, items in sets.items():
        scores, reasons = score_items(predictor, gate, items, batch_size)
        result["ood"][name] = {"n": len(scores), "auroc": auroc(in_scores, scores),
                               "refused_share": float(np.mean([r is not None for r in reasons])) if reasons else None,
                               "reasons": dict(Counter(r or "in scope (missed)" for r in reasons))}
    if holdout_model and holdout_part:
        hp = Predictor(holdout_model, device="cpu")
        hgate = ScopeGate(hp.card)
        own, _ = score_items(hp, hgate, test_images(hp.path, holdout_data or data, exclude_part=holdout_part)[:limit],
                             batch_size)
        held, hreasons = score_items(hp, hgate, test_images(hp.path, data, part=holdout_part)[:limit], batch_size)
        result["held_out_body_part"] = {"part": holdout_part, "model": str(hp.path), "n": len(held),
                                        "auroc": auroc(own, held),
                                        "refused_share": float(np.mean([r is not None for r in hreasons]))}
    else:
        result["held_out_body_part"] = "not measured (give --holdout-model and --holdout-part)"
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model path or bundled name (with scope statistics in its card)")
    ap.add_argument("--data", required=True, help="the FracAtlas folder the model was trained on")
    ap.add_argument("--out", default="scope.json")
    ap.add_argument("--holdout-model", default=None)
    ap.add_argument("--holdout-part", default=None)
    ap.add_argument("--holdout-data", default=None, help="what the holdout model was trained on (default --data)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="at most N in-distribution test images (quick runs)")
    args = ap.parse_args(argv)
    res = measure(args.model, args.data, args.holdout_model, args.holdout_part, args.batch_size, args.limit,
                  args.holdout_data)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    ind = res["in_distribution"]
    print(f"in-distribution test images: {ind['n']}, refused {ind['refused_share']:.1%} {ind['reasons']}")
    if not res["feature_statistics"]:
        print("note: the model card has no feature statistics (bonexray calibrate-scope): image statistics only")
    print(f"{'OOD set':34s} {'n':>4s} {'AUROC':>7s} {'refused':>8s}")
    for name, r in res["ood"].items():
        a = "n/a" if r["auroc"] is None else f"{r['auroc']:.3f}"
        ref = "n/a" if r["refused_share"] is None else f"{r['refused_share']:.0%}"
        print(f"{name:34s} {r['n']:4d} {a:>7s} {ref:>8s}")
    h = res["held_out_body_part"]
    print("held-out body part: " + (h if isinstance(h, str) else
                                    f"{h['part']}: AUROC {h['auroc']:.3f}, refused {h['refused_share']:.0%} of {h['n']}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
