"""The box AP from one matching pass equals COCO's evaluation (pycocotools, faster-coco-eval) to 1e-6 on
FracAtlas-shaped data: normal images without boxes, duplicate detections, fractured images nobody
annotated, several fracture boxes per image and tied scores; and a bootstrap resample equals COCO run on
the resampled images."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from bonexray.evaluation.localization import COCO_MAX_DETECTIONS, localization_metrics


def _coco_inputs(preds, gts):
    images = [{"id": i + 1, "width": 640, "height": 640} for i in range(len(gts))]
    anns, k = [], 1
    for i, g in enumerate(gts):
        for x0, y0, x1, y1 in g:
            anns.append({"id": k, "image_id": i + 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
            k += 1
    dets = [{"image_id": i + 1, "category_id": 1, "bbox": [p[0], p[1], p[2] - p[0], p[3] - p[1]], "score": float(p[4])}
            for i, ps in enumerate(preds) for p in ps]
    dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "fracture"}]}
    return dataset, dets


def _pycocotools_ap(preds, gts):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, dets = _coco_inputs(preds, gts)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])  # AP50, AP50:95 (maxDets 100, area "all")


def _faster_coco_eval_ap(preds, gts):
    fce = pytest.importorskip("faster_coco_eval")
    dataset, dets = _coco_inputs(preds, gts)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = fce.COCO(dataset)
        ev = fce.COCOeval_faster(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])


def fracatlas_like(n_images=240, seed=0, tie_decimals=2):
    """About a fifth of the images fractured (1-3 boxes, some on top of each other), the rest normal; scores
    rounded so that many tie; duplicates on fractures; now and then more than 100 detections; one in ten
    fractured images unannotated (None). Returns preds, gts (with None), groups (two images per exam)."""
    rng = np.random.default_rng(seed)
    preds, gts, groups = [], [], []
    for i in range(n_images):
        fractured = rng.random() < 0.22
        m = int(rng.integers(1, 4)) if fractured else 0
        xy = rng.uniform(0, 280, (m, 2))
        g = np.c_[xy, xy + rng.uniform(8, 40, (m, 2))]
        if m >= 2 and rng.random() < 0.5:  # a second box overlapping the first, as fragments do
            g[1] = g[0] + rng.normal(0, 3, 4)
            g[1, 2:] = np.maximum(g[1, 2:], g[1, :2] + 1)
        k = int(rng.integers(0, 12)) if rng.random() < 0.97 else COCO_MAX_DETECTIONS + 20
        pxy = rng.uniform(0, 300, (k, 2))
        p = np.c_[pxy, pxy + rng.uniform(6, 50, (k, 2)), rng.uniform(0.01, 1, k)]
        for box in g:
            for _ in range(int(rng.integers(0, 4))):  # 0-3 detections on each fracture: duplicates
                noisy = box + rng.normal(0, 2.5, 4)
                noisy[2:] = np.maximum(noisy[2:], noisy[:2] + 1)
                p = np.r_[p, [[*noisy, rng.uniform(0.2, 1)]]]
        if m and rng.random() < 0.3:
            p = np.r_[p, [[*g[0], p[0, 4] if len(p) else 0.5]]]  # the exact box, tied with another detection
        p[:, 4] = np.round(p[:, 4], tie_decimals)
        preds.append(p.reshape(-1, 5))
        gts.append(None if fractured and rng.random() < 0.1 else g.reshape(-1, 4))
        groups.append(f"patient{i // 2}")
    return preds, gts, groups


def _annotated(preds, gts):
    keep = [i for i, g in enumerate(gts) if g is not None]
    return [preds[i] for i in keep], [gts[i] for i in keep]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_set_ap_equals_pycocotools_and_faster_coco_eval(seed):
    preds, gts, groups = fracatlas_like(seed=seed)
    m = localization_metrics(preds, gts, groups, n_bootstrap=0)
    assert m["n_unannotated_excluded"] > 0 and m["n_fractured_images"] < m["n_images"]
    p, g = _annotated(preds, gts)
    ap50, ap = _pycocotools_ap(p, g)
    assert 0 < ap < ap50 < 1
    assert m["ap50"] == pytest.approx(ap50, abs=1e-6) and m["ap50_95"] == pytest.approx(ap, abs=1e-6)
    fast50, fast = _faster_coco_eval_ap(p, g)
    assert m["ap50"] == pytest.approx(fast50, abs=1e-6) and m["ap50_95"] == pytest.approx(fast, abs=1e-6)
    # Fractured images only: COCO on those images alone.
    fi = [i for i, b in enumerate(g) if len(b)]
    f50, f = _pycocotools_ap([p[i] for i in fi], [g[i] for i in fi])
    frac = m["fractured_only"]
    assert frac["ap50"] == pytest.approx(f50, abs=1e-6) and frac["ap50_95"] == pytest.approx(f, abs=1e-6)
    assert frac["ap50"] > m["ap50"]  # normal images only add false positives
    assert (frac["n_images"], frac["n_boxes"]) == (len(fi), m["n_boxes"])


def test_a_bootstrap_resample_equals_coco_on_the_resampled_images():
    """Weighting the matches by how often each exam is drawn is COCO on the drawn images (continuous scores:
    the one difference, the order of tied scores of different detections, cannot arise)."""
    from bonexray.evaluation import localization as loc

    preds, gts, groups = fracatlas_like(n_images=120, seed=5, tie_decimals=12)
    p, g = _annotated(preds, gts)
    grp = [groups[i] for i, b in enumerate(gts) if b is not None]
    idx, n_groups = loc._group_index(grp)
    curves = loc._Curves(loc._Matches(p, g), np.arange(len(p)), idx, n_groups)
    draws = np.random.default_rng(3).integers(0, n_groups, size=(3, n_groups))
    got = loc._ap_pair(curves.evaluate(loc._group_counts(draws, n_groups))["ap"])
    for r, row in enumerate(draws):
        images = [i for gi in row for i in np.flatnonzero(idx == gi)]
        ap50, ap = _pycocotools_ap([p[i] for i in images], [g[i] for i in images])
        assert got[0][r] == pytest.approx(ap50, abs=1e-6) and got[1][r] == pytest.approx(ap, abs=1e-6)


def test_ap_cis_use_every_resample_and_bracket_the_estimate():
    preds, gts, groups = fracatlas_like(seed=4)
    m = localization_metrics(preds, gts, groups, n_bootstrap=1000, seed=0)
    assert set(m["ci95_resamples"].values()) == {1000} and m["fractured_only"]["ci95_resamples"] == 1000
    for block in (m, m["fractured_only"]):
        for key in ("ap50", "ap50_95"):
            lo, hi = block["ci95"][key]
            assert lo < block[key] < hi
