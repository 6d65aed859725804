"""Auxiliary fracture localisation: boxes from FracAtlas COCO -> tile boxes -> augmentation -> fracture-map loss -> training."""
import csv

import numpy as np
import pytest
import torch
from builders import make_fracatlas_tree, make_manifest
from conftest import SHARED_DATA, requires_shared_data, tiny_train_args

from bonexray.data.datasets import load_dataset
from bonexray.data.preprocess import build_cache, letterbox, letterbox_boxes
from bonexray.errors import DatasetError
from bonexray.training.augment import AugmentConfig, augment_batch
from bonexray.training.datamodule import split_datasets
from bonexray.training.losses import boxes_to_mask, localization_loss
from bonexray.training.train import TrainConfig, run_training


def test_letterbox_boxes_hand_worked_and_matches_letterbox():
    # 200x100 image into 100 px: scale 0.5, 100x50 content, 25 px black band on top.
    assert np.allclose(letterbox_boxes([[20, 10, 20, 10]], (200, 100), 100), [[10, 30, 20, 35]])
    # A bright rectangle lands where the mapped box says.
    img = np.zeros((150, 300), np.uint8)
    img[60:90, 120:180] = 255
    tile = letterbox(img, 120)
    x0, y0, x1, y1 = letterbox_boxes([[120, 60, 60, 30]], (300, 150), 120)[0]
    ys, xs = np.nonzero(tile > 127)
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1


def test_fracatlas_reader_attaches_boxes(tmp_path):
    root = make_fracatlas_tree(tmp_path)
    rs = load_dataset(root)
    fractured = [r for r in rs if r.extras["fractured"]]
    normal = [r for r in rs if not r.extras["fractured"]]
    assert all(r.extras["localized"] and "boxes" not in r.extras for r in normal)
    unknown = [r for r in fractured if not r.extras["localized"]]
    assert len(unknown) == 1 and "boxes" not in unknown[0].extras  # skipped by the annotators: unknown, not empty
    known = [r for r in fractured if r.extras["localized"]]
    assert known and all(r.extras["boxes"] == [[26.0, 45.0, 26.0, 6.0]] and r.extras["annotated_size"] == (80, 96) for r in known)


def test_broken_coco_file_is_reported_not_fatal(tmp_path):
    root = make_fracatlas_tree(tmp_path)
    (root / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").write_text("{not json")
    rs = load_dataset(root)
    assert any("unreadable COCO annotations" in p for p in rs.problems)
    assert all("localized" not in r.extras for r in rs)


@requires_shared_data
def test_real_fracatlas_boxes():
    rs = load_dataset(SHARED_DATA / "FracAtlas")
    boxed = [r for r in rs if r.extras.get("boxes")]
    assert len(boxed) == 590 and all(r.extras["fractured"] == 1 for r in boxed)
    # Every box lies inside its annotated image.
    for r in boxed:
        w, h = r.extras["annotated_size"]
        for x, y, bw, bh in r.extras["boxes"]:
            assert -1 <= x and x + bw <= w + 1 and -1 <= y and y + bh <= h + 1


def test_cache_items_carry_boxes_on_the_fracture(tmp_path):
    root = make_fracatlas_tree(tmp_path)
    rs = load_dataset(root)
    for r in rs:
        r.split = "train"
    cache, _ = build_cache(rs, tmp_path / "cache", size=64, progress=False)
    ds = split_datasets(cache, rs, rs.body_parts, with_boxes=True)["train"]
    plain = split_datasets(cache, rs, rs.body_parts)["train"]
    assert len(plain[0]) == 3 and len(ds[0]) == 7  # image, labels, boxes, valid, known, outlines
    n_boxed = 0
    for i in range(len(ds)):
        img, abnormal, _, boxes, valid, known, _outlines = ds[i]
        if valid.any():
            n_boxed += 1
            assert abnormal == 1 and known and int(valid.sum()) == 1
            mask = boxes_to_mask(boxes[None], valid[None], 64)[0].bool()
            # The box covers the dark fracture gap inside the bright bone bar.
            assert img[mask].float().mean() < 0.5 * img[0, :, 22:42].float().mean()
    assert n_boxed == sum(1 for r in rs if r.extras.get("boxes"))


def test_augmentation_is_reproducible_with_a_generator_and_leaves_the_global_rng_alone():
    x = torch.rand(3, 1, 48, 48)
    boxes = torch.tensor([[[10.0, 10.0, 20.0, 30.0]]] * 3)
    valid = torch.ones(3, 1, dtype=torch.bool)
    state = torch.get_rng_state()
    a = augment_batch(x, AugmentConfig(hflip=1.0), generator=torch.Generator().manual_seed(1), boxes=boxes, valid=valid)
    b = augment_batch(x, AugmentConfig(hflip=1.0), generator=torch.Generator().manual_seed(1), boxes=boxes, valid=valid)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(state, torch.get_rng_state())
    assert not torch.allclose(a[0], x)


def test_localization_loss_balances_cells_and_ignores_unknown():
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 0:3, 0:3] = 1  # one positive cell (of 8x8 px) in image 0
    known = torch.tensor([True, False])
    loss = localization_loss(logits, mask, known)
    # At logit 0 every cell costs log 2, positive or negative.
    assert torch.isclose(loss, torch.tensor(np.log(2.0), dtype=torch.float32))
    loss.backward()
    g = logits.grad[0, 0]
    assert g[0, 0] < 0 and (g.flatten()[1:] > 0).all()  # push the fracture cell up, the rest down
    assert g[0, 0].abs() > 10 * g[1, 1].abs()  # one positive weighs as much as all 15 negatives together
    assert torch.count_nonzero(logits.grad[1]) == 0  # unknown location: no gradient
    none = localization_loss(logits, mask, torch.tensor([False, False]))
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.slow
def test_train_with_localization_head_and_fixed_split(tmp_path):
    from bonexray.model.checkpoint import load_model

    root = make_fracatlas_tree(tmp_path / "data", n_groups=16)
    out = tmp_path / "run"
    result = run_training(TrainConfig.from_args(tiny_train_args(root, out, epochs=1, localization_weight=1.0, box_weight=0.0, seed=5, split_seed=0,
                                                                  fit_on="train")))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert any(r.get("train_loss_localization") for r in rows) and any(r.get("valid_loss_localization") for r in rows)
    raw = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    net, card = load_model(result["best_checkpoint"])  # the head comes along as the network's fracture map
    assert torch.equal(net.localization_head.weight, raw["state_dict"]["net.localization_head.weight"])
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        abn, parts = net(x)  # forward is unchanged: two outputs
        fmap = net.localization_map(x)
    assert abn.shape == (2,) and parts.shape == (2, 2) and fmap.shape == (2, 1, 2, 2) and 0 <= fmap.min() <= fmap.max() <= 1
    from bonexray.inference.cam import cam_for_batch

    maps = cam_for_batch(net, x, method="localization")
    assert maps.shape == (2, 64, 64) and np.isclose(maps.max(), fmap.max().item(), atol=0.05)
    # predict --cam-method localization writes heatmaps; ONNX export still has the two outputs only.
    from bonexray.cli import main
    from bonexray.inference.export import export_onnx

    img = next((root / "images" / "Fractured").glob("*.jpg"))
    assert main(["predict", result["best_checkpoint"], str(img), "--cam", str(tmp_path / "cam"), "--cam-method", "localization"]) == 0
    assert len(list((tmp_path / "cam").glob("*_cam.png"))) == 1
    import onnx

    model = onnx.load(str(export_onnx(result["best_checkpoint"], tmp_path / "m.onnx")))
    assert [o.name for o in model.graph.output] == ["abnormal_logit", "body_part_logits", "embedding"]  # no box maps
    # --seed changes training only; the split follows --split-seed.
    from bonexray.data.splits import make_splits

    expected = make_splits(load_dataset(root), 0.25, 0.25, seed=0)
    recorded = {r["path"]: r["split"] for r in csv.DictReader(open(out / "splits.csv"))}
    assert recorded == {r.path: r.split for r in expected}
    assert result["body_parts"] == ["hand", "leg"]
    # A model with a fracture map seeds one without (the map is dropped) and the other way round.
    from bonexray.model.network import BoneXrayNet

    plain = BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained=None, weights=result["best_checkpoint"])
    assert plain.localization_head is None and torch.equal(plain.abnormal_head.weight, net.abnormal_head.weight)
    with_map = BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained=None, localization_head=True)
    torch.save(plain.state_dict(), out / "plain.pt")
    with_map.load_weights_file(out / "plain.pt")
    assert torch.equal(with_map.abnormal_head.weight, net.abnormal_head.weight) and with_map.localization_head is not None


def test_localization_weight_needs_boxes(tmp_path):
    manifest = make_manifest(tmp_path / "m", n=16)
    with pytest.raises(DatasetError, match="need fracture boxes"):
        run_training(TrainConfig.from_args(tiny_train_args(manifest, tmp_path / "run", localization_weight=1.0)))


def test_localization_heatmap_needs_the_head(tmp_path, capsys):
    from builders import radiograph_like
    from PIL import Image

    from bonexray.cli import main
    from bonexray.model.checkpoint import ModelCard, save_model
    from bonexray.model.network import BoneXrayNet

    net = BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained=None)
    ckpt = save_model(tmp_path / "m.ckpt", net, ModelCard(backbone="efficientnet_lite0", image_size=64, body_parts=["hand", "leg"]))
    Image.fromarray(radiograph_like(0)).save(tmp_path / "a.png")
    assert main(["predict", str(ckpt), str(tmp_path / "a.png"), "--cam", str(tmp_path / "c"), "--cam-method", "localization"]) == 2
    assert "no localisation head" in capsys.readouterr().err
    with pytest.raises(Exception, match="no localisation head"):
        net.localization_map(torch.rand(1, 1, 64, 64))
