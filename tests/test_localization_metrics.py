"""Localisation metrics (AP, FROC, pointing game): hand-worked cases and a direct torchmetrics check
(pycocotools and faster-coco-eval: tests/test_localization_coco.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bonexray.evaluation.localization import (
    localization_metrics,
    plot_froc,
    pointing_hits,
    report_section,
)

NO_BOX = np.zeros((0, 4))
NO_PRED = np.zeros((0, 5))
FROC_KEYS = ("0.5", "1", "2")
# COCO interpolates precision at 101 recall points: AP of "TP, FP, TP" on two boxes.
AP_TP_FP_TP = (51 * 1.0 + 50 * (2 / 3)) / 101


def det(x0, y0, x1, y1, score):
    return [x0, y0, x1, y1, score]


def run(preds, gts, groups=None, **kw):
    kw.setdefault("n_bootstrap", 0)
    return localization_metrics(preds, gts, groups if groups is not None else list(range(len(preds))), **kw)


# --------------------------------------------------------------------------- pointing_hits


def test_pointing_hits_edges_nan_and_empty():
    boxes = [[[10, 10, 20, 20]], [[10, 10, 20, 20], [50, 50, 60, 70]], [[10, 10, 20, 20]], NO_BOX, [[0, 0, 5, 5]]]
    pts = [[20, 10], [55, 70], [20.01, 15], [0, 0], [np.nan, np.nan]]
    assert pointing_hits(pts, boxes).tolist() == [True, True, False, False, False]
    assert pointing_hits(np.zeros((0, 2)), []).shape == (0,)
    with pytest.raises(ValueError, match="2 points but 1"):
        pointing_hits([[0, 0], [1, 1]], [NO_BOX])


# --------------------------------------------------------------------------- hand-worked cases


def test_perfect_predictions():
    gts = [np.array([[10, 10, 50, 40]]), np.array([[0, 0, 30, 30], [60, 60, 90, 100]]), NO_BOX, NO_BOX]
    preds = [np.array([det(10, 10, 50, 40, 0.9)]),
             np.array([det(60, 60, 90, 100, 0.8), det(0, 0, 30, 30, 0.7)]),
             NO_PRED, NO_PRED]
    m = run(preds, gts, n_bootstrap=50)
    assert m["ap50"] == pytest.approx(1.0) and m["ap50_95"] == pytest.approx(1.0)
    assert m["pointing"] == 1.0
    assert m["froc_sensitivity"] == {"0.5": 1.0, "1": 1.0, "2": 1.0}
    assert (m["n_images"], m["n_boxes"], m["n_fractured_images"], m["n_detections"]) == (4, 3, 2, 3)
    assert m["froc_curve"]["fp_per_image"] == [0.0, 0.0, 0.0, 0.0]  # the origin, then one point per box
    assert m["froc_curve"]["sensitivity"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    json.dumps(m, allow_nan=False)  # strict JSON


def test_predictions_only_on_normal_images_are_false_positives():
    gts = [np.array([[10, 10, 50, 40]]), NO_BOX, NO_BOX]
    preds = [NO_PRED, np.array([det(10, 10, 50, 40, 0.9), det(0, 0, 5, 5, 0.4)]),
             np.array([det(10, 10, 50, 40, 0.6)])]
    m = run(preds, gts)
    assert m["ap50"] == 0.0 and m["ap50_95"] == 0.0
    assert m["pointing"] == 0.0  # the fractured image has no box: a miss
    assert m["froc_sensitivity"] == {"0.5": 0.0, "1": 0.0, "2": 0.0}
    assert m["froc_curve"]["fp_per_image"][-1] == pytest.approx(3 / 3)


def test_a_box_on_a_normal_image_lowers_ap():
    fractured = (np.array([det(10, 10, 50, 40, 0.5)]), np.array([[10, 10, 50, 40]]))
    normal = (np.array([det(10, 10, 50, 40, 0.9)]), NO_BOX)
    alone = run([fractured[0]], [fractured[1]])
    both = run([fractured[0], normal[0]], [fractured[1], normal[1]])
    assert alone["ap50"] == pytest.approx(1.0)
    # FP first (precision 0), then the TP (precision 1/2): COCO's envelope is 1/2 at every recall.
    assert both["ap50"] == pytest.approx(0.5)
    # FROC: the threshold 0.5 takes both: 1 FP on 2 images, the fracture found.
    assert both["froc_sensitivity"] == {"0.5": 1.0, "1": 1.0, "2": 1.0}
    assert both["froc_curve"] == {"fp_per_image": [0.0, 0.5], "sensitivity": [0.0, 1.0], "n_images": 2,
                                  "n_boxes": 1}


def test_duplicate_detection_is_an_ap_false_positive_but_ignored_by_froc():
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]])]
    # A (0.9), a duplicate on A (IoU 0.81, 0.8), then B (0.7).
    preds = [np.array([det(0, 0, 10, 10, 0.9), det(1, 1, 10, 10, 0.8), det(20, 20, 30, 30, 0.7)])]
    m = run(preds, gts)
    assert m["ap50"] == pytest.approx(AP_TP_FP_TP, abs=1e-6)
    assert m["ap50_95"] == pytest.approx(AP_TP_FP_TP, abs=1e-6)  # exact boxes: same at every IoU
    assert m["froc_sensitivity"] == {"0.5": 1.0, "1": 1.0, "2": 1.0}
    assert m["froc_curve"]["fp_per_image"] == [0.0, 0.0, 0.0]  # the duplicate is no FP
    assert m["pointing"] == 1.0


def test_a_detection_on_an_already_hit_box_still_hits_a_free_one():
    # Two overlapping fracture boxes; the second detection overlaps both (IoU >= 0.5), the first is taken.
    gts = [np.array([[0, 0, 10, 10], [0, 0, 10, 12]])]
    preds = [np.array([det(0, 0, 10, 10, 0.9), det(0, 0, 10, 11, 0.8)])]
    m = run(preds, gts)
    assert m["froc_sensitivity"]["0.5"] == 1.0 and m["froc_curve"]["fp_per_image"][-1] == 0.0


def test_boxes_are_matched_within_their_own_image():
    gts = [np.array([[0, 0, 10, 10]]), np.array([[50, 50, 60, 60]])]
    preds = [NO_PRED, np.array([det(0, 0, 10, 10, 0.9)])]  # right place, wrong image
    m = run(preds, gts)
    assert m["ap50"] == 0.0 and m["pointing"] == 0.0
    assert m["froc_sensitivity"]["2"] == 0.0
    assert m["froc_curve"]["fp_per_image"][-1] == 0.5


def test_froc_worked_by_hand():
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]),        # A, B
           np.array([[0, 0, 10, 10], [40, 40, 60, 60]]),        # C, E
           NO_BOX,                                              # a normal image
           np.array([[100, 100, 120, 120]])]                    # D
    preds = [np.array([det(0, 0, 10, 10, 0.9),      # d1: hits A
                       det(1, 1, 10, 10, 0.8),      # d2: on A again (IoU .81): neither TP nor FP
                       det(50, 50, 60, 60, 0.6)]),  # d3: FP
             np.array([det(0, 0, 10, 10, 0.7),      # d4: hits C
                       det(0, 0, 4, 4, 0.95),       # d5: IoU .16 with C: FP
                       det(40, 40, 60, 58, 0.05)]), # d10: hits E (IoU .9)
             np.array([det(0, 0, 5, 5, 0.85), det(0, 0, 5, 5, 0.3), det(0, 0, 5, 5, 0.1)]),  # d6, d7, d9: FPs
             np.array([det(100, 100, 120, 120, 0.2)])]  # d8: hits D
    m = run(preds, gts)
    # Score order d5 d1 d6 d2 d4 d3 d7 d8 d9 d10 -> cumulative (FP, TP):
    # (1,0) (1,1) (2,1) (2,1) (2,2) (3,2) (4,2) (4,3) (5,3) (5,4); 4 images, 5 boxes.
    # FP/image .25 .25 .5 .5 .5 .75 1 1 1.25 1.25; sensitivity 0 .2 .2 .2 .4 .4 .4 .6 .6 .8
    assert m["froc_sensitivity"] == pytest.approx({"0.5": 0.4, "1": 0.6, "2": 0.8})
    assert m["froc_curve"]["fp_per_image"] == pytest.approx([0, 0.25, 0.5, 1.0, 1.25])
    assert m["froc_curve"]["sensitivity"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    # Pointing: image 0's top box hits A, image 1's top box (d5, centre (2, 2)) is inside C, image 3's hits D.
    assert m["pointing"] == 1.0
    assert (m["n_images"], m["n_boxes"], m["n_fractured_images"], m["n_detections"]) == (4, 5, 3, 10)


def test_pointing_uses_the_top_scoring_box_only():
    gts = [np.array([[0, 0, 10, 10]])] * 2
    preds = [np.array([det(50, 50, 60, 60, 0.9), det(0, 0, 10, 10, 0.8)]),  # top box elsewhere: miss
             np.array([det(0, 0, 4, 4, 0.9)])]  # centre (2, 2) inside, though IoU is only .16: a hit
    assert run(preds, gts)["pointing"] == 0.5


def test_equal_scores_enter_together():
    # One hit and three FPs, all at score 0.5, the hit listed first: no threshold takes the hit alone.
    gts = [np.array([[0, 0, 10, 10]]), NO_BOX, NO_BOX, NO_BOX]
    preds = [np.array([det(0, 0, 10, 10, 0.5)])] + [np.array([det(0, 0, 10, 10, 0.5)])] * 3
    m = run(preds, gts)
    assert m["froc_sensitivity"] == {"0.5": 0.0, "1": 1.0, "2": 1.0}
    assert m["froc_curve"]["fp_per_image"] == [0.0, 0.75]


def test_unannotated_images_are_left_out_entirely():
    gts = [np.array([[0, 0, 10, 10]]), NO_BOX, np.array([[5, 5, 30, 30]])]
    preds = [np.array([det(0, 0, 10, 10, 0.9)]), np.array([det(3, 3, 9, 9, 0.8)]),
             np.array([det(5, 5, 30, 30, 0.4), det(40, 40, 50, 50, 0.7)])]
    groups = ["a", "b", "c"]
    base = run(preds, gts, groups, n_bootstrap=100)
    # An unannotated fractured image with boxes that would be FPs (and its own group).
    with_unknown = run(preds + [np.array([det(60, 60, 70, 70, 0.99)])], gts + [None], groups + ["d"],
                       n_bootstrap=100)
    assert with_unknown.pop("n_unannotated_excluded") == 1 and base.pop("n_unannotated_excluded") == 0
    assert with_unknown == base


def test_empty_and_undefined_inputs_give_none():
    m = run([], [], [], n_bootstrap=20)
    assert m["ap50"] is None and m["pointing"] is None and m["n_images"] == 0
    assert m["froc_sensitivity"] == {"0.5": None, "1": None, "2": None}
    only_unknown = run([NO_PRED], [None])
    assert only_unknown["n_images"] == 0 and only_unknown["n_unannotated_excluded"] == 1
    normals = run([np.array([det(0, 0, 5, 5, 0.9)]), NO_PRED], [NO_BOX, NO_BOX], n_bootstrap=20)
    assert normals["n_images"] == 2 and normals["n_boxes"] == 0
    for m in (only_unknown, normals):
        assert m["ap50"] is None and m["ap50_95"] is None and m["pointing"] is None
        assert all(v is None for v in m["froc_sensitivity"].values())
        assert m["ci95"]["ap50"] is None and all(v is None for v in m["ci95"]["froc_sensitivity"].values())
        assert m["froc_curve"]["fp_per_image"] == []
        json.dumps(m, allow_nan=False)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="2 predictions, 1 ground truths"):
        run([NO_PRED, NO_PRED], [NO_BOX], [0, 1])
    with pytest.raises(ValueError, match=r"pred_boxes\[0\] is None"):
        run([None], [NO_BOX])
    with pytest.raises(ValueError, match=r"pred_boxes\[0\] has shape \(1, 4\)"):
        run([[[0, 0, 1, 1]]], [NO_BOX])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] has a box with x1 < x0"):
        run([NO_PRED], [[[10, 0, 5, 5]]])
    with pytest.raises(ValueError, match=r"pred_boxes\[0\] holds NaN"):
        run([[[0, 0, 1, 1, np.nan]]], [NO_BOX])


# --------------------------------------------------------------------------- random data: torchmetrics, CIs


def _random_set(n_images=60, seed=1):
    rng = np.random.default_rng(seed)
    preds, gts, groups = [], [], []
    for i in range(n_images):
        m = int(rng.integers(1, 3)) if i % 3 == 0 else 0
        xy = rng.uniform(0, 300, (m, 2))
        g = np.c_[xy, xy + rng.uniform(20, 60, (m, 2))]
        k = int(rng.integers(0, 5))
        pxy = rng.uniform(0, 300, (k, 2))
        p = np.c_[pxy, pxy + rng.uniform(20, 60, (k, 2)), rng.uniform(size=k)]
        if m and rng.uniform() < 0.7:  # a noisy, fairly confident box on the first fracture
            p = np.r_[p, [[*(g[0] + rng.normal(0, 4, 4)), rng.uniform(0.5, 1)]]]
        preds.append(p.reshape(-1, 5))
        gts.append(g.reshape(-1, 4))
        groups.append(f"exam{i // 3}")
    return preds, gts, groups


def test_ap_equals_a_direct_torchmetrics_call():
    from torchmetrics.detection import MeanAveragePrecision

    preds, gts, groups = _random_set()
    m = run(preds, gts, groups)
    direct = MeanAveragePrecision(box_format="xyxy")
    direct.update([{"boxes": torch.tensor(p[:, :4], dtype=torch.float32), "scores": torch.tensor(p[:, 4], dtype=torch.float32),
                    "labels": torch.zeros(len(p), dtype=torch.long)} for p in preds],
                  [{"boxes": torch.tensor(g, dtype=torch.float32), "labels": torch.zeros(len(g), dtype=torch.long)}
                   for g in gts])
    res = direct.compute()
    assert 0 < m["ap50"] < 1
    assert m["ap50"] == pytest.approx(float(res["map_50"]), abs=1e-6)
    assert m["ap50_95"] == pytest.approx(float(res["map"]), abs=1e-6)


def test_cis_bracket_the_point_estimates_and_resample_groups():
    preds, gts, groups = _random_set()
    m = run(preds, gts, groups, n_bootstrap=300, seed=3)
    # Every CI from the same number of resamples (AP no longer reruns COCO per resample).
    assert m["ci95_resamples"] == {"ap50": 300, "ap50_95": 300, "pointing": 300, "froc_sensitivity": 300}
    assert m["fractured_only"]["ci95_resamples"] == 300
    ci = m["ci95"]
    for key in ("ap50", "ap50_95", "pointing"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi and lo < hi, key
    for key in FROC_KEYS:
        lo, hi = ci["froc_sensitivity"][key]
        assert lo <= m["froc_sensitivity"][key] <= hi and lo < hi, key
    frac = m["fractured_only"]
    for key in ("ap50", "ap50_95"):
        lo, hi = frac["ci95"][key]
        assert lo <= frac[key] <= hi and lo < hi, key
    # Same seed, same answer.
    assert run(preds, gts, groups, n_bootstrap=300, seed=3) == m
    # One exam group: every resample is the whole set, so each CI collapses to the point estimate.
    one = run(preds, gts, ["same exam"] * len(preds), n_bootstrap=50)
    for key in ("ap50", "ap50_95", "pointing"):
        assert one["ci95"][key] == pytest.approx([one[key]] * 2)
    for key in ("ap50", "ap50_95"):
        assert one["fractured_only"]["ci95"][key] == pytest.approx([one["fractured_only"][key]] * 2)
    for key in FROC_KEYS:
        assert one["ci95"]["froc_sensitivity"][key] == pytest.approx([one["froc_sensitivity"][key]] * 2)


# --------------------------------------------------------------------------- plot and report


def test_plot_froc_writes_a_png(tmp_path):
    preds, gts, groups = _random_set()
    m = run(preds, gts, groups, n_bootstrap=50)
    path = tmp_path / "sub" / "froc.png"
    assert plot_froc(m["froc_curve"], path, ci=m["ci95"]["froc_sensitivity"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 200
    assert not plot_froc(run([NO_PRED], [NO_BOX])["froc_curve"], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_report_section_shows_values_cis_and_na():
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]])]
    preds = [np.array([det(0, 0, 10, 10, 0.9), det(1, 1, 10, 10, 0.8), det(20, 20, 30, 30, 0.7)])]
    m = run(preds, gts, n_bootstrap=20)
    text = report_section(m)
    assert text.startswith("## Localization")
    ap = f"{AP_TP_FP_TP:.3f} [{AP_TP_FP_TP:.3f}, {AP_TP_FP_TP:.3f}]"  # one image, one group: the CI collapses
    assert f"| AP50 (COCO) | {ap} | {ap} |" in text  # all images, and fractured images only (the same image here)
    assert "| FROC sensitivity at 1 FP/image | 1.000 [1.000, 1.000] | – |" in text
    assert "![FROC](froc.png)" in text and "20 resamples for every value" in text
    assert "FracAtlas's official protocol" in text
    empty = report_section(run([NO_PRED], [NO_BOX]), froc_png=None)
    assert "| AP50 (COCO) | n/a | n/a |" in empty and "![FROC]" not in empty
