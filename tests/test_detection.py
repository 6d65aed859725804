"""The fracture-box head: FCOS targets, decoding, loss, augmentation with boxes, letterbox geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bonexray.data.preprocess import Letterbox, letterbox, letterbox_boxes
from bonexray.model.detection import (BOX_STRIDE, BoxHead, BoxSettings, box_loss, cell_centres, choose_box_threshold,
                                      decode_boxes, fcos_targets)
from bonexray.training.augment import AugmentConfig, augment_batch
from bonexray.training.losses import boxes_to_mask


def _perfect_maps(boxes: torch.Tensor, valid: torch.Tensor, h: int, w: int, stride: int = BOX_STRIDE):
    """Dense maps a perfect head would output for these boxes (logits +-10, exact distances)."""
    positive, ltrb, ctr = fcos_targets(boxes, valid, h, w, stride)
    b = boxes.shape[0]
    logits = torch.where(positive, 10.0, -10.0).reshape(b, 1, h, w)
    ltrb_map = ltrb.transpose(1, 2).reshape(b, 4, h, w)
    ctr_logit = torch.logit(ctr.clamp(1e-4, 1 - 1e-4)).reshape(b, 1, h, w)
    return logits, ltrb_map, ctr_logit


def test_targets_then_decoding_give_back_the_boxes():
    boxes = torch.tensor([[[40.0, 48.0, 120.0, 100.0], [200.0, 180.0, 236.0, 260.0], [0, 0, 0, 0]],
                          [[10.0, 10.0, 14.0, 13.0], [0, 0, 0, 0], [0, 0, 0, 0]]])  # image 1: a tiny box
    valid = torch.tensor([[True, True, False], [True, False, False]])
    maps = _perfect_maps(boxes, valid, 40, 40)
    found = decode_boxes(*maps, BoxSettings(threshold=0.5))
    assert len(found[0]) == 2 and len(found[1]) == 1
    got = sorted(found[0][:, :4].tolist())
    want = sorted(boxes[0, :2].tolist())
    np.testing.assert_allclose(got, want, atol=1e-3)
    np.testing.assert_allclose(found[1][0, :4].tolist(), [10, 10, 14, 13], atol=1e-3)  # the nearest cell took it
    assert (found[0][:-1, 4] >= found[0][1:, 4]).all()  # sorted by score


def test_positives_are_inside_boxes_near_their_centres_and_ignore_padding():
    boxes = torch.tensor([[[0.0, 0.0, 320.0, 320.0], [300, 300, 310, 310]]])
    positive, _, ctr = fcos_targets(boxes, torch.tensor([[True, False]]), 40, 40)
    centres = cell_centres(40, 40, BOX_STRIDE)
    pos = centres[positive[0]]
    # centre sampling: within 1.5 strides of the box centre (160, 160)
    # the centre sits on a cell corner: the 4 x 4 cells within 12 px of it
    assert len(pos) == 16 and ((pos - 160).abs() <= 1.5 * BOX_STRIDE).all()
    assert ctr[0][positive[0]].min() > 0.85  # (148/172) at the corner cells


def test_decoding_keeps_the_operating_point_nms_and_max_detections():
    h = w = 10
    logits = torch.full((1, 1, h, w), -10.0)
    ltrb = torch.full((1, 4, h, w), 16.0)  # 32-px boxes: neighbours overlap by IoU 0.6
    ctr = torch.full((1, 1, h, w), 10.0)
    logits[0, 0, 2, 2], logits[0, 0, 2, 3] = 3.0, 2.0  # two overlapping boxes: NMS keeps the better
    logits[0, 0, 7, 7] = 0.0  # p = 0.5 -> score ~ 0.707
    found = decode_boxes(logits, ltrb, ctr, BoxSettings(threshold=0.5, nms_iou=0.5))[0]
    assert len(found) == 2
    assert math.isclose(float(found[0, 4]), math.sqrt(torch.sigmoid(torch.tensor(3.0)).item() * torch.sigmoid(torch.tensor(10.0)).item()), rel_tol=1e-5)
    assert len(decode_boxes(logits, ltrb, ctr, BoxSettings(threshold=0.72))[0]) == 1
    assert len(decode_boxes(logits, ltrb, ctr, BoxSettings(threshold=0.1, nms_iou=0.99, max_detections=1))[0]) == 1
    nan = logits.clone()
    nan[0, 0, 2, 2] = float("nan")
    assert all(torch.isfinite(b).all() for b in decode_boxes(nan, ltrb, ctr, BoxSettings(threshold=0.5)))


def test_box_loss_prefers_the_right_maps_and_skips_unknown_images():
    boxes = torch.tensor([[[40.0, 48.0, 120.0, 100.0]], [[0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True], [False]])
    known = torch.tensor([True, True])
    good = _perfect_maps(boxes, valid, 40, 40)
    bad = (torch.zeros_like(good[0]), torch.full_like(good[1], 8.0), torch.zeros_like(good[2]))
    assert box_loss(*good, boxes, valid, known) < 0.5 * box_loss(*bad, boxes, valid, known)
    assert float(box_loss(*bad, boxes, valid, torch.tensor([False, False]))) == 0.0
    # An unknown image (fractured, not annotated) does not count, whatever the head says on it.
    noisy = tuple(torch.cat([m[:1], torch.randn_like(m[1:]) * 5], 0) for m in bad)
    unknown_second = torch.tensor([True, False])
    torch.testing.assert_close(box_loss(*noisy, boxes, valid, unknown_second), box_loss(*bad, boxes, valid, unknown_second))


def test_augmented_boxes_follow_the_image():
    # A bright square per image; after flip + warp its box must still enclose the bright pixels.
    s, b = 96, 4
    x = torch.zeros(b, 1, s, s)
    boxes = torch.zeros(b, 2, 4)
    for i in range(b):
        r, c = 20 + 8 * i, 30 + 5 * i
        x[i, :, r:r + 16, c:c + 12] = 1.0
        boxes[i, 0] = torch.tensor([c, r, c + 12, r + 16], dtype=torch.float32)
    valid = torch.tensor([[True, False]] * b)
    cfg = AugmentConfig(contrast=0.0, brightness=0.0, gamma=0.0)
    out, moved, ok = augment_batch(x, cfg, generator=torch.Generator().manual_seed(5), boxes=boxes, valid=valid)
    assert ok[:, 0].all() and not ok[:, 1].any()
    for i in range(b):
        ys, xs = torch.nonzero(out[i, 0] > 0.5, as_tuple=True)
        x0, y0, x1, y1 = moved[i, 0].tolist()
        assert xs.min() >= x0 - 1.5 and xs.max() + 1 <= x1 + 1.5 and ys.min() >= y0 - 1.5 and ys.max() + 1 <= y1 + 1.5
        inside = ((xs + 0.5 >= x0) & (xs + 0.5 <= x1) & (ys + 0.5 >= y0) & (ys + 0.5 <= y1)).float().mean()
        assert inside > 0.95


def test_horizontal_flip_moves_boxes_exactly():
    cfg = AugmentConfig(hflip=1.0, max_rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, contrast=0.0, brightness=0.0, gamma=0.0)
    x = torch.rand(1, 1, 64, 64)
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 40.0]]])
    out, moved, ok = augment_batch(x, cfg, boxes=boxes, valid=torch.tensor([[True]]))
    torch.testing.assert_close(out, x.flip(-1))
    torch.testing.assert_close(moved, torch.tensor([[[34.0, 20.0, 54.0, 40.0]]]))


_STILL = dict(hflip=0.0, max_rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, contrast=0.0, brightness=0.0, gamma=0.0)


@pytest.mark.parametrize("with_outlines", [False, True])
def test_quarter_turns_move_boxes_and_outlines_exactly_with_their_image(with_outlines):
    # One off-centre bright rectangle per image; every image is turned (p=1): its box must be exactly
    # the bright pixels' box afterwards, and the turns drawn must include 90, 180 and 270 degrees.
    s, b = 48, 12
    x = torch.zeros(b, 1, s, s)
    boxes = torch.zeros(b, 1, 4)
    for i in range(b):
        r, c = 3 + i, 20 + i
        x[i, :, r:r + 5, c:c + 9] = 1.0
        boxes[i, 0] = torch.tensor([c, r, c + 9, r + 5], dtype=torch.float32)
    valid = torch.ones(b, 1, dtype=torch.bool)
    polygons = None
    if with_outlines:
        x0, y0, x1, y1 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
        polygons = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                                torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], -2)  # (b, 1, 4, 2)
    cfg = AugmentConfig(**_STILL, quarter_turn=1.0)
    out, moved, ok = augment_batch(x, cfg, generator=torch.Generator().manual_seed(2), boxes=boxes, valid=valid,
                                   polygons=polygons)
    assert ok.all()
    seen = set()
    for i in range(b):
        turned = [k for k in (1, 2, 3) if torch.allclose(out[i, 0], torch.rot90(x[i, 0], k, dims=(-2, -1)), atol=1e-4)]
        assert len(turned) == 1, "each image is turned by exactly one quarter-turn multiple"
        seen.add(turned[0])
        ys, xs = torch.nonzero(out[i, 0] > 0.5, as_tuple=True)
        truth = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        assert moved[i, 0].tolist() == pytest.approx(truth, abs=1e-4)
    assert seen == {1, 2, 3}


def test_jpeg_recompression_changes_the_drawn_images_reproducibly_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 32, 32)
    x = (x * 255).round() / 255
    cfg = AugmentConfig(**_STILL, jpeg=0.5, jpeg_quality=(30, 30))
    state = torch.get_rng_state()
    a = augment_batch(x, cfg, generator=torch.Generator().manual_seed(4))
    b = augment_batch(x, cfg, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a, b)
    changed = [(a[i] - x[i]).abs().max().item() > 2 / 255 for i in range(6)]
    assert 0 < sum(changed) < 6, "about half the images are re-compressed (noise does not survive JPEG 30)"
    none = augment_batch(x, AugmentConfig(**_STILL, jpeg=0.0), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(none, x)


def test_the_robust_preset_turns_and_recompresses_and_the_cli_offers_it():
    from bonexray.training.config import CHOICES
    from bonexray.training.module import AUGMENT_PRESETS

    robust, standard = AUGMENT_PRESETS["robust"], AUGMENT_PRESETS["standard"]
    assert robust.quarter_turn > 0 and robust.jpeg > 0 and robust.jpeg_quality[0] >= 30
    assert standard.quarter_turn == 0 and standard.jpeg == 0
    assert "robust" in CHOICES["augment"]


def test_a_stride_4_head_sees_a_small_fracture_on_more_cells_and_decodes_it_exactly():
    # A fracture of the median FracAtlas size in a 320-px tile (about 17 x 19 px).
    boxes = torch.tensor([[[100.0, 140.0, 117.0, 159.0]]])
    valid = torch.tensor([[True]])
    pos8 = fcos_targets(boxes, valid, 40, 40, 8)[0]
    pos4 = fcos_targets(boxes, valid, 80, 80, 4)[0]
    assert int(pos8.sum()) <= 4 < int(pos4.sum())
    centres = cell_centres(80, 80, 4)[pos4[0]]
    assert ((centres[:, 0] > 100) & (centres[:, 0] < 117) & (centres[:, 1] > 140) & (centres[:, 1] < 159)).all()
    maps = _perfect_maps(boxes, valid, 80, 80, stride=4)
    found = decode_boxes(*maps, BoxSettings(threshold=0.5, stride=4))[0]
    np.testing.assert_allclose(found[0, :4].tolist(), boxes[0, 0].tolist(), atol=1e-3)
    # The loss on the stride-4 grid prefers the exact maps; decoding with the wrong stride misplaces the box.
    bad = (torch.zeros_like(maps[0]), torch.full_like(maps[1], 4.0), torch.zeros_like(maps[2]))
    assert box_loss(*maps, boxes, valid, torch.tensor([True]), stride=4) < 0.5 * box_loss(*bad, boxes, valid, torch.tensor([True]), stride=4)
    wrong = decode_boxes(*maps, BoxSettings(threshold=0.5, stride=8))[0]
    assert float(torch.abs(wrong[0, :4] - boxes[0, 0]).max()) > 50


def test_box_head_grids_per_stride_in_the_network():
    from bonexray.errors import BonexrayError
    from bonexray.model.network import BoneXrayNet

    x = torch.rand(1, 1, 64, 64)
    for stride in (8, 4):
        net = BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained=None, box_head=True, box_stride=stride)
        assert net.box_head.stride == stride and len(net.box_head.lateral) == (3 if stride == 8 else 4)
        maps = net.forward_outputs(x)
        assert maps["box_logits"].shape[-2:] == (64 // stride, 64 // stride)
        assert maps["box_ltrb"].shape == (1, 4, 64 // stride, 64 // stride) and (maps["box_ltrb"] > 0).all()
    with pytest.raises(BonexrayError, match="box stride"):
        BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained=None, box_head=True, box_stride=16)
    with pytest.raises(ValueError, match="feature maps"):
        BoxHead((16, 32, 64), stride=4)


def test_outlines_keep_a_rotated_fracture_box_tight():
    """A thin diagonal fracture: rotating its box's corners inflates the box, rotating its outline
    does not; the outline's box still encloses the fracture's pixels after the warp."""
    s = 96
    x = torch.zeros(4, 1, s, s)
    # A diagonal band from (30, 30) to (60, 60), 4 px wide: its outline is a thin quadrilateral.
    outline = torch.tensor([[30.0, 34.0], [34.0, 30.0], [60.0, 56.0], [56.0, 60.0]])
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    band = ((xx - yy).abs() <= 2.8) & (xx + yy >= 64) & (xx + yy <= 116)
    x[:, 0][:, band] = 1.0
    boxes = torch.tensor([[[30.0, 30.0, 60.0, 60.0]]] * 4)
    valid = torch.ones(4, 1, dtype=torch.bool)
    from bonexray.training.datamodule import OUTLINE_POINTS, outline_points

    pts = torch.from_numpy(outline_points(boxes[0, 0].numpy(), outline.numpy()))
    assert pts.shape == (OUTLINE_POINTS, 2) and (pts[4:] == pts[3]).all()
    polygons = pts[None, None].repeat(4, 1, 1, 1)
    cfg = AugmentConfig(hflip=0.5, max_rotation_deg=10.0, scale=(1.0, 1.0), translate=0.0, contrast=0.0, brightness=0.0, gamma=0.0)
    out, tight, ok = augment_batch(x, cfg, generator=torch.Generator().manual_seed(3), boxes=boxes, valid=valid, polygons=polygons)
    _, loose, _ = augment_batch(x, cfg, generator=torch.Generator().manual_seed(3), boxes=boxes, valid=valid)
    assert ok.all()
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    assert (area(tight) <= area(loose) + 1e-3).all() and (area(tight) < 0.95 * area(loose)).any()
    for i in range(4):
        ys, xs = torch.nonzero(out[i, 0] > 0.5, as_tuple=True)
        x0, y0, x1, y1 = tight[i, 0].tolist()
        assert xs.min() >= x0 - 1.5 and xs.max() + 1 <= x1 + 1.5 and ys.min() >= y0 - 1.5 and ys.max() + 1 <= y1 + 1.5
        # tight: the fracture's pixels reach every edge of its box
        assert xs.min() <= x0 + 2 and xs.max() + 1 >= x1 - 2 and ys.min() <= y0 + 2 and ys.max() + 1 >= y1 - 2


def test_outlines_without_a_warp_give_back_the_box_and_follow_a_flip():
    from bonexray.training.datamodule import outline_points

    box = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
    corners = outline_points(box, None)  # no outline: the box's corners
    assert corners.min(0).tolist() == [10, 20] and corners.max(0).tolist() == [30, 40]
    assert outline_points(box, np.zeros((40, 2), np.float32)).max(0).tolist() == [30, 40]  # too long: corners
    diamond = np.array([[20, 20], [30, 30], [20, 40], [10, 30]], np.float32)
    polygons = torch.from_numpy(outline_points(box, diamond))[None, None]
    x = torch.rand(1, 1, 64, 64)
    still = AugmentConfig(hflip=0.0, max_rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, contrast=0.0, brightness=0.0, gamma=0.0)
    _, same, _ = augment_batch(x, still, boxes=torch.from_numpy(box)[None, None], valid=torch.tensor([[True]]), polygons=polygons)
    torch.testing.assert_close(same, torch.from_numpy(box)[None, None])
    flip = AugmentConfig(hflip=1.0, max_rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, contrast=0.0, brightness=0.0, gamma=0.0)
    _, moved, _ = augment_batch(x, flip, boxes=torch.from_numpy(box)[None, None], valid=torch.tensor([[True]]), polygons=polygons)
    torch.testing.assert_close(moved, torch.tensor([[[34.0, 20.0, 54.0, 40.0]]]))


def test_fracatlas_outlines_reach_the_training_items(tmp_path):
    """The COCO polygons are read with the boxes and mapped into the letterbox tile with them."""
    import json

    from bonexray.data.fracatlas import read_fracatlas_boxes
    from bonexray.training.datamodule import letterbox_outlines

    ann = tmp_path / "Annotations" / "COCO JSON"
    ann.mkdir(parents=True)
    coco = {"images": [{"id": 1, "file_name": "IMG1.jpg", "width": 200, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [20, 10, 40, 30], "segmentation": [[40, 10, 60, 25, 40, 40, 20, 25]]},
                            {"id": 2, "image_id": 1, "bbox": [100, 50, 10, 10], "segmentation": []}]}
    (ann / "COCO_fracture_masks.json").write_text(json.dumps(coco))
    got = read_fracatlas_boxes(tmp_path, [])["IMG1.jpg"]
    assert got["polygons"][0] == [40, 10, 60, 25, 40, 40, 20, 25] and got["polygons"][1] is None
    tile = letterbox_outlines(got["polygons"], got["size"], 100)  # 200 x 100 -> 100 x 50, offset 25 px down
    np.testing.assert_allclose(tile[0], [[20, 30], [30, 37.5], [20, 45], [10, 37.5]])
    assert tile[1] is None
    np.testing.assert_allclose(letterbox_boxes(got["boxes"][:1], got["size"], 100), [[10, 30, 30, 45]])


def test_iou_quality_teaches_the_quality_map_how_well_each_box_fits():
    from bonexray.model.detection import paired_iou

    boxes = torch.tensor([[[40.0, 48.0, 120.0, 100.0]]])
    valid, known = torch.tensor([[True]]), torch.tensor([True])
    logits, ltrb, _ = _perfect_maps(boxes, valid, 40, 40)
    positive, t_ltrb, t_ctr = fcos_targets(boxes, valid, 40, 40)
    ltrb = ltrb * 1.3  # every box 1.3x too wide and high: IoU 1/1.69 at every positive cell
    iou = 1 / 1.69
    centres = cell_centres(40, 40, BOX_STRIDE)[positive[0]]
    d = ltrb.reshape(1, 4, -1).transpose(1, 2)[positive]
    pred = torch.stack([centres[:, 0] - d[:, 0], centres[:, 1] - d[:, 1], centres[:, 0] + d[:, 2], centres[:, 1] + d[:, 3]], 1)
    truth = boxes[0, :1].expand(len(pred), 4)
    torch.testing.assert_close(paired_iou(pred, truth), torch.full((len(pred),), iou), atol=1e-5, rtol=0)
    at_iou = torch.full_like(logits, math.log(iou / (1 - iou)))
    ctr_map = torch.zeros(1, 40 * 40)
    ctr_map[positive] = torch.logit(t_ctr[positive].clamp(1e-4, 1 - 1e-4))
    at_ctr = ctr_map.reshape(1, 1, 40, 40)
    # Each target is the minimum of its own loss (the other terms are the same for both maps).
    assert box_loss(logits, ltrb, at_iou, boxes, valid, known, quality="iou") < box_loss(logits, ltrb, at_ctr, boxes, valid, known, quality="iou")
    assert box_loss(logits, ltrb, at_ctr, boxes, valid, known) < box_loss(logits, ltrb, at_iou, boxes, valid, known)
    # The quality target is detached: it teaches the quality map only, not the distances.
    ltrb_p = ltrb.clone().requires_grad_(True)
    box_loss(logits, ltrb_p, at_iou, boxes, valid, known, quality="iou").backward()
    g_iou = ltrb_p.grad.clone()
    ltrb_p.grad = None
    box_loss(logits, ltrb_p, at_ctr, boxes, valid, known, quality="centerness").backward()
    torch.testing.assert_close(g_iou, ltrb_p.grad)
    with pytest.raises(ValueError, match="quality"):
        box_loss(logits, ltrb, at_iou, boxes, valid, known, quality="giou")


def test_boxes_to_mask_covers_each_box_and_at_least_one_pixel():
    boxes = torch.tensor([[[2.0, 3.0, 6.0, 5.0], [10.2, 10.2, 10.4, 10.4]]])
    mask = boxes_to_mask(boxes, torch.tensor([[True, True]]), 16)
    assert mask[0, 0, 3:5, 2:6].all() and mask[0, 0, 10, 10] == 1
    assert mask.sum() == 4 * 2 + 1


def test_choose_box_threshold_maximises_f1():
    truth = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    pairs = [(torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9], [50, 50, 60, 60, 0.8]]), truth),
             (torch.tensor([[20.0, 20.0, 30.0, 30.0, 0.85]]), torch.zeros((0, 4)))]
    assert choose_box_threshold(pairs, default=0.3) == pytest.approx(0.9)
    assert choose_box_threshold([], default=0.3) == 0.3


@pytest.mark.parametrize("w,h,full", [(400, 200, None), (200, 400, None), (200, 100, (800, 400)), (333, 517, None)])
def test_letterbox_geometry_round_trips_and_matches_the_pixels(w, h, full):
    size = 128
    geo = Letterbox(size, w, h, full)
    ow, oh = geo.original_size
    boxes = np.array([[0.1 * ow, 0.2 * oh, 0.6 * ow, 0.9 * oh]])
    np.testing.assert_allclose(geo.to_original(geo.to_tile(boxes)), boxes, rtol=1e-4)
    # the content rectangle is where letterbox() puts the pixels
    tile = letterbox(np.full((h, w), 200, np.uint8), size)
    left, top, nw, nh = geo.content
    assert (tile[top:top + nh, left:left + nw] == 200).all() and tile.sum() == 200 * nw * nh
    if full is None:
        np.testing.assert_allclose(letterbox_boxes([[0.1 * w, 0.2 * h, 0.5 * w, 0.7 * h]], (w, h), size), geo.to_tile(boxes), rtol=1e-5)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def box_run(tmp_path_factory):
    """A tiny model with a box head, trained for 2 epochs on a synthetic FracAtlas tree (64 px)."""
    from builders import make_fracatlas_tree
    from conftest import tiny_train_args

    from bonexray.training.train import TrainConfig, run_training

    base = tmp_path_factory.mktemp("boxes")
    root = make_fracatlas_tree(base / "data", n_groups=16)
    result = run_training(TrainConfig.from_args(tiny_train_args(root, base / "run", box_weight=1.0, fit_on="train",
                                                                  split_seed=0)))
    result["root"] = root
    result["base"] = base
    return result


@pytest.mark.slow
def test_box_model_trains_evaluates_predicts_and_exports_the_same_boxes(box_run, capsys):
    import csv
    import json

    from bonexray.cli import main
    from bonexray.inference.export import export_onnx
    from bonexray.inference.predictor import Predictor
    from bonexray.model.checkpoint import load_model

    ckpt, base, root = box_run["best_checkpoint"], box_run["base"], box_run["root"]
    rows = list(csv.DictReader(open(base / "run" / "metrics.csv")))
    assert any(r.get("train_loss_boxes") for r in rows) and any(r.get("valid_loss_boxes") for r in rows)
    net, card = load_model(ckpt)
    assert net.box_head is not None and card.boxes["threshold_source"].startswith("valid split")
    assert 0 < card.boxes["threshold"] < 1

    # evaluate writes the localisation keys, their CIs and froc.png
    out = base / "results"
    assert main(["evaluate", ckpt, "--data", str(root), "--split", "test", "--out", str(out), "--bootstrap", "50"]) == 0
    loc = json.loads((out / "metrics.json").read_text())["localization"]
    for key in ("ap50", "ap50_95", "pointing", "n_images", "n_boxes"):
        assert key in loc
    assert set(loc["froc_sensitivity"]) == {"0.5", "1", "2"} and "ci95" in loc and loc["n_boxes"] >= 1
    assert (out / "froc.png").is_file() and "Localization" in (out / "report.md").read_text()

    # predict: boxes in the original image's pixels; the ONNX export gives the same boxes
    img = next((root / "images" / "Fractured").glob("*.jpg"))
    capsys.readouterr()
    assert main(["predict", ckpt, str(img), "--backend", "torch"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert isinstance(rec["boxes"], list)
    onnx_path = export_onnx(ckpt, base / "m.onnx")
    assert main(["predict", str(onnx_path), str(img)]) == 0
    rec_onnx = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(rec_onnx["boxes"]) == len(rec["boxes"])
    for a, b in zip(rec["boxes"], rec_onnx["boxes"]):
        assert all(abs(a[k] - b[k]) <= 0.2 for k in ("x0", "y0", "x1", "y1")) and abs(a["score"] - b["score"]) < 1e-3
    # With a low operating point both engines find boxes, in original pixels (the image is 80 x 96).
    from dataclasses import replace

    from bonexray.data.preprocess import read_for_model
    from bonexray.inference.results import original_boxes

    m = read_for_model(img, card.image_size)
    for engine in (Predictor(ckpt, backend="torch"), Predictor(onnx_path)):
        low = replace(engine.box_settings, threshold=0.01)
        found = engine.predict_batch(m.tile[None], box_settings=low).boxes[0]
        assert len(found) >= 1
        orig = original_boxes(found, m.geometry)
        assert (orig[:, [0, 2]] <= 80 + 1e-6).all() and (orig[:, [1, 3]] <= 96 + 1e-6).all()
        assert (orig[:, 4] >= 0.01).all() and (np.diff(orig[:, 4]) <= 1e-9).all()


def test_predict_maps_boxes_to_original_pixels_of_a_draft_decoded_jpeg(tmp_path):
    """A big JPEG is decoded at reduced scale (draft); boxes still come back in its full pixels."""
    from PIL import Image

    from bonexray.data.preprocess import read_for_model

    arr = np.zeros((1200, 800), np.uint8)
    arr[300:500, 200:400] = 255
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    m = read_for_model(tmp_path / "big.jpg", 64)
    assert m.decoded.pixels.shape[0] < 1200 and m.geometry.original_size == (800, 1200)
    tile_box = m.geometry.to_tile([[200, 300, 400, 500]])
    ys, xs = np.nonzero(m.tile > 127)
    assert abs(xs.min() - tile_box[0, 0]) <= 1 and abs(ys.max() + 1 - tile_box[0, 3]) <= 1
    np.testing.assert_allclose(m.geometry.to_original(tile_box), [[200, 300, 400, 500]], atol=1e-3)
